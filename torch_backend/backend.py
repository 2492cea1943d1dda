"""PyTorch backend: transformers' architectures, our LoRA layers, the MLX backend's training math.

Implements the interface in `mlxft.backend` so `mlxft.training.session.Session` runs unchanged.
What
must match the MLX backend for loss parity: the loss (sum of fp32 token cross-entropies
over the mask, no attention mask: right padding only ever follows real tokens), gradient
accumulation (sum over the group, divided by the group's trained tokens), clipping and the
optimizer (see `mlxft.torch_backend.optim`).  The base model stays in eval mode throughout, as
mlx-lm's architectures have no dropout: only the LoRA dropout (and the checkpointing flag)
switch on for training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlxft.adapters.files import match_adapter_weights, peft_key
from mlxft.adapters.targets import AdapterPlan, LinearInfo, block_index, full_layers
from mlxft.backend import (
    StepResult,
    checkpointed_blocks,
    head_note,
    head_probe,
    head_split_exact,
)
from mlxft.data.batching import head_rows
from mlxft.errors import UserError
from mlxft.model_dir import BF16
from mlxft.torch_backend.device import (
    MemoryMeter,
    pick_device,
    pick_dtype,
    rng_state,
    set_rng_state,
)
from mlxft.torch_backend.dora import DoRALinear
from mlxft.torch_backend.generate import BatchKVGeneration, KVGeneration
from mlxft.torch_backend.lora import LoRALinear
from mlxft.torch_backend.optim import load_optimizer_state, make_optimizer, optimizer_state
from mlxft.training.world import World


def to_numpy(t: torch.Tensor):
    """A tensor as numpy in its own dtype; bfloat16 as its raw bits (`BF16`), exactly."""
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        return BF16(t.contiguous().view(torch.int16).numpy().view(np.uint16).copy())
    return t.numpy().copy()


def _float32_loader(t: torch.Tensor):
    return lambda: t.detach().to("cpu", torch.float32).numpy().copy()


def _fused_loader(layer):
    @torch.no_grad()
    def load():
        return layer.fused_weight().to("cpu", torch.float32).numpy().copy()

    return load


def refuse_quantized(model_path: Path, config: dict) -> None:
    """MLX-quantized weights (packed uint32 + scales) mean nothing to transformers."""
    quant = config.get("quantization")
    if quant:
        bits = f"{quant.get('bits')}-bit " if isinstance(quant, dict) else ""
        raise UserError(
            f"{model_path}: this is a {bits}quantized MLX model, which the torch backend cannot "
            f"load; "
            f"use --backend mlx, or de-quantize it: mlxft convert --to-hf --mlx-path {model_path} "
            f"--hf-path OUT_DIR"
        )


def load_hf_model(model_path: Path, dtype: torch.dtype, trust_remote_code: bool):
    import transformers
    from transformers.utils import is_torch_available
    from transformers.utils import logging as hf_logging

    if not is_torch_available():  # e.g. transformers 5 with torch < 2.6: it hides its model classes
        raise UserError(
            f"transformers {transformers.__version__} cannot use torch {torch.__version__}; "
            "upgrade one of them (pip install -U torch transformers)"
        )
    from transformers import AutoModelForCausalLM

    # transformers >= 4.56 renamed `torch_dtype` to `dtype` (and warns on the old name)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the report starts with the model line, as on MLX
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(model_path),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **{dtype_kw: dtype},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "trust_remote_code" in str(err):
            raise UserError(
                f"{model_path}: needs custom code; pass --trust-remote-code if you trust it"
            ) from None
        raise UserError(f"{model_path}: transformers cannot load this model: {message}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()


class TorchBackend:
    name = "torch"

    def __init__(self, cfg, world: World | None = None):
        self.cfg = cfg
        self.world = world or World()
        self.training_notes = []
        self._device = pick_device(cfg.device)
        self._comm = None
        if self.world.distributed:
            self._connect()
        self._dtype = None
        self.model = None
        self.optimizer = None
        self.plan = None
        self.memory = MemoryMeter(self._device)
        self._steps = 0
        self._checkpointing = False
        self._training = None
        self._generation = None
        self._mode_before_generation = None  # the training flag, restored by end_generation
        self._split = None  # (body, head) when the output head can run on trained positions only
        self._reference = None  # full fine-tuning's frozen DPO reference, loaded when first used

    def _connect(self) -> None:
        """torchrun's world: one GPU per process on CUDA (LOCAL_RANK), then the group."""
        import atexit

        from mlxft.torch_backend.collectives import Collectives

        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", self.world.local_rank)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._comm = Collectives(self.world, self._device)
        atexit.register(self._comm.close)

    @property
    def comm_seconds(self) -> float:
        return self._comm.seconds if self._comm else 0.0

    # ---------------------------------------------------------------- load
    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> str:
        return str(self._dtype).replace("torch.", "")

    @property
    def quantized(self) -> bool:
        return False  # `load` refuses MLX-quantized models

    def load(self, model_path: Path) -> None:
        model_path = Path(model_path)
        config = json.loads((model_path / "config.json").read_text())
        refuse_quantized(model_path, config)
        stored = config.get("dtype") or config.get("torch_dtype")
        self._dtype = pick_dtype(self.cfg.dtype, self._device, stored)
        model = load_hf_model(model_path, self._dtype, self.cfg.trust_remote_code)
        model.to(self._device)
        model.requires_grad_(False)
        if self.cfg.fine_tune_type == "full":
            self._unfreeze_full(model)
        model.config.use_cache = False  # training never reads a cache; generation asks for one
        self.model = model
        self._set_training(False)

    def _blocks(self, model) -> nn.ModuleList:
        for path, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and path.rsplit(".", 1)[-1] == "layers":
                return module
        raise UserError(f"{self.cfg.model}: no transformer blocks ('layers') found in this model")

    def num_blocks(self) -> int:
        return len(self._blocks(self.model))

    def _unfreeze_full(self, model) -> None:
        """Full fine-tuning: the planned blocks (or the whole model) train, as on MLX."""
        blocks = self._blocks(model)
        layers, everything = full_layers(len(blocks), self.cfg.num_layers)
        for module in [model] if everything else [blocks[i] for i in layers]:
            module.requires_grad_(True)

    def linear_modules(self) -> list:
        found = []
        for path, module in self.model.named_modules():
            if (
                type(module) is nn.Linear
                and block_index(path) is not None
                and not path.endswith(".base")
            ):
                found.append(LinearInfo(path, module.in_features, module.out_features))
        return sorted(found, key=lambda i: (block_index(i.path), i.path))

    # ---------------------------------------------------------------- adapters
    def add_adapters(self, plan: AdapterPlan) -> None:
        for target in plan.targets:
            parent_path, _, child = target.path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            a, b = plan.init[target.path]
            layer = DoRALinear if plan.kind == "dora" else LoRALinear
            setattr(parent, child, layer(getattr(parent, child), a, b, plan.scale, plan.dropout))
        self.plan = plan
        self._training = None

    def _lora_layers(self) -> list:
        return [(p, m) for p, m in self.model.named_modules() if isinstance(m, LoRALinear)]

    def _named_trainable(self) -> list:
        """[(PEFT key, parameter)] in a fixed order: the optimizer state's keys (HF names for
        full)."""
        if self.cfg.fine_tune_type == "full":
            return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        out = []
        for path, layer in self._lora_layers():
            out += [
                (peft_key(path, "lora_A"), layer.lora_A),
                (peft_key(path, "lora_B"), layer.lora_B),
            ]
            if isinstance(layer, DoRALinear):
                out.append((peft_key(path, "lora_magnitude_vector"), layer.lora_magnitude_vector))
        return out

    def adapter_weights(self) -> dict:
        return {
            key: p.detach().to("cpu", torch.float32).numpy().copy()
            for key, p in self._named_trainable()
        }

    def set_adapter_weights(self, weights: dict) -> None:
        for layer, name, value in match_adapter_weights(
            weights, dict(self._lora_layers()), self.plan.kind
        ):
            with torch.no_grad():
                getattr(layer, name).copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))

    def model_weights(self) -> dict:
        """Every weight under its Hugging Face name in the model's dtype, tied copies once."""
        out, seen = {}, set()
        for name, t in self.model.state_dict().items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                out[name] = to_numpy(t)
        return out

    @torch.no_grad()
    def fused_weights(self) -> dict:
        """Each adapter layer replaced by a plain Linear holding its own merge (`fused_weight`)."""
        for path, layer in self._lora_layers():
            base = layer.base
            base.weight.copy_(layer.fused_weight().to(base.weight.dtype))
            parent_path, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path), child, base)
        self.plan = None
        return self.model_weights()

    def fused_tensors(self) -> list:
        """The state dict's tensors (tied copies once), each adapter layer's `base.weight` as its
        merge under the layer's own name and its adapter weights left out."""
        layers = dict(self._lora_layers())
        out, seen = [], set()
        for name, t in self.model.state_dict().items():
            path, _, leaf = name.rpartition(".")
            if path in layers:  # lora_A, lora_B, lora_magnitude_vector
                continue
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            owner = path[: -len(".base")] if path.endswith(".base") else None
            if owner in layers and leaf == "weight":
                load = _fused_loader(layers[owner])
            else:
                load = _float32_loader(t)
            out.append((f"{owner}.{leaf}" if owner in layers else name, tuple(t.shape), load))
        return out

    def parameter_counts(self) -> tuple:
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    # ---------------------------------------------------------------- modes
    def _set_training(self, training: bool) -> None:
        """Base model always in eval mode (no dropout, like mlx-lm); in training the LoRA
        dropout is on and, with checkpointing, the modules that checkpoint see `training`
        (transformers only recomputes activations in training mode)."""
        if self._training == training:
            return
        self.model.eval()
        if training:
            for module in self.model.modules():
                if isinstance(module, LoRALinear):
                    module.dropout.train()
                elif self._checkpointing and getattr(module, "gradient_checkpointing", False):
                    module.training = True
        self._training = training

    # ---------------------------------------------------------------- training
    def setup_training(self, cfg) -> None:
        torch.manual_seed(self.world.dropout_seed(cfg.seed))  # LoRA dropout masks, per rank
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, params)
        self._clip = cfg.grad_clip
        self._steps = 0
        self._split = self._split_head()
        self.training_notes = [head_note(self._split is not None)]
        if self._device.type == "cpu":  # same page-fault tax as MLX's CPU steps (mlxft.cpu.malloc)
            from mlxft.cpu import malloc
            from mlxft.torch_backend.cpu_matmul import use_onednn

            self.training_notes.insert(0, f"allocator: {malloc.tune()}")
            rows = cfg.batch_size // self.world.size * cfg.max_seq_length  # this rank's share
            self.training_notes.insert(1, f"CPU matmuls: {use_onednn(self.model, rows)}")
        if cfg.grad_checkpoint:
            self._enable_checkpointing(cfg)

    def _enable_checkpointing(self, cfg) -> None:
        """transformers' per-block checkpointing, non-reentrant (gradients reach the LoRA weights
        without the inputs requiring grad), minus the last block
        (mlxft.backend.checkpointed_blocks),
        keeping the attention kernels' outputs (mlxft.torch_backend.checkpoint)."""
        from mlxft.torch_backend.checkpoint import checkpoint_kwargs

        kwargs = checkpoint_kwargs()
        try:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        except ValueError as err:
            raise UserError(f"{cfg.model}: grad_checkpoint: {str(err).splitlines()[0]}") from None
        blocks = self._blocks(self.model)
        keep = set(checkpointed_blocks(len(blocks)))
        for i, block in enumerate(blocks):
            if i not in keep and hasattr(block, "gradient_checkpointing"):
                block.gradient_checkpointing = False
        self._checkpointing = True
        self._training = None

    @torch.no_grad()
    def _split_head(self):
        """(body, head) when model(x).logits == head(body(x)) on a probe, so the head can run on
        the trained positions only (as on MLX: mlxft.mlx_backend.loss.HeadLoss); None for an
        architecture that scales or soft-caps its logits, or has no such parts."""
        body, head = getattr(self.model, "base_model", None), self.model.get_output_embeddings()
        if body is None or body is self.model or head is None:
            return None
        training = self._training
        self._set_training(False)
        probe = torch.as_tensor(head_probe(self.model.config.vocab_size), device=self._device)
        try:
            direct = self.model(input_ids=probe, use_cache=False).logits.float().cpu().numpy()
            split = head(body(input_ids=probe, use_cache=False).last_hidden_state).float()
            same = head_split_exact(direct, split.cpu().numpy())
        except (TypeError, ValueError, AttributeError, RuntimeError):
            same = False
        finally:
            if training is not None:
                self._set_training(training)
        return (body, head) if same else None

    def _loss_sum(self, batch) -> torch.Tensor:
        inputs = torch.as_tensor(batch.inputs, dtype=torch.long, device=self._device)
        targets = torch.as_tensor(batch.targets, dtype=torch.long, device=self._device).flatten()
        mask = torch.as_tensor(batch.mask, dtype=torch.float32, device=self._device).flatten()
        if self._split is None:
            logits = self.model(input_ids=inputs, use_cache=False).logits.flatten(0, 1)
        else:
            body, head = self._split
            hidden = body(input_ids=inputs, use_cache=False).last_hidden_state.flatten(0, 1)
            rows = head_rows(batch.mask)
            if rows is not None:
                rows = torch.as_tensor(rows, dtype=torch.long, device=self._device)
                hidden, targets, mask = hidden[rows], targets[rows], mask[rows]
            logits = head(hidden)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        return (losses * mask).sum()

    def train_step(self, batches: list, lr: float, stop: bool = False) -> StepResult:
        """One optimizer step over this rank's shares of the grad-accumulation group; in a
        distributed world gradients, loss sums and token counts are summed over the ranks
        (`Collectives.step`) before they are divided by the world's trained tokens."""
        self._set_training(True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.zero_grad(set_to_none=True)
        total, count = torch.zeros((), device=self._device), 0
        for batch in batches:
            if not len(batch.lengths):  # an epoch's short last batch left this rank no row
                continue
            loss = self._loss_sum(batch)
            loss.backward()
            total += loss.detach()
            count += int(batch.mask.sum())
        if self._comm:
            total, count, stop = self._comm.step(params, total, count, stop)
        for p in params:
            if p.grad is not None:
                p.grad.div_(max(count, 1))
        norm = torch.nn.utils.clip_grad_norm_(params, self._clip if self._clip else float("inf"))
        self.optimizer.step()
        self._steps += 1
        usable = self._usable(params)
        return StepResult(total.item(), count, norm.item(), bool(usable.item()), stop)

    @torch.no_grad()
    def _usable(self, params: list) -> torch.Tensor:
        """The updated weights' float32 sum of squares and every optimizer value finite
        (`mlxft.backend.StepResult.weights_finite`), reduced on the device: one sync."""
        squares = torch.stack([p.detach().float().square().sum() for p in params]).sum()
        ok = torch.isfinite(squares)
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.is_floating_point():
                    ok &= torch.isfinite(value).all()
        return ok

    def preference_step(self, batches: list, lr: float | None, spec, stop: bool = False) -> dict:
        """DPO/ORPO over this rank's PairBatch shares of a group: an optimizer step at `lr`, or
        an evaluation (lr None); the world's sums named in mlxft.training.preference."""
        from mlxft.torch_backend.preference import preference_step

        return preference_step(self, batches, lr, spec, stop)

    def frozen_reference(self) -> tuple:
        """(model, (body, head) split or None) of the starting model, frozen: full
        fine-tuning's DPO reference, loaded once from cfg.model (a resumed full run's weights
        are the checkpoint's)."""
        if self._reference is None:
            from mlxft.hub import resolve_model

            cfg = self.cfg
            path = resolve_model(cfg.model, cfg.revision)
            model = load_hf_model(path, self._dtype, cfg.trust_remote_code).to(self._device)
            model.requires_grad_(False)
            model.eval()
            split = None
            if self._split is not None:
                split = (model.base_model, model.get_output_embeddings())
            self._reference = (model, split)
        return self._reference

    def all_gather(self, values: np.ndarray) -> np.ndarray:
        if self._comm is None:
            return np.asarray(values)[None]
        return self._comm.all_gather(values)

    @torch.no_grad()
    def eval_loss(self, batches: list) -> tuple:
        """(sum of token losses, token count) over `batches`, dropout off; in a distributed
        world summed over every rank's batches."""
        self._set_training(False)
        total, count = 0.0, 0
        for batch in batches:
            if not len(batch.lengths):
                continue
            total += self._loss_sum(batch).item()
            count += int(batch.mask.sum())
        if self._comm is None:
            return total, count
        rows = self._comm.all_gather(np.array([total, count], dtype=np.float64))
        return float(rows[:, 0].sum()), int(rows[:, 1].sum())

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits for a (B, T) batch (used by tests and parity checks)."""
        self._set_training(False)
        inputs = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self._device)
        return self.model(input_ids=inputs, use_cache=False).logits.float().cpu().numpy()

    # ---------------------------------------------------------------- generation
    def start_generation(self, prompt_ids: list) -> np.ndarray:
        """Run the prompt, keep its KV cache; float32 logits (vocab,) for the next token."""
        if not prompt_ids:
            raise UserError("generation needs a non-empty prompt")
        self._remember_mode()
        self._set_training(False)
        self._generation = KVGeneration(self.model, self._device)
        return self._generation.start(prompt_ids)

    def next_logits(self, token_id: int) -> np.ndarray:
        """Append one token to the cached sequence; logits (vocab,) for the token after it."""
        if self._generation is None:
            raise RuntimeError("next_logits before start_generation")
        return self._generation.step(token_id)

    def start_batch_generation(self, prompts: list) -> np.ndarray:
        """Prefill several prompts (left-padded); float32 logits (B, vocab) of each last token."""
        if not prompts or not all(prompts):
            raise UserError("generation needs non-empty prompts")
        self._remember_mode()
        self._set_training(False)
        self._generation = BatchKVGeneration(self.model, self._device, prompts)
        return self._generation.start()

    def next_batch_logits(self, token_ids: list) -> np.ndarray:
        """Feed one token per row through the batched cache; logits (B, vocab)."""
        if self._generation is None:
            raise RuntimeError("next_batch_logits before start_batch_generation")
        return self._generation.step(token_ids)

    def end_generation(self) -> None:
        """Drop the KV cache and restore the mode from before generation (LoRA dropout)."""
        self._generation = None
        if self._mode_before_generation is not None:
            self._set_training(self._mode_before_generation)
        self._mode_before_generation = None

    def _remember_mode(self) -> None:
        if self._mode_before_generation is None:
            self._mode_before_generation = bool(self._training)

    # ---------------------------------------------------------------- resume
    def optimizer_state(self) -> dict:
        return optimizer_state(
            self.optimizer, self._named_trainable(), self.cfg.optimizer, self._steps
        )

    def load_optimizer_state(self, state: dict) -> None:
        self._steps = load_optimizer_state(
            self.optimizer, self._named_trainable(), self.cfg.optimizer, state
        )

    def rng_state(self) -> dict:
        return rng_state(self._device)

    def set_rng_state(self, state: dict) -> None:
        set_rng_state(self._device, state)

    # ---------------------------------------------------------------- memory
    def peak_memory_gb(self) -> float:
        return self.memory.peak_gb()

    def reset_peak_memory(self) -> None:
        self.memory.reset()
