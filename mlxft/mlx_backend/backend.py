"""MLX backend: load with mlx-lm, wrap the planned linears with LoRA, train with a compiled step.

Implements the small interface in `mlxft.backend` (load, add adapters, train step, eval,
adapter weights, memory).  Everything that is not tensor work lives in backend-neutral code.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxft import flags
from mlxft.adapters.files import match_adapter_weights, peft_key
from mlxft.adapters.targets import AdapterPlan, LinearInfo, block_index, full_layers
from mlxft.backend import StepResult, checkpointed_blocks, head_note
from mlxft.data.batching import head_rows
from mlxft.errors import UserError
from mlxft.mlx_backend.arrays import numpy_weights
from mlxft.mlx_backend.attention import fast_attention
from mlxft.mlx_backend.dora import DoRALinear
from mlxft.mlx_backend.lora import LoRALinear, linear_shape
from mlxft.mlx_backend.loss import HeadLoss, loss_sum
from mlxft.model_dir import read_model_config
from mlxft.training.world import World

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def load_mlx_model(model_path: Path, dtype: str = "auto", trust_remote_code: bool = False):
    """mlx-lm model + its config dict (config normalised for transformers-5 files)."""
    from mlx_lm.utils import load_model

    raw = read_model_config(model_path)
    import json

    on_disk = json.loads((model_path / "config.json").read_text())
    fixes = {k: v for k, v in raw.items() if k not in on_disk}
    try:
        model, config = load_model(
            model_path, model_config=fixes, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as err:
        # config.json or weights that check_model_dir could not tell apart from good ones
        message = (str(err).splitlines() or [""])[0] or type(err).__name__
        if "trust_remote_code" in message:
            raise UserError(
                f"{model_path}: needs custom code; pass --trust-remote-code if you trust it"
            ) from None
        raise UserError(
            f"{model_path}: mlx-lm cannot load this model ({type(err).__name__}: {message[:200]})"
        ) from None
    if dtype != "auto":
        target = _DTYPES[dtype]
        model.update(
            tree_map(
                lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                model.parameters(),
            )
        )
    return model, config


def _checkpointed_class(cls):
    """A subclass of the block class whose __call__ recomputes activations in the backward
    pass (mx.checkpoint).  Assigned per instance, so other models in the process (mlx-lm patches
    the shared class for good) are untouched."""
    forward = cls.__call__

    def checkpointed(module, *args, **kwargs):
        def inner(params, *args, **kwargs):
            module.update(params)
            return forward(module, *args, **kwargs)

        return mx.checkpoint(inner)(module.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed})


def _checkpoint_blocks(blocks) -> None:
    """Recompute the transformer blocks' activations in the backward pass (all but the last:
    mlxft.backend.checkpointed_blocks)."""
    classes = {}
    for block in (blocks[i] for i in checkpointed_blocks(len(blocks))):
        cls = type(block)
        if cls.__name__.startswith("Checkpointed"):
            continue
        if cls not in classes:
            classes[cls] = _checkpointed_class(cls)
        block.__class__ = classes[cls]


def cpu_kernels() -> bool:
    """Whether the CPU-specific fast paths are on: eager steps on the CPU, unless
    MLXFT_CPU_KERNELS=0 (for A/B runs and for ruling them out when debugging)."""
    if not flags.cpu_kernels():
        return False
    return mx.default_device().type == mx.cpu and not use_compile()


def use_compile() -> bool:
    """mx.compile pays on the GPU.  On the CPU every new batch shape costs a C++ kernel build
    (seconds), and length-sorted batches have many shapes, so compiled CPU steps are slower
    than eager ones and the CPU runs eagerly.  MLXFT_COMPILE=1/0 overrides."""
    forced = flags.compile_steps()
    return forced if forced is not None else mx.default_device().type == mx.gpu


class MLXBackend:
    name = "mlx"

    def __init__(self, cfg, world: World | None = None):
        self.cfg = cfg
        self.world = world or World()
        self.model = None
        self.config = None
        self.optimizer = None
        self._step = None
        self._eval = None
        self._loss = loss_sum
        self.training_notes = []
        self._generation = None
        self._mode_before_generation = None  # the model's training flag, restored at the end
        self._reference = None  # full fine-tuning's frozen DPO reference, loaded when first used
        self._comm = None
        if self.world.distributed:
            from mlxft.mlx_backend.collectives import Collectives

            self._comm = Collectives(self.world)

    @property
    def comm_seconds(self) -> float:
        return self._comm.seconds if self._comm else 0.0

    # ---------------------------------------------------------------- load
    @property
    def device(self) -> str:
        dev = mx.default_device()
        if dev.type == mx.gpu:
            return "metal" if mx.metal.is_available() else "gpu"
        return "cpu"

    def load(self, model_path: Path) -> None:
        self.model, self.config = load_mlx_model(
            model_path, self.cfg.dtype, self.cfg.trust_remote_code
        )
        if self.cfg.quantize:
            from mlx_lm.utils import quantize_model

            if self.quantized:
                bits = self.config.get("quantization", {}).get("bits", "?")
                raise UserError(
                    f"{model_path}: already quantized ({bits} bits); drop quantize/--quantize "
                    "(QLoRA trains on it as it is)"
                )

            self.model, self.config = quantize_model(
                self.model, self.config, group_size=self.cfg.q_group_size, bits=self.cfg.quantize
            )
        # materialise now: a lazy quantize (or dtype cast) keeps the source weights alive until
        # the first training step, whose peak memory would then hold both copies
        mx.eval(self.model.parameters())
        self.model.freeze()
        if self.cfg.fine_tune_type == "full":
            self._unfreeze_full()

    def _unfreeze_full(self) -> None:
        """Full fine-tuning: make the planned blocks (or the whole model) trainable."""
        if self.quantized:
            raise UserError(
                f"{self.cfg.model}: fine_tune_type full trains the weights themselves, which a "
                f"quantized "
                "model cannot; use a full-precision model, or fine_tune_type lora/dora (QLoRA)"
            )
        layers, everything = full_layers(self.num_blocks(), self.cfg.num_layers)
        if everything:
            self.model.unfreeze()
        for i in layers:
            self.model.layers[i].unfreeze()

    @property
    def dtype(self) -> str:
        for _, p in tree_flatten(self.model.parameters()):
            if mx.issubdtype(p.dtype, mx.floating):
                return str(p.dtype).replace("mlx.core.", "")
        return "float32"

    @property
    def quantized(self) -> bool:
        return any(isinstance(m, nn.QuantizedLinear) for _, m in self.model.named_modules())

    def num_blocks(self) -> int:
        return len(self.model.layers)

    def linear_modules(self) -> list:
        found = []
        for path, module in self.model.named_modules():
            if (
                isinstance(module, (nn.Linear, nn.QuantizedLinear))
                and block_index(path) is not None
            ):
                fin, fout = linear_shape(module)
                found.append(LinearInfo(path, fin, fout))
        return sorted(found, key=lambda i: (block_index(i.path), i.path))

    # ---------------------------------------------------------------- adapters
    def add_adapters(self, plan: AdapterPlan) -> None:
        modules = dict(self.model.named_modules())
        wrapped = []
        for target in plan.targets:
            a, b = plan.init[target.path]
            layer = DoRALinear if plan.kind == "dora" else LoRALinear
            wrapped.append(
                (target.path, layer(modules[target.path], a, b, plan.scale, plan.dropout))
            )
        self.model.update_modules(tree_unflatten(wrapped))
        self.plan = plan

    def _lora_layers(self):
        return [(p, m) for p, m in self.model.named_modules() if isinstance(m, LoRALinear)]

    def adapter_weights(self) -> dict:
        weights = {}
        for path, layer in self._lora_layers():
            weights[peft_key(path, "lora_A")] = np.array(layer.lora_A)
            weights[peft_key(path, "lora_B")] = np.array(layer.lora_B)
            if isinstance(layer, DoRALinear):
                weights[peft_key(path, "lora_magnitude_vector")] = np.array(
                    layer.lora_magnitude_vector
                )
        return weights

    def model_weights(self) -> dict:
        """Every weight under its Hugging Face name (mlx-lm keeps them), for saving a full
        fine-tune."""
        return numpy_weights(dict(tree_flatten(self.model.parameters())))

    def fused_weights(self) -> dict:
        from mlxft.mlx_backend.fuse import fused_weights

        return fused_weights(self.model)

    def fused_tensors(self) -> list:
        from mlxft.mlx_backend.fuse import fused_tensors

        return fused_tensors(self.model)

    def set_adapter_weights(self, weights: dict) -> None:
        for layer, name, value in match_adapter_weights(
            weights, dict(self._lora_layers()), self.plan.kind
        ):
            setattr(layer, name, mx.array(value, dtype=mx.float32))
        mx.eval(self.model.parameters())

    def parameter_counts(self) -> tuple:
        """(trainable, total) parameter counts; quantized weights counted as their dense size."""
        trainable = sum(p.size for _, p in tree_flatten(self.model.trainable_parameters()))
        total = 0
        for _, module in self.model.named_modules():
            own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
            if (
                "scales" in own
            ):  # QuantizedLinear / QuantizedEmbedding: uint32 words of 32 // bits weights
                rows, words = own["weight"].shape
                total += rows * words * 32 // module.bits + (
                    own["bias"].size if "bias" in own else 0
                )
            else:
                total += sum(v.size for v in own.values())
        return trainable, total

    # ---------------------------------------------------------------- training
    def setup_training(self, cfg) -> None:
        # dropout masks: reproducible, part of a checkpoint's RNG state, a stream per rank
        mx.random.seed(self.world.dropout_seed(cfg.seed))
        opt = cfg.optimizer
        extra = cfg.optimizer_options  # validated in mlxft.config
        if opt == "adamw":
            self.optimizer = optim.AdamW(
                learning_rate=cfg.learning_rate,
                weight_decay=cfg.weight_decay,
                bias_correction=True,
                **extra,
            )
        elif opt == "adam":
            self.optimizer = optim.Adam(
                learning_rate=cfg.learning_rate, bias_correction=True, **extra
            )
        else:
            self.optimizer = optim.SGD(
                learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, **extra
            )
        if cfg.grad_checkpoint:
            _checkpoint_blocks(self.model.layers)
        self.model.train()
        model, optimizer, clip = self.model, self.optimizer, cfg.grad_clip
        self._loss = self._choose_loss()
        split = isinstance(self._loss, HeadLoss)
        self.training_notes = [head_note(split, split and self._loss.chunked)]
        if mx.default_device().type == mx.cpu:
            from mlxft.cpu import blas, malloc

            self.training_notes[:0] = [f"BLAS: {blas.status()}", self._cpu_note(malloc.tune())]
        value_and_grad = nn.value_and_grad(model, self._loss)
        state = [model.state, optimizer.state, mx.random.state]

        compiled = (
            partial(mx.compile, inputs=state, outputs=state) if use_compile() else (lambda f: f)
        )

        @compiled
        def grads_of(inputs, targets, mask, *rows):
            (total, count), grads = value_and_grad(model, inputs, targets, mask, *rows)
            return total, count, grads

        @compiled
        def apply(grads, count):
            grads = tree_map(lambda g: g / count, grads)
            if clip:
                grads, norm = optim.clip_grad_norm(grads, clip)
            else:
                norm = _global_norm(grads)
            optimizer.update(model, grads)
            return norm

        self._grads_of, self._apply, self._state = grads_of, apply, state
        # evaluated after the step's own graph: inside it, it changes MLX's evaluation order and
        # with it the step's peak memory, which the memory planner is calibrated against
        self._usable = mx.compile(_usable) if use_compile() else _usable

    def _choose_loss(self):
        """The head split off the model when that is exact for it (mlxft.mlx_backend.loss): the
        head then runs on trained rows only (`head_rows`; MLXFT_HEAD_ROWS=0: on every row), and
        on the CPU as the chunked head loss (no second exp pass, no full logits; off with
        MLXFT_CPU_KERNELS=0).  Otherwise the plain loss."""
        return HeadLoss.of(self.model, chunked=cpu_kernels()) or loss_sum

    def _rows(self, batch) -> tuple:
        """The extra step argument: trained positions, when the head runs on those only."""
        if not isinstance(self._loss, HeadLoss):
            return ()
        rows = head_rows(batch.mask, multiple=32 if use_compile() else 1)
        return () if rows is None else (mx.array(rows),)

    def _cpu_note(self, allocator: str) -> str:
        if not cpu_kernels():
            return f"CPU paths: off (MLXFT_CPU_KERNELS=0 or compiled); allocator: {allocator}"
        return f"CPU paths: power-exp attention; allocator: {allocator}"

    def _kernels(self):
        """The CPU's attention for the steps built inside (mlxft.mlx_backend.attention)."""
        return fast_attention(self.model) if cpu_kernels() else contextlib.nullcontext()

    def train_step(self, batches: list, lr: float, stop: bool = False) -> StepResult:
        """One optimizer step over `batches` (this rank's shares of the grad-accumulation
        group); in a distributed world the gradient sums, loss sums and token counts are summed
        over the ranks (`Collectives.step`) before the update, so it is the single-process one."""
        self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
        acc, total, count = None, mx.array(0.0), mx.array(0.0)
        with self._kernels():
            for batch in batches:
                if not len(batch.lengths):  # an epoch's short last batch left this rank no row
                    continue
                t, c, g = self._grads_of(
                    mx.array(batch.inputs),
                    mx.array(batch.targets),
                    mx.array(batch.mask),
                    *self._rows(batch),
                )
                acc = g if acc is None else tree_map(mx.add, acc, g)
                total, count = total + t, count + c
        if self._comm:
            if acc is None:
                acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
            acc, total, count, stop = self._comm.step(acc, total, count, stop)
        norm = self._apply(acc, count)
        mx.eval(self._state, total, count, norm)
        usable = self._usable(self.model.trainable_parameters(), self.optimizer.state)
        return StepResult(total.item(), int(count.item()), norm.item(), bool(usable.item()), stop)

    def preference_step(self, batches: list, lr: float | None, spec, stop: bool = False) -> dict:
        """DPO/ORPO over this rank's PairBatch shares of a group: an optimizer step at `lr`, or
        an evaluation (lr None); the world's sums named in mlxft.training.preference."""
        from mlxft.mlx_backend.preference import preference_step

        return preference_step(self, batches, lr, spec, stop)

    def frozen_reference(self) -> tuple:
        """(model, head split) of the starting model, frozen: full fine-tuning's DPO reference,
        loaded once from cfg.model (a resumed full run's weights are the checkpoint's)."""
        if self._reference is None:
            from mlxft.hub import resolve_model

            cfg = self.cfg
            model, _ = load_mlx_model(
                resolve_model(cfg.model, cfg.revision), cfg.dtype, cfg.trust_remote_code
            )
            model.freeze()
            model.eval()
            mx.eval(model.parameters())
            self._reference = (model, HeadLoss.of(model, chunked=cpu_kernels()))
        return self._reference

    def all_gather(self, values: np.ndarray) -> np.ndarray:
        if self._comm is None:
            return np.asarray(values)[None]
        return self._comm.all_gather(values)

    def eval_loss(self, batches: list) -> tuple:
        """(sum of token losses, token count) over `batches`, dropout off; in a distributed
        world summed over every rank's batches."""
        total, count = self._local_eval(batches)
        if self._comm is None:
            return total, count
        rows = self._comm.all_gather(np.array([total, count], dtype=np.float64))
        return float(rows[:, 0].sum()), int(rows[:, 1].sum())

    def _local_eval(self, batches: list) -> tuple:
        self.model.eval()
        total, count = 0.0, 0
        fn = self._eval or partial(self._loss, self.model)
        if self._eval is None and use_compile():
            fn = mx.compile(fn, inputs=self.model.state)
        self._eval = fn
        for batch in batches:
            if not len(batch.lengths):
                continue
            with self._kernels():
                t, c = fn(
                    mx.array(batch.inputs),
                    mx.array(batch.targets),
                    mx.array(batch.mask),
                    *self._rows(batch),
                )
            mx.eval(t, c)
            total, count = total + t.item(), count + int(c.item())
        self.model.train()
        return total, count

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits for a (B, T) batch, dropout off (tests, parity checks); the training
        mode is restored so a call in the middle of training does not turn LoRA dropout off."""
        training = self.model.training
        self.model.eval()
        out = np.array(self.model(mx.array(input_ids)).astype(mx.float32))
        self.model.train(training)
        return out

    def start_generation(self, prompt_ids: list) -> np.ndarray:
        """New KV cache, prefill `prompt_ids`; float32 logits of the last position, (vocab,)."""
        from mlxft.mlx_backend.generate import KVGeneration

        self._remember_mode()
        self.model.eval()
        self._generation = KVGeneration(self.model)
        return self._generation.start(prompt_ids)

    def next_logits(self, token_id: int) -> np.ndarray:
        """Feed one generated token through the cache; logits for the next position."""
        return self._generation.step(token_id)

    def start_batch_generation(self, prompts: list) -> np.ndarray:
        """Prefill several prompts (left-padded); float32 logits (B, vocab) of each last token."""
        from mlxft.mlx_backend.generate import BatchKVGeneration

        self._remember_mode()
        self.model.eval()
        self._generation = BatchKVGeneration(self.model, prompts)
        return self._generation.start()

    def next_batch_logits(self, token_ids: list) -> np.ndarray:
        """Feed one token per row through the batched cache; logits (B, vocab)."""
        return self._generation.step(token_ids)

    def end_generation(self) -> None:
        """Drop the KV cache and restore the mode from before generation (LoRA dropout)."""
        self._generation = None
        if self._mode_before_generation is not None:
            self.model.train(self._mode_before_generation)
        self._mode_before_generation = None

    def _remember_mode(self) -> None:
        if self._mode_before_generation is None:
            self._mode_before_generation = self.model.training

    # ---------------------------------------------------------------- resume
    def optimizer_state(self) -> dict:
        """Flat {PEFT key + .exp_avg/.exp_avg_sq/.momentum_buffer, step: np.ndarray} (see
        optim_state)."""
        from mlxft.mlx_backend.optim_state import export_state

        return export_state(self.optimizer, self.cfg.optimizer)

    def load_optimizer_state(self, state: dict) -> None:
        from mlxft.mlx_backend.optim_state import import_state

        import_state(self.optimizer, self.cfg.optimizer, self.model.trainable_parameters(), state)

    def rng_state(self) -> dict:
        return {"mlx.key": np.array(mx.random.state[0], dtype=np.uint32)}

    def set_rng_state(self, state: dict) -> None:
        """MLX has no setter for its global key, but seed(s) sets it to key(s) = [s >> 32, s &
        0xffffffff]."""
        if "mlx.key" not in state:
            raise UserError("RNG state has no 'mlx.key': it was saved by another backend")
        hi, lo = (int(x) for x in np.asarray(state["mlx.key"], dtype=np.uint32).reshape(2))
        mx.random.seed((hi << 32) | lo)

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()


def _usable(weights, optimizer_state) -> mx.array:
    """True when the weights' float32 sum of squares and every optimizer value are finite
    (`mlxft.backend.StepResult.weights_finite`): one reduction on the device, compiled (fused)
    where the steps are."""
    squares = sum(mx.sum(mx.square(w.astype(mx.float32))) for _, w in tree_flatten(weights))
    ok = mx.isfinite(squares)
    for _, value in tree_flatten(optimizer_state):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            ok = mx.logical_and(ok, mx.all(mx.isfinite(value)))
    return ok


def _global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))
