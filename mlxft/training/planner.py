"""Memory planner: how much memory a training run will need, from metadata alone.

Reads config.json and the safetensors *headers* (never the weights), so `mlxft lora --dry-run`
answers "will this fit?" in a second for a 70B model as for a tiny one.  The same estimate is
the one-line `Memory:` entry of every run's header and the basis of the out-of-memory advice.

Peak = weights + trainable parameters + their gradients + optimizer state
       + saved activations (or checkpointed block inputs) + logits,
at batch_size x the longest batch's tokens (batches are length-sorted, so the longest batch
holds the longest sequences).  The activation terms were fitted on MLX's own peak counter
(`mx.get_peak_memory`, CPU) for a llama block; see tests/test_planner.py for the measured ratio.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from mlxft.adapters.targets import LinearInfo, block_index, select_layers, select_targets
from mlxft.device import machine_memory
from mlxft.errors import UserError
from mlxft.model_dir import read_model_config, weight_files

GB = 1e9
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_NAMED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# --------------------------------------------------------------------------- metadata
def read_header(path: Path) -> dict:
    """{tensor name: (dtype, shape)} from a safetensors file's JSON header (the first bytes)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def model_tensors(model_dir: Path) -> dict:
    tensors: dict = {}
    for file in weight_files(model_dir):
        tensors.update(read_header(file))
    return tensors


@dataclass
class Shape:
    """The sizes of a llama-style decoder that set activation memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        text = config.get("text_config") or {}
        get = lambda k, default=None: config.get(k, text.get(k, default))  # noqa: E731
        hidden = get("hidden_size") or get("n_embd") or get("d_model")
        layers = get("num_hidden_layers") or get("n_layer") or get("num_layers")
        heads = get("num_attention_heads") or get("n_head")
        vocab = get("vocab_size")
        if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
            raise UserError(
                "config.json: hidden_size, num_hidden_layers, num_attention_heads and vocab_size "
                "are needed to plan memory"
            )
        return cls(
            hidden=hidden,
            intermediate=get("intermediate_size") or 4 * hidden,
            layers=layers,
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            vocab=vocab,
        )


def _quant_bits(tensors: dict, name: str, config: dict) -> int | None:
    if name.endswith(".weight") and name[: -len("weight")] + "scales" in tensors:
        return int((config.get("quantization") or {}).get("bits", 4))
    return None


def linear_infos(tensors: dict, config: dict) -> list:
    """The block-level linear modules, as a backend would list them, from 2-D `.weight` shapes."""
    found = []
    for name, (_, shape) in tensors.items():
        if not name.endswith(".weight") or len(shape) != 2 or block_index(name) is None:
            continue
        path = name[: -len(".weight")]
        if path.endswith(("embed_tokens", "norm")):
            continue
        out_features, width = shape
        bits = _quant_bits(tensors, name, config)
        found.append(LinearInfo(path, width * 32 // bits if bits else width, out_features))
    return sorted(found, key=lambda i: (block_index(i.path), i.path))


# --------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    """Bytes of each part of the training peak."""

    weights: int
    weights_desc: str
    trainable: int  # trainable parameter count
    params: int  # their bytes (LoRA: float32)
    grads: int
    optimizer: int
    activations: int  # with the run's grad_checkpoint setting
    activations_other: int  # with it flipped, for advice
    logits: int
    batch_size: int
    tokens: int  # width of the longest batch
    grad_checkpoint: bool

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.params
            + self.grads
            + self.optimizer
            + self.activations
            + self.logits
        )

    def parts(self) -> list:
        return [
            ("weights", self.weights),
            ("trainable", self.params),
            ("grads", self.grads),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
        ]

    def summary(self) -> str:
        ckpt = "checkpointed " if self.grad_checkpoint else ""
        return (
            f"~{_gb(self.total)} peak = weights {_gb(self.weights)} ({self.weights_desc}) + "
            f"trainable "
            f"{_gb(self.params + self.grads + self.optimizer)} (params, grads, optimizer) + "
            f"{ckpt}activations "
            f"{_gb(self.activations)} + logits {_gb(self.logits)} at "
            f"{self.batch_size}x{self.tokens} tokens"
        )


def _gb(n: float) -> str:
    if n < GB:
        return f"{n / 1e6:.1f} MB"
    return f"{n / GB:.2f} GB" if n < 10 * GB else f"{n / GB:.1f} GB"


def _weights(tensors: dict, config: dict, cfg) -> tuple:
    """Bytes of the frozen base as the backend will hold it (after dtype cast or quantize)."""
    total, kinds = 0, {}
    target = _NAMED_BYTES.get(cfg.dtype)
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape)
        size = _DTYPE_BYTES.get(dtype, 4)
        floating = dtype in ("F32", "F16", "BF16", "F64")
        if floating and target:
            size = target
        if cfg.quantize and floating and len(shape) == 2 and shape[-1] % cfg.q_group_size == 0:
            groups = n // cfg.q_group_size
            total += n * cfg.quantize // 8 + 2 * groups * size  # packed weights + scales and biases
            kinds[f"{cfg.quantize}-bit"] = 1
            continue
        total += n * size
        bits = _quant_bits(tensors, name, config)
        kinds[
            f"{bits}-bit"
            if bits
            else (cfg.dtype if floating and target else _DTYPE_NAMES.get(dtype, dtype.lower()))
        ] = 1
    return total, "+".join(sorted(kinds)) or "empty"


def _compute_bytes(tensors: dict, cfg) -> int:
    """Element size of activations: the model's floating dtype (scales' dtype when quantized)."""
    if cfg.dtype in _NAMED_BYTES:
        return _NAMED_BYTES[cfg.dtype]
    for dtype, _ in tensors.values():
        if dtype in ("F32", "F16", "BF16"):
            return _DTYPE_BYTES[dtype]
    return 4


def _activations(
    shape: Shape,
    batch: int,
    tokens: int,
    elem: int,
    rank: int,
    targets_per_layer: int,
    layers: int,
    checkpoint: bool,
) -> int:
    """Saved activations of `layers` llama blocks (those from the first trained block up).

    Per token and block: norms' inputs and outputs (4d), q, rope'd q, attention output (3 q-width),
    k, v, rope'd k (3 kv-width), o_proj output and residual (2d), MLP gate, up, act, product (4f),
    down output (2d) and each adapter's x·Aᵀ (r), as tests/test_planner.py checks against MLX.
    Attention probabilities are B·H·T² per block, plus ~2 blocks' worth live during a block's
    backward.  Checkpointing keeps only each block's input and recomputes one block at a time
    (~3 blocks' tensors and 4 blocks' probabilities live at its peak)."""
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = (
        elem * (8 * shape.hidden + 3 * q_width + 3 * kv_width + 4 * shape.intermediate)
        + 4 * rank * targets_per_layer
    )
    block = batch * tokens * per_token
    scores = batch * shape.heads * tokens * tokens * elem
    plain = layers * block + (layers + 2) * scores
    if checkpoint:  # never more than without: with few blocks there is little to save
        return min(plain, layers * batch * tokens * shape.hidden * elem + 3 * block + 4 * scores)
    return plain


def estimate(cfg, model_dir: Path, longest: int, tensors: dict | None = None) -> Estimate:
    """Peak training memory for `cfg` on the model in `model_dir`; `longest` = tokens of the
    longest training example (after max_seq_length truncation)."""
    config = read_model_config(Path(model_dir))
    tensors = model_tensors(model_dir) if tensors is None else tensors
    shape = Shape.from_config(config)
    weights, desc = _weights(tensors, config, cfg)
    elem = _compute_bytes(tensors, cfg)
    batch, width = cfg.batch_size, max(1, min(longest, cfg.max_seq_length) - 1)
    if cfg.fine_tune_type == "full":
        layers = select_layers(shape.layers, cfg.num_layers)
        trained = [n for n in tensors if cfg.num_layers == -1 or block_index(n) in layers]
        trainable = sum(math.prod(tensors[n][1]) for n in trained)
        params, rank, per_layer = 0, 0, 0  # the weights themselves, already counted
        state_bytes = elem
        first = 0 if cfg.num_layers == -1 else layers[0]
    else:
        linears = linear_infos(tensors, config)
        plan = select_targets(linears, shape.layers, cfg)
        trainable = sum(plan.rank * (t.in_features + t.out_features) for t in plan.targets)
        if plan.kind == "dora":
            trainable += sum(t.out_features for t in plan.targets)
        params, rank, state_bytes = 4 * trainable, plan.rank, 4
        per_layer = len(plan.targets) // max(1, len(plan.layers))
        first = plan.layers[0]
        if plan.kind == "dora":  # each DoRA layer keeps its merged fp32 weight for the backward
            params += sum(4 * t.in_features * t.out_features for t in plan.targets)
    grads = trainable * state_bytes * (2 if cfg.grad_accumulation_steps > 1 else 1)
    optimizer = trainable * state_bytes * (2 if cfg.optimizer in ("adam", "adamw") else 1)
    saved_layers = shape.layers - first
    acts = {
        ck: _activations(shape, batch, width, elem, rank, per_layer, saved_layers, ck)
        for ck in (False, True)
    }
    logits = 3 * batch * width * shape.vocab * 4
    return Estimate(
        weights,
        desc,
        trainable,
        params,
        grads,
        optimizer,
        acts[bool(cfg.grad_checkpoint)],
        acts[not cfg.grad_checkpoint],
        logits,
        batch,
        width,
        bool(cfg.grad_checkpoint),
    )


# --------------------------------------------------------------------------- machine
def knobs(cfg, model_dir: Path, longest: int, budget: int, tensors: dict | None = None) -> list:
    """Single changes that bring the estimate under `budget`, each with its new estimate."""
    options = []
    if not cfg.grad_checkpoint:
        options.append(("--grad-checkpoint", replace(cfg, grad_checkpoint=True)))
    if cfg.batch_size > 1:
        b = max(1, cfg.batch_size // 2)
        options.append(
            (
                f"--batch-size {b} (with --grad-accumulation-steps "
                f"{cfg.grad_accumulation_steps * 2} "
                "to keep the effective batch)",
                replace(cfg, batch_size=b),
            )
        )
    seq = min(cfg.max_seq_length, longest)
    if seq > 64:
        options.append((f"--max-seq-length {seq // 2}", replace(cfg, max_seq_length=seq // 2)))
    if cfg.fine_tune_type == "full" or cfg.quantize is None:
        options.append(
            (
                "--fine-tune-type lora --quantize 4 (QLoRA)",
                replace(cfg, fine_tune_type="lora", quantize=4),
            )
        )
    out = []
    for text, alt in options:
        try:
            total = estimate(alt, model_dir, longest, tensors).total
        except UserError:
            continue
        out.append((text, total, total <= budget))
    return out


def verdict(est: Estimate, budget: int, what: str, advice: list) -> str:
    if not budget:
        return f"machine memory unknown ({what}); estimate {_gb(est.total)}"
    share = est.total / budget
    if share <= 0.75:
        return f"fits: {_gb(est.total)} of {_gb(budget)} {what} ({100 * share:.0f}%)"
    fixes = [f"{text} (~{_gb(total)})" for text, total, ok in advice if ok] or [
        f"{text} (~{_gb(total)})" for text, total, _ in advice[:2]
    ]
    word = "tight" if share <= 1.0 else "does not fit"
    return (
        f"{word}: {_gb(est.total)} of {_gb(budget)} {what} ({100 * share:.0f}%); try "
        + "; or ".join(fixes)
    )


def plan_lines(cfg, model_dir: Path, longest: int) -> list:
    """The `--dry-run` report."""
    tensors = model_tensors(model_dir)
    est = estimate(cfg, model_dir, longest, tensors)
    budget, what = machine_memory(cfg.backend)
    lines = [
        f"Memory plan for {cfg.model} ({cfg.fine_tune_type}, batch {est.batch_size} x {est.tokens} "
        f"tokens, "
        f"grad_checkpoint {'on' if est.grad_checkpoint else 'off'}):"
    ]
    for name, value in est.parts():
        lines.append(f"  {name:<12} {_gb(value):>12}")
    lines.append(
        f"  {'total':<12} {_gb(est.total):>12}   (trainable parameters: {est.trainable / 1e6:.3f}M)"
    )
    other = "on" if not est.grad_checkpoint else "off"
    lines.append(f"  activations with grad_checkpoint {other}: {_gb(est.activations_other)}")
    lines.append(verdict(est, budget, what, knobs(cfg, model_dir, longest, budget, tensors)))
    return lines


def header_line(cfg, model_dir: Path, longest: int) -> tuple:
    """(the run header's `Memory:` line, the estimate or None).  Advisory: a model the planner
    cannot read still trains."""
    try:
        tensors = model_tensors(model_dir)
        est = estimate(cfg, model_dir, longest, tensors)
        budget, what = machine_memory(cfg.backend)
        advice = (
            knobs(cfg, model_dir, longest, budget, tensors) if est.total > 0.75 * budget else []
        )
    except (UserError, KeyError, ValueError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"Memory: no estimate ({reason})", None
    return f"Memory: {est.summary()}; {verdict(est, budget, what, advice)}", est


def dry_run(cfg) -> list:
    """`mlxft lora --dry-run`: the memory plan from config, data and model metadata; reads the
    same inputs as a run (`read_inputs`), writes nothing, loads no weights."""
    from mlxft.config import total_iters
    from mlxft.data import epoch_batches
    from mlxft.data.preference import pair_epoch_batches
    from mlxft.training.inputs import read_inputs

    inputs = read_inputs(cfg)
    train = inputs.splits["train"]
    longest = max(len(s) for s in train.sequences)
    pairs = cfg.train_mode != "sft"  # a batch of pairs holds 2 x batch_size rows
    make = pair_epoch_batches if pairs else epoch_batches
    batches = make(train, cfg.batch_size, seed=cfg.seed, epoch=0, pad_id=0)
    lines = [
        f"Data train: {len(train)} {'pairs' if pairs else 'examples'}, longest {longest} tokens, "
        f"{len(batches)} batches per epoch, {total_iters(cfg, len(batches))} steps"
    ]
    rows = replace(cfg, batch_size=2 * cfg.batch_size) if pairs else cfg
    return lines + plan_lines(rows, inputs.model_path, longest)
