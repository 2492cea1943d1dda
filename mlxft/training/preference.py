"""Preference tuning (DPO, ORPO): what each backend computes, the names it is reported under,
and the few things the training session does differently for it.

Both backends implement one method, `Backend.preference_step(batches, lr, spec) -> dict`, on
`mlxft.data.preference.PairBatch` groups; this module says what it computes, so the two stay
the same math (checked against TRL's DPOTrainer / ORPOTrainer in tests/test_preference_trl.py).
`mlxft.training.session.Session` runs train_mode dpo/orpo through its one loop (checkpoints,
resume, guards, early stopping, eval_prompts, the run directory); this module gives it the
evaluation, the header lines and the reference log-prob cache.

Per pair, with log π(y|x) summed over the answer's tokens (TRL's DPO; prompt tokens never count):

  DPO   ratio_c = log π(c) - log π_ref(c),  ratio_r = log π(r) - log π_ref(r)
        Δ = ratio_c - ratio_r
        loss = -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)           (ε = label_smoothing: conservative DPO,
                                                              TRL's sigmoid loss up to 0.2x)
        rewards/chosen = β ratio_c, rewards/rejected = β ratio_r; logps/* = log π(·)
        + rpo_alpha · NLL, NLL = mean token cross-entropy of the chosen ANSWERS (RPO: TRL's
        loss_type [sigmoid, sft] with loss_weights [1, rpo_alpha]); off by default

  ORPO  a = log π(y|x) / |y|  (the answer's MEAN token log-prob, as TRL's ORPO)
        log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))
        loss = NLL - β log σ(log_odds), NLL = mean token cross-entropy of the chosen rows, prompt
        included (TRL and the ORPO authors' code); no reference model
        rewards/chosen = β a_c, rewards/rejected = β a_r; logps/* = a

The reference π_ref is the base model with the adapter switched off (LoRA/DoRA: no second copy
of the weights), a frozen copy of the starting model for full fine-tuning, or log-probs cached by
`precompute_ref_log_probs` (computed the same way, once, before the first step).

Data parallelism (`mlx.launch`, `torchrun`) shares each global batch's pairs over the ranks
(`mlxft.data.preference.share_pairs`: a pair's chosen and rejected rows stay on one rank).  The
objective's denominators are the global batch's (`open_group`), so the ranks' gradients sum to
the single-process one; the backend sums them, every sum of `SUM_KEYS` (`pack`) and the stop
vote over the ranks in the step's one all-reduce, so every rank holds the world's metrics.  The
precomputed reference log-probs are computed per rank on its shares and gathered.

A group of batches (gradient accumulation) is one objective, normalised as TRL normalises one
batch: the mean over the group's pairs, plus the NLL (ORPO, DPO with rpo_alpha) pooled over the
group's chosen tokens.  Each batch's terms are scaled by those group totals (known from the data
before any forward), so the summed gradients are exactly the group's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.backend import StepResult
from mlxft.data.batching import head_rows
from mlxft.data.preference import pair_eval_batches
from mlxft.fileio import save_safetensors

REF_FILE = "ref_logps.safetensors"  # in each checkpoint: {split name: (pairs, 2) float32}
# The SFT format whose prompt rendering a preference format shares (eval_prompts samples).
SFT_FORMAT = {"preference": "completion", "preference_chat": "chat"}

# The sums every preference_step returns (per group), from which `summarize` builds the report.
SUM_KEYS = (
    "pairs",
    "loss_sum",
    "nll_sum",
    "nll_tokens",
    "chosen_logps",
    "rejected_logps",
    "chosen_rewards",
    "rejected_rewards",
    "accuracies",
    "margins",
    "log_odds_ratio",
    "log_odds_chosen",
    "tokens",
)
# What a training step adds (not summed over a report window: the last step's are reported).
STEP_KEYS = ("grad_norm", "weights_finite")
# TRL's metric names (trl.DPOTrainer / trl.experimental.orpo.ORPOTrainer logs), as written to
# metrics.jsonl.
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
ORPO_METRICS = DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@dataclass(frozen=True)
class PreferenceSpec:
    mode: str  # dpo | orpo
    beta: float
    label_smoothing: float = 0.0  # DPO only
    rpo_alpha: float = 0.0  # DPO only: weight of the chosen answers' NLL (0: none)
    reference_only: bool = False  # DPO: only the reference log-probs per pair (precompute pass)

    @classmethod
    def of(cls, cfg, **kw) -> PreferenceSpec | None:
        """The run's spec, or None for train_mode sft."""
        if cfg.train_mode == "sft":
            return None
        return cls(cfg.train_mode, cfg.beta, cfg.label_smoothing, cfg.rpo_alpha or 0.0, **kw)

    @property
    def needs_reference(self) -> bool:
        return self.mode == "dpo"

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen rows' NLL in the objective (0: the objective has none)."""
        return 1.0 if self.mode == "orpo" else self.rpo_alpha

    def nll_mask(self, batch) -> np.ndarray:
        """The NLL's positions in `batch`: ORPO's count the prompt, RPO's the answer only."""
        return batch.nll_mask(prompt=self.mode == "orpo")


def open_group(batches: list, spec: PreferenceSpec) -> tuple:
    """(pairs, NLL tokens, sums) of a group: the denominators of its objective, over the whole
    world when the batches are a rank's shares (`PairBatch.denominators`), and the sums this
    rank starts from, counting its own pairs and NLL tokens (summed over the ranks later)."""
    nll = spec.nll_weight != 0
    which = 1 if spec.mode == "orpo" else 2
    pairs = sum(b.denominators[0] for b in batches)
    nll_tokens = sum(b.denominators[which] for b in batches) if nll else 0.0
    sums = {
        "pairs": sum(b.size for b in batches),
        "nll_tokens": sum(float(spec.nll_mask(b).sum()) for b in batches) if nll else 0.0,
        "tokens": 0,
        "nll_sum": 0.0,
    }
    return pairs, nll_tokens, sums


def loss_mask(batch, spec: PreferenceSpec) -> np.ndarray:
    """Positions a loss term is computed on: both answers (DPO; RPO's NLL reads the chosen
    ones), plus the chosen prompts (ORPO's NLL)."""
    return np.maximum(batch.mask, spec.nll_mask(batch)) if spec.mode == "orpo" else batch.mask


def trained_tokens(batch, spec: PreferenceSpec) -> int:
    return int(loss_mask(batch, spec).sum())


@dataclass(frozen=True)
class Positions:
    """Where a batch's loss reads token log-probs, as numpy (each backend moves it to its device):
    the output head runs on `rows` only (flat positions; all of them when nearly all are needed,
    or MLXFT_HEAD_ROWS=0); `row` is the batch row each one belongs to, `answer` and `nll` its
    weight in the row's answer log-prob sum and in the NLL sum; `counts` the answer tokens per
    row (ORPO's mean)."""

    rows: np.ndarray  # (R,) int64
    row: np.ndarray  # (R,) int64
    answer: np.ndarray  # (R,) float32
    nll: np.ndarray  # (R,) float32
    counts: np.ndarray  # (2B,) float32

    @classmethod
    def of(cls, batch, spec: PreferenceSpec) -> Positions:
        need = loss_mask(batch, spec)
        rows = head_rows(need)
        rows = np.arange(need.size) if rows is None else rows.astype(np.int64)
        return cls(
            rows,
            rows // batch.inputs.shape[1],
            batch.mask.reshape(-1)[rows].astype(np.float32),
            spec.nll_mask(batch).reshape(-1)[rows],
            batch.mask.sum(1).astype(np.float32),
        )


def objective(loss_sum, nll_sum, pairs: float, nll_tokens: float, spec: PreferenceSpec):
    """The group's objective from its summed per-pair losses and NLL (arrays of either framework
    or floats): the mean over its pairs, plus the NLL's weight times its token mean."""
    total = loss_sum / max(pairs, 1.0)
    if spec.nll_weight:
        total = total + spec.nll_weight * nll_sum / max(nll_tokens, 1.0)
    return total


def pair_terms(logps, ref, counts, spec: PreferenceSpec, log_sigmoid, log1mexp) -> tuple:
    """(per-pair losses (B,), {sum name: value}) from per-row answer log-prob sums (2B,: chosen
    rows, then rejected), the math of this module's docstring written once for both backends:
    arrays of either framework, with its `log_sigmoid` and `log1mexp` passed in."""
    half = logps.shape[0] // 2
    beta = spec.beta
    if spec.mode == "dpo":
        ratios = logps - ref
        ratio_c, ratio_r = ratios[:half], ratios[half:]
        delta = beta * (ratio_c - ratio_r)
        eps = spec.label_smoothing
        losses = -(1 - eps) * log_sigmoid(delta) - eps * log_sigmoid(-delta)
        chosen, rejected, values = beta * ratio_c, beta * ratio_r, logps
        extra = {}
    else:
        avg = logps / counts
        a_c, a_r = avg[:half], avg[half:]
        log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
        ratio = log_sigmoid(log_odds)
        losses = -beta * ratio
        chosen, rejected, values = beta * a_c, beta * a_r, avg
        extra = {"log_odds_ratio": ratio.sum(), "log_odds_chosen": log_odds.sum()}
    sums = {
        "loss_sum": losses.sum(),
        "chosen_rewards": chosen.sum(),
        "rejected_rewards": rejected.sum(),
        "accuracies": ((chosen > rejected) * 1.0).sum(),  # bool -> float in either framework
        "margins": (chosen - rejected).sum(),
        "chosen_logps": values[:half].sum(),
        "rejected_logps": values[half:].sum(),
        **extra,
    }
    return losses, sums


def reference_result(refs: list) -> dict:
    """A reference-only pass's result from its [(pair indices, (pairs, 2) log-probs)]."""
    return {
        "pairs": np.concatenate([p for p, _ in refs] or [np.zeros(0, np.int64)]),
        "ref_logps": np.concatenate([r for _, r in refs] or [np.zeros((0, 2), np.float32)]),
    }


def world_sums(comm, sums: dict) -> dict:
    """An evaluation's sums over every rank (float64 all-gather, as `eval_loss`); `comm` is the
    backend's collectives, None in one process."""
    if comm is None:
        return sums
    return unpack(sums, comm.all_gather(pack(sums, False)).sum(0))


def pack(sums: dict, stop: bool) -> np.ndarray:
    """A rank's sums (`SUM_KEYS` order) and its stop vote as one vector, to be summed over the
    ranks with the step's gradients (float64 here; the backends' all-reduce carries float32)."""
    return np.array([float(sums.get(k, 0.0)) for k in SUM_KEYS] + [float(stop)])


def unpack(sums: dict, values) -> dict:
    """`sums` with the world's sums `values` (a summed `pack`) in place of this rank's, and
    `stop`: whether any rank voted to stop."""
    values = np.asarray(values, dtype=np.float64)
    out = {**sums, **{k: float(v) for k, v in zip(SUM_KEYS, values)}}
    out["stop"] = bool(values[len(SUM_KEYS)] > 0)
    return out


def log1mexp(x: float) -> float:
    """log(1 - e^x) for x < 0 (reference value for tests)."""
    return math.log(-math.expm1(x)) if x > -0.6931471805599453 else math.log1p(-math.exp(x))


def add(total: dict, sums: dict) -> dict:
    """Accumulate step sums (the report window, an evaluation over several groups)."""
    for key in SUM_KEYS:
        total[key] = total.get(key, 0.0) + float(sums.get(key, 0.0))
    return total


def summarize(sums: dict, spec: PreferenceSpec) -> dict:
    """Sums -> {'loss', TRL metric: mean over pairs}.  The loss is the objective: mean per-pair
    loss, plus the pooled NLL (ORPO; DPO weighted by rpo_alpha, reported as nll_loss too)."""
    pairs = max(sums.get("pairs", 0.0), 1.0)
    nll_tokens = sums.get("nll_tokens", 0.0)
    out = {"loss": objective(sums["loss_sum"], sums["nll_sum"], pairs, nll_tokens, spec)}
    if spec.nll_weight:
        out["nll_loss"] = sums["nll_sum"] / max(nll_tokens, 1.0)
    means = {
        "rewards/chosen": "chosen_rewards",
        "rewards/rejected": "rejected_rewards",
        "rewards/accuracies": "accuracies",
        "rewards/margins": "margins",
        "logps/chosen": "chosen_logps",
        "logps/rejected": "rejected_logps",
    }
    for name, key in means.items():
        out[name] = sums[key] / pairs
    if spec.mode == "orpo":
        out["log_odds_ratio"] = sums["log_odds_ratio"] / pairs
        out["log_odds_chosen"] = sums["log_odds_chosen"] / pairs
    return out


# --------------------------------------------------------------------------- the session's part
def evaluate(guarded, backend, batches: list, spec: PreferenceSpec) -> dict:
    """Sums over `batches`, one batch at a time, no update (`guarded` = Session._guarded)."""
    total: dict = {}
    for batch in batches:
        add(total, guarded(backend.preference_step, [batch], None, spec))
    return total


def step_result(sums: dict, spec: PreferenceSpec) -> StepResult:
    """A training step's sums as the loop's `StepResult`: the objective spread over the
    trained tokens (so loss_sum / tokens is the objective), the step's gradient norm and
    weight check."""
    tokens = int(sums["tokens"])
    loss_sum = summarize(sums, spec)["loss"] * max(tokens, 1)
    usable = bool(sums.get("weights_finite", True))
    return StepResult(loss_sum, tokens, sums["grad_norm"], usable, bool(sums.get("stop", False)))


def header_line(cfg, spec: PreferenceSpec) -> str:
    """The run header's line on the objective and where the reference comes from."""
    reference = ""
    if spec.needs_reference:
        reference = (
            "; reference: the starting model, a frozen copy"
            if cfg.fine_tune_type == "full"
            else "; reference: the base model (adapter switched off)"
        )
        if cfg.precompute_ref_log_probs:
            reference += ", log-probs precomputed"
    smoothing = f", label_smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else ""
    if spec.rpo_alpha:
        smoothing += f", + {spec.rpo_alpha:g} x NLL of the chosen answers (rpo_alpha)"
    return f"{cfg.train_mode.upper()}: beta {cfg.beta:g}{smoothing}{reference}"


def attach_reference(session, spec: PreferenceSpec) -> list:
    """precompute_ref_log_probs: the reference log-prob of every pair, read from the checkpoint
    being resumed, else computed in one pass (adapter off / frozen copy) before the first step.
    Returns header notes."""
    cfg, notes = session.cfg, []
    if not (cfg.precompute_ref_log_probs and spec.needs_reference):
        return notes
    cached = {}
    if session.checkpoint is not None and (Path(session.checkpoint) / REF_FILE).is_file():
        from safetensors.numpy import load_file

        cached = load_file(str(Path(session.checkpoint) / REF_FILE))
    for name in ("train", "valid"):
        split = session.splits[name]
        if name in cached and cached[name].shape == (len(split), 2):
            split.ref_logps = cached[name]
            notes.append(f"Reference log-probs of {name}: read from {session.checkpoint}")
            continue
        tic = time.perf_counter()
        batches = pair_eval_batches(split, cfg.batch_size, session.pad_id)
        only = dataclasses.replace(spec, reference_only=True)
        shares = [session.world.share(b) for b in batches]
        out = session._guarded(session.backend.preference_step, shares, None, only)
        values = np.zeros((len(split), 2), dtype=np.float32)
        values[out["pairs"]] = out["ref_logps"]
        if session.world.distributed:  # each rank computed its shares: every pair, once
            values = session.backend.all_gather(values).sum(0)
        split.ref_logps = values
        seconds = time.perf_counter() - tic
        notes.append(f"Reference log-probs of {name}: {len(split)} pairs in {seconds:.1f}s")
    return notes


def save_reference(folder: Path, splits: dict) -> None:
    """The precomputed reference log-probs into a checkpoint folder (nothing when none)."""
    cache = {
        name: np.ascontiguousarray(s.ref_logps)
        for name, s in splits.items()
        if getattr(s, "ref_logps", None) is not None
    }
    if cache:
        save_safetensors(folder / REF_FILE, cache)
