"""Preference data (DPO, ORPO): {"prompt", "chosen", "rejected"} records -> tokenized pairs ->
pair batches.

TRL's two preference formats, detected per record (one format per file):

- standard: the three values are strings.  They render as the SFT pipeline renders a
  {"prompt", "completion"} record (chat-wrapped when the tokenizer has a chat template and
  use_chat_template allows it, else concatenated; EOS after the completion);
- conversational: "prompt" is a list of messages, "chosen" and "rejected" are lists of (assistant)
  messages.  Each side renders as one conversation, prompt + side, with the chat template.

Either way the SFT renderer and tokenizer (`render.py`, `tokenize.py`) do the work, always with the
prompt masked: only the tokens of the chosen / rejected answer are targets, never the prompt's
(nor the assistant turns inside a multi-turn prompt).

Truncation follows TRL's DPO: `max_prompt_length` keeps the prompt's last tokens (TRL <= 0.28's key;
TRL 0.29 removed it in favour of filtering), then prompt + answer is cut to `max_seq_length` keeping
the start (TRL's `truncation_mode="keep_start"`).  TRL silently drops a pair whose prompt fills
`max_seq_length`; here that is an error naming the record, as are a missing `rejected` and a
pair whose chosen and rejected are the same (no preference to learn).

Batches: a batch of B pairs is ONE model batch of 2B rows, all chosen first, then all rejected
(TRL's concatenated forward), padded to the batch's longest row.  Pairs are sorted by that
width and the batch order is shuffled per epoch from the seed, as SFT batches are
(`batching.py`), so a resumed run replays the same batches.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from mlxft.data.batching import Batch, make_batch, share_bounds, shuffled, sorted_chunks, spread
from mlxft.data.loader import load_records
from mlxft.data.records import _short, check_messages, check_same_format
from mlxft.data.render import Renderer
from mlxft.data.tokenize import encode
from mlxft.errors import UserError

FORMATS = ("preference", "preference_chat")
KEYS = ("prompt", "chosen", "rejected")
HELP = (
    '{"prompt": str, "chosen": str, "rejected": str}, or conversational: {"prompt": [messages], '
    '"chosen": [assistant messages], "rejected": [assistant messages]}'
)


@dataclass
class PreferenceSplit:
    name: str  # train | valid | test
    source: str  # file path, for messages
    chosen: list  # int32 token ids of prompt + chosen, per pair (after truncation)
    chosen_masks: list  # bool per token: True on the chosen answer's tokens
    rejected: list  # the same for prompt + rejected
    rejected_masks: list
    truncated: int  # pairs cut by max_prompt_length or max_seq_length
    format: str  # preference | preference_chat
    ref_logps: np.ndarray | None = None  # (pairs, 2) reference log-probs, when precomputed
    dropped: int = 0  # never: a pair that cannot train is an error, not a silent drop

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def sequences(self) -> list:
        """Every row, chosen and rejected interleaved (what the resume fingerprint digests)."""
        return [s for pair in zip(self.chosen, self.rejected) for s in pair]

    @property
    def masks(self) -> list:
        return [m for pair in zip(self.chosen_masks, self.rejected_masks) for m in pair]

    def widths(self) -> np.ndarray:
        """Each pair's padded width in a batch: its longer side."""
        return np.array(
            [max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64
        )


@dataclass
class PairBatch(Batch):
    """B pairs as one model batch of 2B rows: rows [0, B) chosen, [B, 2B) rejected (numpy only);
    `mask` is 1 where the target is an answer (chosen or rejected) token, so `ntokens` counts
    the positions the preference loss is computed on."""

    pairs: np.ndarray  # (B,) int64 pair indices in the split (reference log-prob cache)
    ref_logps: np.ndarray | None = (
        None  # (2B,) float32 cached reference log-probs, chosen then rejected
    )
    # a rank's share (`share_pairs`): the global batch's (pairs, NLL tokens with the prompt,
    # NLL tokens of the answers), the denominators of the objective, so the ranks' gradients
    # sum to the global batch's
    world: tuple | None = None

    @property
    def size(self) -> int:
        """Number of pairs."""
        return len(self.pairs)

    @property
    def denominators(self) -> tuple:
        """(pairs, chosen tokens with the prompt, chosen answer tokens) of the global batch this
        one is (a share of): the denominators of ORPO's NLL and of DPO's `rpo_alpha` NLL."""
        if self.world is not None:
            return self.world
        return (
            self.size,
            float(self.nll_mask(prompt=True).sum()),
            float(self.nll_mask(prompt=False).sum()),
        )

    def nll_mask(self, prompt: bool) -> np.ndarray:
        """NLL positions of the chosen rows, none of the rejected rows, (2B, T) float32: every
        real target, prompt included (`prompt`: ORPO, as TRL and the ORPO authors' code), or the
        answer's alone (DPO's `rpo_alpha` term, as TRL's `sft` loss type)."""
        if prompt:
            width = self.inputs.shape[1]
            out = (np.arange(width)[None, :] < (self.lengths[:, None] - 1)).astype(np.float32)
        else:
            out = self.mask.astype(np.float32, copy=True)
        out[self.size :] = 0.0
        return out


# --------------------------------------------------------------------------- records
def detect_format(record: dict, where: str) -> str:
    """`preference` (strings) or `preference_chat` (message lists); a one-line error otherwise."""
    missing = [k for k in KEYS if k not in record]
    if missing:
        have = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        hint = ""
        if "completion" in record or "messages" in record or "text" in record:
            hint = (
                "; this is a supervised (SFT) record: set train_mode: sft, or give preference pairs"
            )
        raise UserError(
            f"{where}: preference record has no {' or '.join(repr(k) for k in missing)} "
            f"(keys: {have}); train_mode dpo/orpo reads {HELP}{hint}"
        )
    return "preference_chat" if isinstance(record["prompt"], list) else "preference"


def validate(record: dict, fmt: str, where: str) -> None:
    """Value types for the format, and a real preference (chosen differs from rejected)."""
    for key in KEYS:
        if fmt == "preference":
            if not isinstance(record[key], str):
                raise UserError(
                    f"{where}: '{key}' must be a string (or every value a message list), "
                    f"got {_short(record[key])}"
                )
        else:
            check_messages(record[key], key, where, " in a conversational record")
    if record["chosen"] == record["rejected"]:
        raise UserError(
            f"{where}: 'chosen' and 'rejected' are identical, so there is no preference to learn; "
            "fix or drop this record"
        )


# --------------------------------------------------------------------------- tokenize
def _unmark_first_turns(pieces: list, turns: int) -> list:
    """The pieces with the first `turns` runs of target pieces made context: the assistant turns
    that belong to the prompt (a multi-turn history) are never trained."""
    out, runs, inside = [], 0, False
    for text, target in pieces:
        if target and not inside:
            runs += 1
        inside = target
        out.append((text, target and runs > turns))
    return out


def _side(renderer: Renderer, record: dict, side: str, fmt: str, where: str) -> tuple:
    """(ids, mask) of prompt + one side, rendered by the SFT renderer with the prompt masked."""
    if fmt == "preference":
        pieces, add_special = renderer.render(
            {"prompt": record["prompt"], "completion": record[side]}, "completion", where
        )
    else:
        messages = record["prompt"] + record[side]
        pieces, add_special = renderer.render({"messages": messages}, "chat", where)
        prompt_turns = sum(m["role"] == "assistant" for m in record["prompt"])
        pieces = _unmark_first_turns(pieces, prompt_turns)
    ids, mask = encode(renderer.tok, pieces, add_special, renderer.eos_id)
    if len(mask):
        mask[0] = False
    return ids, mask


def _truncate(ids: np.ndarray, mask: np.ndarray, cfg) -> tuple:
    """TRL's rules: the prompt keeps its last max_prompt_length tokens, then the row keeps its
    first max_seq_length.  Returns (ids, mask, prompt length, whether anything was cut)."""
    prompt = int(np.argmax(mask)) if mask.any() else len(ids)
    cut = False
    if cfg.max_prompt_length is not None and prompt > cfg.max_prompt_length:
        drop = prompt - cfg.max_prompt_length
        ids, mask, prompt, cut = ids[drop:], mask[drop:], cfg.max_prompt_length, True
    if len(ids) > cfg.max_seq_length:
        ids, mask, cut = ids[: cfg.max_seq_length], mask[: cfg.max_seq_length], True
    return ids, mask, prompt, cut


def tokenize_pairs(
    name: str, source, records: list, fmt: str, renderer: Renderer, cfg
) -> PreferenceSplit:
    chosen, chosen_masks, rejected, rejected_masks = [], [], [], []
    truncated = 0
    for where, record in records:
        validate(record, fmt, where)
        sides = []
        for side in ("chosen", "rejected"):
            ids, mask = _side(renderer, record, side, fmt, where)
            ids, mask, prompt, cut = _truncate(ids, mask, cfg)
            if not mask.any():
                if prompt >= cfg.max_seq_length:
                    limit = (
                        ""
                        if cfg.max_prompt_length is None
                        else f" (after max_prompt_length={cfg.max_prompt_length})"
                    )
                    raise UserError(
                        f"{where}: the prompt is {prompt} tokens{limit}, which leaves no room "
                        f"for the '{side}' answer within max_seq_length={cfg.max_seq_length}; "
                        "raise max_seq_length, set max_prompt_length "
                        "below it (keeps the prompt's last tokens) or drop this record"
                    )
                raise UserError(f"{where}: '{side}' renders to no answer tokens; give it some text")
            sides.append((ids, mask, cut))
        (c_ids, c_mask, c_cut), (r_ids, r_mask, r_cut) = sides
        truncated += c_cut or r_cut
        chosen.append(c_ids)
        chosen_masks.append(c_mask)
        rejected.append(r_ids)
        rejected_masks.append(r_mask)
    return PreferenceSplit(
        name, str(source), chosen, chosen_masks, rejected, rejected_masks, truncated, fmt
    )


def _file_format(records: list, cfg) -> str:
    return check_same_format([detect_format(r, w) for w, r in records], records)


def load_preference_splits(cfg, tokenizer) -> dict:
    """{'train', 'valid'[, 'test']: PreferenceSplit} from cfg.data or cfg.hf_dataset, read and
    carved exactly as SFT data is (`mlxft.data.loader.load_records`), one format per source."""
    renderer = Renderer(dataclasses.replace(cfg, mask_prompt=True), tokenizer)
    splits = {
        name: _joined(
            name, [tokenize_pairs(name, src, recs, fmt, renderer, cfg) for src, recs, fmt in parts]
        )
        for name, parts in load_records(cfg, _file_format).items()
    }
    for notice in renderer.notices:
        warnings.warn(notice, UserWarning, stacklevel=2)
    return splits


def _joined(name: str, parts: list) -> PreferenceSplit:
    """One split from several sources (hf_dataset lists)."""
    if len(parts) == 1:
        return parts[0]
    return PreferenceSplit(
        name,
        ", ".join(p.source for p in parts),
        [x for p in parts for x in p.chosen],
        [x for p in parts for x in p.chosen_masks],
        [x for p in parts for x in p.rejected],
        [x for p in parts for x in p.rejected_masks],
        sum(p.truncated for p in parts),
        "+".join(dict.fromkeys(p.format for p in parts)),
    )


# --------------------------------------------------------------------------- batches
def make_pair_batch(split: PreferenceSplit, pairs, pad_id: int) -> PairBatch:
    """Pairs -> one padded batch, chosen rows then rejected rows (TRL's concatenated forward)."""
    pairs = np.asarray(pairs, dtype=np.int64)
    rows = [split.chosen[i] for i in pairs] + [split.rejected[i] for i in pairs]
    masks = [split.chosen_masks[i] for i in pairs] + [split.rejected_masks[i] for i in pairs]
    batch = make_batch(rows, masks, pad_id)
    ref = None
    if split.ref_logps is not None:
        ref = np.concatenate([split.ref_logps[pairs, 0], split.ref_logps[pairs, 1]]).astype(
            np.float32
        )
    return PairBatch(batch.inputs, batch.targets, batch.mask, batch.lengths, pairs, ref)


def share_pairs(batch: PairBatch, rank: int, size: int) -> PairBatch:
    """Rank `rank`'s contiguous pairs of a global pair batch, chosen and rejected together,
    trimmed to their own longest row (exact: causal models, padding only after real tokens, as
    `mlxft.data.batching.share`).  A rank may get no pair (an epoch's short last batch): it
    then adds nothing to the step but still takes part in its collectives."""
    if size == 1:
        return batch
    world = batch.denominators
    start, stop = share_bounds(batch.size, rank, size)
    rows = np.r_[start:stop, batch.size + start : batch.size + stop]
    lengths = batch.lengths[rows]
    width = int(lengths.max()) - 1 if len(lengths) else 0
    ref = None if batch.ref_logps is None else batch.ref_logps[rows]
    return PairBatch(
        batch.inputs[rows, :width],
        batch.targets[rows, :width],
        batch.mask[rows, :width],
        lengths,
        batch.pairs[start:stop],
        ref,
        world,
    )


def pair_epoch_batches(
    split: PreferenceSplit,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    pad_id: int,
    shuffle: bool = True,
) -> list:
    """One epoch of pair batches: pairs sorted by width, chunked, batch order permuted by
    (seed, epoch)."""
    chunks = sorted_chunks(split.widths(), batch_size)
    if shuffle:
        chunks = shuffled(chunks, seed, epoch)
    return [make_pair_batch(split, c, pad_id) for c in chunks]


def pair_eval_batches(
    split: PreferenceSplit, batch_size: int, pad_id: int, limit: int = -1
) -> list:
    """Sorted, unshuffled pair batches; with a `limit`, that many spread over the length range."""
    return [
        make_pair_batch(split, c, pad_id)
        for c in spread(sorted_chunks(split.widths(), batch_size), limit)
    ]
