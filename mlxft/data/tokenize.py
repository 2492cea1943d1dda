"""Pieces → token ids + a target mask, deciding targets by character offsets.

Consecutive text pieces are joined and tokenized as ONE string (so tokens are exactly what the
model sees at inference, merges across a prompt/completion boundary included); a token is a
target when any character it covers is.  Masks are never derived from token *values*, so an
EOS that doubles as the pad id is still trained.
"""

from __future__ import annotations

import numpy as np

from mlxft.data.render import EOS, Piece


def _encode_run(
    tok, run: list[tuple[str, bool]], add_special: bool
) -> tuple[list[int], np.ndarray]:
    text = "".join(t for t, _ in run)
    try:
        enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True, verbose=False)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return _encode_pieces(tok, run, add_special)  # slow tokenizers have no offsets
    ids = list(enc["input_ids"])
    chars = np.repeat(np.array([tgt for _, tgt in run], dtype=np.int64), [len(t) for t, _ in run])
    cum = np.concatenate([[0], np.cumsum(chars)])
    start = np.clip(offsets[:, 0], 0, len(text))
    end = np.clip(offsets[:, 1], 0, len(text))
    return ids, (cum[end] - cum[start] > 0) & (end > start)


def _encode_pieces(tok, run, add_special):
    """Fallback without offsets: tokenize piece by piece (boundaries may tokenize differently)."""
    ids, mask = [], []
    for i, (text, tgt) in enumerate(run):
        part = tok(text, add_special_tokens=add_special and i == 0, verbose=False)["input_ids"]
        ids += list(part)
        mask += [tgt] * len(part)
    return ids, np.array(mask, dtype=bool)


def encode(
    tokenizer, pieces: list[Piece], add_special: bool, eos_id
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, targets bool); the caller decides mask_prompt and token 0."""
    ids: list[int] = []
    masks: list[np.ndarray] = []
    run: list[tuple[str, bool]] = []
    first = True

    def flush():
        nonlocal first, run
        if run and (any(t for t, _ in run) or (first and add_special)):
            part, mask = _encode_run(tokenizer, run, add_special and first)
            ids.extend(part)
            masks.append(mask)
            first = False
        run = []

    for piece, target in pieces:
        if isinstance(piece, str):
            run.append((piece, target))
            continue
        flush()
        if piece == EOS:
            if eos_id is None or (ids and ids[-1] == eos_id):
                continue
            piece = eos_id
        ids.append(int(piece))
        masks.append(np.array([target], dtype=bool))
    flush()
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    return np.asarray(ids, dtype=np.int32), mask.astype(bool)


# ---------------------------------------------------------------------------- character budget
# Tokens kept beyond max_seq_length before the cut, so that the tokens a cut word turns into
# (its last, changed merges) fall after the truncation point.
MARGIN_TOKENS = 16


def longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary string (byte-level
    vocabularies spell each byte as one character, and a character is at least one byte)."""
    vocab = getattr(tokenizer, "get_vocab", dict)()
    return max((len(t) for t in vocab), default=16) or 1


def char_budget(max_tokens: int, longest_token: int) -> int:
    """Characters that always hold more than `max_tokens` + MARGIN_TOKENS tokens (each token
    covers at most `longest_token` characters): text beyond them is truncated anyway, so it is
    cut off before tokenizing and a record of any size costs the same."""
    return (max_tokens + MARGIN_TOKENS) * longest_token


def clip_record(value, budget: int):
    """Every string inside a record (messages included) cut to `budget` characters: a field
    longer than that already fills the sequence on its own."""
    if isinstance(value, str):
        return value[:budget]
    if isinstance(value, dict):
        return {k: clip_record(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [clip_record(v, budget) for v in value]
    return value


def cut_pieces(pieces: list, budget: int) -> tuple:
    """(the pieces up to `budget` characters of text in all, whether anything was cut)."""
    out, used = [], 0
    for piece, target in pieces:
        if isinstance(piece, str):
            if used + len(piece) > budget:
                out.append((piece[: budget - used], target))
                return out, True
            used += len(piece)
        out.append((piece, target))
    return out, False


def record_size(value) -> int:
    """Characters of text in a record (strings, nested)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(record_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(record_size(v) for v in value)
    return 0
