"""`mlxft data`: what the trainer will see, before it sees it.

Everything comes from the trainer's own path (`load_splits`, `epoch_batches`): the rendered
examples are decoded from the token ids, and the marked spans are the tokens whose target mask
is on, so a wrong chat template or mask shows here exactly as it would train.  Spans are decoded
in context (the text of ids[:end] minus the text of ids[:start]) so SentencePiece's leading
spaces and multi-byte characters come out as the tokenizer writes them.
"""

from __future__ import annotations

import numpy as np

from mlxft.data.batching import epoch_batches, padding_fraction
from mlxft.data.preference import pair_epoch_batches

GREEN, RESET = "\x1b[32;1m", "\x1b[0m"


def spans(tokenizer, ids, mask) -> list:
    """[(text, trained)] runs of consecutive tokens with the same mask value, decoded in context."""
    ids = [int(t) for t in ids]
    mask = np.asarray(mask, dtype=bool)
    cache: dict = {}

    def text(n: int) -> str:
        if n not in cache:
            cache[n] = tokenizer.decode(
                ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return cache[n]

    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and mask[end] == mask[start]:
            continue
        before, upto = text(start), text(end)
        piece = (
            upto[len(before) :]
            if upto.startswith(before)
            else tokenizer.decode(
                ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )
        out.append((piece, bool(mask[start])))
        start = end
    return out


def mark(runs: list, color: bool) -> str:
    """Trained runs in colour (a terminal) or between [[ and ]] (anything else)."""
    open_, close = (GREEN, RESET) if color else ("[[", "]]")
    return "".join(f"{open_}{t}{close}" if trained and t else t for t, trained in runs)


def histogram(lengths, bins: int = 10, width: int = 40) -> list:
    """Text bars of example lengths (tokens)."""
    lengths = np.asarray(lengths)
    if lengths.min() == lengths.max():
        return [f"  {int(lengths[0]):>6} tokens | {'#' * width} {len(lengths)}"]
    counts, edges = np.histogram(lengths, bins=min(bins, int(lengths.max() - lengths.min()) + 1))
    top = max(int(counts.max()), 1)
    return [
        f"  {int(np.ceil(lo)):>6}-{int(np.floor(hi)):<6}| "
        f"{'#' * round(width * c / top):<{width}} {c}"
        for lo, hi, c in zip(edges[:-1], edges[1:], counts)
    ]


def split_lines(name: str, split, max_seq_length: int) -> list:
    lengths = np.array([len(s) for s in split.sequences])
    trained = int(sum(int(np.sum(m)) for m in split.masks))
    total = int(lengths.sum())
    return [
        f"Data {name}: {len(split)} examples, format {split.format}, from {split.source}",
        f"  tokens {total} ({trained} trained, {100 * trained / max(total, 1):.1f}%); length min "
        f"{lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}; "
        f"{split.truncated} truncated to max_seq_length {max_seq_length}, "
        f"{split.dropped} dropped (no trained token left)",
    ]


def report(cfg, splits: dict, tokenizer, pad_id: int, split: str, count: int, color: bool) -> list:
    """The whole `mlxft data` output, as lines."""
    from mlxft.data.render import unwrap

    tok = unwrap(tokenizer)
    lines = []
    for name, s in splits.items():
        lines += split_lines(name, s, cfg.max_seq_length)
    train = splits["train"]
    lines.append("Length histogram (train, tokens per example):")
    lines += histogram([len(s) for s in train.sequences])
    batches = epoch_batches(train, cfg.batch_size, seed=cfg.seed, epoch=0, pad_id=pad_id)
    lines.append(
        f"Batching: {len(batches)} batches of up to {cfg.batch_size} per epoch (length-sorted), "
        f"padding {100 * padding_fraction(batches):.1f}% of batch positions"
    )
    shown = splits[split]
    n = min(count, len(shown))
    rows = [(f"{split} example {i + 1}", shown.sequences[i], shown.masks[i]) for i in range(n)]
    return lines + examples(tok, f"{n} {split} examples", rows, color)


def examples(tok, what: str, rows: list, color: bool) -> list:
    """Rows of (title, ids, mask): a heading, then each text with its trained spans marked."""
    legend = "green" if color else "between [[ and ]]"
    lines = [f"First {what} as the model sees them; trained tokens {legend}:"]
    for title, ids, mask in rows:
        lines.append(f"--- {title}: {len(ids)} tokens, {int(np.sum(mask))} trained")
        lines.append(mark(spans(tok, ids, mask), color))
    return lines


def pair_split_lines(name: str, split, cfg) -> list:
    """A preference split's counts: pairs, each side's tokens and trained tokens, truncation."""
    lines = [f"Data {name}: {len(split)} pairs, format {split.format}, from {split.source}"]
    for side in ("chosen", "rejected"):
        rows, masks = getattr(split, side), getattr(split, f"{side}_masks")
        lengths = np.array([len(r) for r in rows])
        trained = int(sum(int(np.sum(m)) for m in masks))
        lines.append(
            f"  {side}: tokens {int(lengths.sum())} ({trained} trained: the answers); length min "
            f"{lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}"
        )
    limit = f"max_prompt_length {cfg.max_prompt_length}, " if cfg.max_prompt_length else ""
    lines.append(
        f"  {split.truncated} pairs truncated ({limit}max_seq_length {cfg.max_seq_length})"
    )
    return lines


def pair_report(
    cfg, splits: dict, tokenizer, pad_id: int, split: str, count: int, color: bool
) -> list:
    """`mlxft data --train-mode dpo|orpo`: the same report for preference pairs; a batch of B
    pairs is one model batch of 2B rows (chosen, then rejected), padded to its longest row."""
    from mlxft.data.render import unwrap

    tok = unwrap(tokenizer)
    lines = []
    for name, s in splits.items():
        lines += pair_split_lines(name, s, cfg)
    train = splits["train"]
    lines.append("Length histogram (train, tokens of a pair's longer side):")
    lines += histogram(train.widths())
    batches = pair_epoch_batches(train, cfg.batch_size, seed=cfg.seed, epoch=0, pad_id=pad_id)
    lines.append(
        f"Batching: {len(batches)} batches of up to {cfg.batch_size} pairs "
        f"({2 * cfg.batch_size} rows) per epoch (length-sorted), padding "
        f"{100 * padding_fraction(batches):.1f}% of batch positions"
    )
    shown = splits[split]
    n = min(count, len(shown))
    rows = [
        (
            f"{split} pair {i + 1}, {side}",
            getattr(shown, side)[i],
            getattr(shown, f"{side}_masks")[i],
        )
        for i in range(n)
        for side in ("chosen", "rejected")
    ]
    return lines + examples(tok, f"{n} {split} pairs", rows, color)
