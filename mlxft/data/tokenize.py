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
