"""Length-sorted, padded numpy batches, shared by the MLX and the PyTorch trainer.

Sorting by length before chunking keeps padding (wasted compute) low; shuffling the *order*
of batches with a generator seeded by (seed, epoch) keeps training stochastic yet makes the
batch list a pure function of its arguments, so a resumed run replays exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlxft import flags


@dataclass
class Batch:
    inputs: np.ndarray  # (B, T) int32 = tokens[:, :-1], padded
    targets: np.ndarray  # (B, T) int32 = tokens[:, 1:], padded
    mask: np.ndarray  # (B, T) float32, 1.0 where targets[b, t] is trained
    lengths: np.ndarray  # (B,) int32 token count of each example before padding

    @property
    def ntokens(self) -> int:
        return int(self.mask.sum())

    @property
    def real_tokens(self) -> int:
        """Positions whose input and target are both real tokens: len - 1 per example."""
        return int(np.sum(self.lengths - 1))


def make_batch(sequences, masks, pad_id: int) -> Batch:
    """Pad to this batch's own longest example; padded positions are never targets."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    width = int(lengths.max())
    tokens = np.full((len(sequences), width), pad_id, dtype=np.int32)
    target = np.zeros((len(sequences), width), dtype=bool)
    for row, (seq, m) in enumerate(zip(sequences, masks)):
        tokens[row, : len(seq)] = seq
        target[row, : len(seq)] = m
    return Batch(tokens[:, :-1], tokens[:, 1:], target[:, 1:].astype(np.float32), lengths)


def share_bounds(rows: int, rank: int, size: int) -> tuple:
    """[start, stop) of rank `rank`'s rows among `rows`: contiguous, sizes differing by at most
    one (the first `rows % size` ranks take one more)."""
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def share(batch: Batch, rank: int, size: int) -> Batch:
    """Rank `rank`'s contiguous rows of a length-sorted `batch`, padded to their own longest row.

    Data parallelism splits each global batch into `size` shares (`batch_size` divides evenly;
    only an epoch's short last batch gives uneven shares, and a rank may get no row: it then
    contributes nothing to the step but still takes part in the all-reduce).  Dropping the
    trailing columns that are padding in every row of the share is exact: the models are causal
    and padding only ever follows the real tokens, so no kept position ever saw them."""
    if size == 1:
        return batch
    start, stop = share_bounds(len(batch.lengths), rank, size)
    lengths = batch.lengths[start:stop]
    width = int(lengths.max()) - 1 if len(lengths) else 0
    rows = slice(start, stop)
    return Batch(
        batch.inputs[rows, :width],
        batch.targets[rows, :width],
        batch.mask[rows, :width],
        lengths,
    )


def head_rows(mask: np.ndarray, multiple: int = 1, most: float = 0.95):
    """Flat (B*T) indices of the positions that carry a target, or None when nearly all do
    (or when MLXFT_HEAD_ROWS=0, for A/B runs).

    The output head and the loss need to run only there.  With a prompt masked (chat,
    completions) that is often a minority of the positions, and the head is the widest matmul
    of a small model (dim x vocab per position).  `multiple` rounds the count up with an
    untrained position (mask 0, so it adds nothing) so that compiled steps see few shapes."""
    if not flags.head_rows():
        return None
    flat = mask.reshape(-1)
    rows = np.flatnonzero(flat)
    if rows.size > most * flat.size:
        return None
    extra = -rows.size % multiple
    if extra:
        rows = np.concatenate([rows, np.repeat(np.flatnonzero(flat == 0)[:1], extra)])
    return rows.astype(np.int32)


def sorted_chunks(lengths, batch_size: int) -> list[np.ndarray]:
    """Example indices sorted by length (stable), cut into batches of `batch_size`."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shuffled(chunks: list, seed: int, epoch: int) -> list:
    """The batches in the order of epoch `epoch`: a permutation seeded by (seed, epoch)."""
    perm = np.random.default_rng((seed, epoch)).permutation(len(chunks))
    return [chunks[i] for i in perm]


def spread(chunks: list, limit: int) -> list:
    """`limit` of the sorted batches, evenly spaced over the length range (all when limit < 0).

    Taking the *first* `limit` sorted batches would evaluate only the shortest examples and
    bias the validation loss low; evenly spaced batches keep it representative and fixed."""
    if 0 <= limit < len(chunks):
        picks = ((np.arange(limit) + 0.5) * len(chunks) / limit).astype(int)  # strata centres
        chunks = [chunks[i] for i in picks]
    return chunks


def _chunks(split, batch_size: int) -> list[np.ndarray]:
    return sorted_chunks([len(s) for s in split.sequences], batch_size)


def _build(split, chunks, pad_id) -> list:
    return [
        make_batch([split.sequences[i] for i in c], [split.masks[i] for i in c], pad_id)
        for c in chunks
    ]


def epoch_batches(
    split, batch_size: int, *, seed: int, epoch: int, pad_id: int, shuffle: bool = True
) -> list:
    """All batches of one epoch: sorted by length, chunked, batch order permuted by (seed,
    epoch)."""
    chunks = _chunks(split, batch_size)
    if shuffle:
        chunks = shuffled(chunks, seed, epoch)
    return _build(split, chunks, pad_id)


def eval_batches(split, batch_size: int, pad_id: int, limit: int = -1) -> list:
    """Sorted, unshuffled batches; with a `limit`, that many spread evenly over the length
    range (`spread`)."""
    return _build(split, spread(_chunks(split, batch_size), limit), pad_id)


def padding_fraction(batches) -> float:
    """Share of padded positions among all B*T input positions."""
    total = sum(b.inputs.size for b in batches)
    return 0.0 if total == 0 else 1.0 - sum(b.real_tokens for b in batches) / total
