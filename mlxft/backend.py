"""The backend contract: what the training loop, inference and the benchmark ask of a backend.

A backend holds tensor code only.  Every decision about what is allowed, what the defaults are
and what a run reports is made once, above it (`mlxft.config`, `mlxft.training`); the few
backend-neutral rules both backends apply inside their tensor code live here, beside the
contract, so they are stated once:

- `checkpointed_blocks`: which blocks `grad_checkpoint` recomputes;
- `head_split_exact`: when the output head may run apart from the model body (and so on the
  trained positions only);
- `head_note`: how the run header describes where the head runs.

Backends satisfy `Backend` structurally (no inheritance); `mlxft.backends.get_backend` picks
one for a config and hands it the run's `mlxft.training.world.World`.  In a data-parallel run
each process holds one backend that trains on its rank's share of every batch; the backend
connects the ranks and does every collective, so `train_step` and `eval_loss` return sums over
the whole world and the loop above stays the same for one process or many (so does
`preference_step`: gradients and every DPO/ORPO sum are summed over the ranks).

Batches are `mlxft.data.Batch` (numpy); learning rates come from `mlxft.training.schedule`;
weights cross the contract as numpy (`mlxft.model_dir.Tensor`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import numpy as np

from mlxft import flags

if TYPE_CHECKING:
    from mlxft.training.world import World

# A few token ids every vocabulary has: enough positions to tell `head(body(x))` from a model
# that scales or soft-caps its logits.
HEAD_PROBE = np.arange(1, 9, dtype=np.int64)[None]


class StepResult(NamedTuple):
    """What one optimizer step reports (`Backend.train_step`): sums over every rank's share of
    the group in a data-parallel run."""

    loss_sum: float
    """Sum of token losses over the group, computed with the weights *before* the update."""
    tokens: int
    """Trained (target) tokens in the group."""
    grad_norm: float
    """Global gradient norm before clipping."""
    weights_finite: bool = True
    """Whether the *updated* trainable weights and optimizer state are usable: every optimizer
    value finite and the weights' float32 sum of squares finite (so no NaN/inf, and no weight
    beyond ~1.8e19, whose square overflows: no model computes with such a weight)."""
    stop: bool = False
    """Some rank asked to stop after this step (Ctrl-C): all ranks stop here."""


@runtime_checkable
class Backend(Protocol):
    """One tensor framework behind the neutral loop (MLX or torch)."""

    name: str
    """'mlx' or 'torch': the config's `backend` value, and what checkpoints record."""
    training_notes: list
    """Header lines `setup_training` leaves for the run report (fast paths taken, allocator)."""
    world: World
    """The run's `mlxft.training.world.World`, given at construction (one process: rank 0 of 1);
    a distributed world is connected by the constructor."""
    comm_seconds: float
    """Seconds spent in collectives since construction, waiting for slower ranks included."""

    @property
    def device(self) -> str:
        """Where tensors live: 'cpu', 'gpu'/'metal' (MLX), 'cuda:0'/'mps' (torch)."""

    @property
    def dtype(self) -> str:
        """The floating dtype of the loaded weights ('float32', 'bfloat16', 'float16')."""

    @property
    def quantized(self) -> bool:
        """Whether the loaded base has quantized linears (QLoRA; only MLX can hold them)."""

    def load(self, model_path: Path) -> None:
        """Load a checked model directory, frozen (full fine-tuning unfreezes its planned part)."""

    def num_blocks(self) -> int:
        """How many transformer blocks the model has."""

    def linear_modules(self) -> list:
        """`LinearInfo` of every linear inside a block, in block order: what adapters attach to."""

    def add_adapters(self, plan) -> None:
        """Wrap the plan's target linears with LoRA/DoRA layers holding `plan.init`."""

    def adapter_weights(self) -> dict:
        """{PEFT key: float32 numpy} of the adapter (full fine-tune: every trainable weight)."""

    def set_adapter_weights(self, weights: dict) -> None:
        """Load {PEFT key: array} into the adapter layers (checked by `match_adapter_weights`)."""

    def model_weights(self) -> dict:
        """{HF name: numpy tensor} of the whole model in its dtype, tied copies once."""

    def fused_weights(self) -> dict:
        """{HF name: numpy tensor} with every adapter merged into its linear and every weight
        dense (de-quantized): a plain model for `fuse` and exports.  Replaces the adapters."""

    def fused_tensors(self) -> list:
        """[(HF name, shape, load)] of what `fused_weights` returns, where `load()` computes that
        one tensor as float32 numpy on demand: a writer streaming them holds one at a time."""

    def parameter_counts(self) -> tuple:
        """(trainable, total) parameters; quantized weights counted at their dense size."""

    def setup_training(self, cfg) -> None:
        """Optimizer, checkpointing and the step for `cfg`; fills `training_notes`."""

    def train_step(self, batches: list, lr: float, stop: bool = False) -> StepResult:
        """One optimizer step over this rank's shares of a grad-accumulation group at `lr`:
        gradients summed over every rank's tokens, divided by the world's trained tokens, with
        a fused on-device check of the updated weights and optimizer state (`StepResult`)."""

    def eval_loss(self, batches: list) -> tuple:
        """(sum of token losses, trained tokens) over every rank's `batches`, no update."""

    def preference_step(self, batches: list, lr: float | None, spec, stop: bool = False) -> dict:
        """DPO/ORPO (`mlxft.training.preference.PreferenceSpec`) over this rank's shares of a
        group of `mlxft.data.preference.PairBatch`: an optimizer step at `lr`, or an evaluation
        (lr None); returns the world's sums of `preference.SUM_KEYS`, plus `grad_norm`,
        `weights_finite` and `stop` (any rank's vote) after a step (reference-only spec: this
        rank's {'pairs', 'ref_logps'})."""

    def all_gather(self, values: np.ndarray) -> np.ndarray:
        """Every rank's `values` (same shape and dtype on each) stacked as (world size, ...)."""

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits (B, T, vocab) for a (B, T) batch, dropout off."""

    def start_generation(self, prompt_ids: list) -> np.ndarray:
        """Prefill a fresh KV cache with the prompt; float32 logits (vocab,) of its last token."""

    def next_logits(self, token_id: int) -> np.ndarray:
        """Append one token to the cached sequence; float32 logits (vocab,) for the next."""

    def start_batch_generation(self, prompts: list) -> np.ndarray:
        """Prefill a batched KV cache with left-padded prompts; float32 logits (B, vocab) of
        each row's last token (NotImplementedError: no batched cache, go one at a time)."""

    def next_batch_logits(self, token_ids: list) -> np.ndarray:
        """Append one token per row to the batched cache; float32 logits (B, vocab)."""

    def end_generation(self) -> None:
        """Drop the KV cache and restore the mode from before generation (LoRA dropout)."""

    def optimizer_state(self) -> dict:
        """Flat {PEFT key.slot: numpy, 'step': ...} in `mlxft.training.checkpoint`'s layout."""

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what `optimizer_state` returned (after `setup_training`)."""

    def rng_state(self) -> dict:
        """{name: numpy} of the generators that drive dropout."""

    def set_rng_state(self, state: dict) -> None:
        """Restore what `rng_state` returned."""

    def peak_memory_gb(self) -> float:
        """Peak memory since the last reset, by the device's own accounting."""

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""


def checkpointed_blocks(num_blocks: int) -> range:
    """The blocks grad_checkpoint recomputes: every block but the last.  The last block's
    activations feed the output head at once and are spent by the first step of the backward,
    so keeping them costs no more than the recomputation's own peak, while recomputing them is
    a block of forward work per step for nothing."""
    return range(max(num_blocks - 1, 0))


def head_probe(vocab_size: int | None) -> np.ndarray:
    """The probe batch (1, 8) for `head_split_exact`, inside the vocabulary."""
    return HEAD_PROBE % (vocab_size or 8)


def head_split_exact(direct: np.ndarray, split: np.ndarray) -> bool:
    """Whether `head(body(probe))` reproduces `model(probe)`: then the head may run on its own
    (on trained positions only).  Architectures that scale or soft-cap logits fail here."""
    direct, split = np.asarray(direct, np.float32), np.asarray(split, np.float32)
    return direct.shape == split.shape and bool(np.allclose(direct, split, rtol=1e-4, atol=1e-4))


def head_note(split: bool, chunked: bool = False) -> str:
    """The run header's line on where the output head runs (both backends)."""
    if not split:
        return "output head: inside the model, on every position (its logits are not head(body(x)))"
    where = (
        "on trained positions only"
        if flags.head_rows()
        else "on every position (MLXFT_HEAD_ROWS=0)"
    )
    return f"output head: {where}" + (", chunked cross-entropy" if chunked else "")
