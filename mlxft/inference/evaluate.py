"""`mlxft evaluate`: generate for each record of a split and score the text against its reference.

Prompts are built by the training renderer (same chat template, same BOS, same tokenization as
the tokens the model was trained on) and cut before the last trained span: the completion of a
prompt/completion record, the last assistant turn of a chat, the output of an alpaca record, the
completion_template of a templated one, or, for plain text, whatever follows `--text-split`.

Generation is greedy and batched: prompts sorted by length, left-padded, one KV cache for the
batch (`start_batch_generation` / `next_batch_logits` on both backends; a model whose cache has
no batched form falls back to one sequence at a time).  Scores: `mlxft.inference.scores`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from mlxft import progress
from mlxft.adapters.files import trained_quantization
from mlxft.data.loader import load_records
from mlxft.data.records import sharegpt_messages, validate
from mlxft.data.render import Renderer
from mlxft.data.tokenize import encode
from mlxft.errors import UserError
from mlxft.inference.load import load_for_inference
from mlxft.inference.sampling import StreamDecoder, eos_ids
from mlxft.inference.scores import SCORING, score, scorers

CHAT_FORMATS = ("chat", "sharegpt", "alpaca")


@dataclass
class Example:
    where: str
    prompt_ids: list
    reference: str


# --------------------------------------------------------------------------- prompts
def prompt_ids(renderer: Renderer, record: dict, fmt: str, where: str) -> list:
    """Token ids of the record's rendering up to its last trained span (its generation prompt)."""
    pieces, add_special = renderer.render(record, fmt, where)
    last = max(i for i, (piece, target) in enumerate(pieces) if target and isinstance(piece, str))
    ids, _ = encode(renderer.tok, pieces[:last], add_special, renderer.eos_id)
    return [int(t) for t in ids]


def reference(record: dict, fmt: str, renderer: Renderer, where: str) -> str:
    """The text the model should produce for the record (the last assistant turn of a chat)."""
    if fmt == "completion":
        return record["completion"]
    if fmt == "alpaca":
        return record["output"]
    if fmt == "template":
        return renderer._format("completion_template", record, where)
    messages = sharegpt_messages(record) if fmt == "sharegpt" else record["messages"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if not replies:
        raise UserError(
            f"{where}: no assistant turn to compare with; evaluate needs one per conversation"
        )
    return replies[-1]


def examples(records: list, fmt: str, renderer: Renderer, text_split: str | None) -> list:
    """(where, prompt ids, reference) for every record of one source."""
    out = []
    for where, record in records:
        validate(record, fmt, where)
        if fmt == "text":
            out.append(_text_example(renderer, record["text"], where, text_split))
            continue
        out.append(
            Example(
                where,
                prompt_ids(renderer, record, fmt, where),
                reference(record, fmt, renderer, where),
            )
        )
    return out


def _text_example(renderer: Renderer, text: str, where: str, marker: str | None) -> Example:
    if not marker:
        raise UserError(
            f"{where}: plain-text records hold no prompt/reference pair; pass --text-split MARKER "
            "(the prompt ends at its last occurrence, e.g. --text-split 'A:')"
        )
    cut = text.rfind(marker)
    if cut < 0:
        raise UserError(f"{where}: --text-split {marker!r} does not occur in this record")
    cut += len(marker)
    ids, _ = encode(renderer.tok, [(text[:cut], False)], True, renderer.eos_id)
    return Example(where, [int(t) for t in ids], text[cut:])


def sample_prompt_ids(renderer: Renderer, prompt: str, train_format: str) -> list:
    """An eval prompt rendered as the training data was: a user turn (and the assistant header)
    for chat-like data, the completion rule for prompt/completion data, raw text otherwise."""
    if train_format in CHAT_FORMATS:
        record = {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "x"}]
        }
        return prompt_ids(renderer, record, "chat", "eval_prompts")
    if train_format == "completion":
        return prompt_ids(
            renderer, {"prompt": prompt, "completion": "x"}, "completion", "eval_prompts"
        )
    ids, _ = encode(renderer.tok, [(prompt, False)], True, renderer.eos_id)
    return [int(t) for t in ids]


def uses_chat(formats: list, renderer: Renderer) -> bool:
    """Whether generation ends at the chat template's end-of-turn too."""
    return any(f in CHAT_FORMATS for f in formats) or (
        "completion" in formats and renderer.completion_uses_chat()
    )


# --------------------------------------------------------------------------- generation
def generate_greedy(
    backend,
    tokenizer,
    prompts: list,
    max_tokens: int,
    stop_ids: set,
    context_length: int | None = None,
    batch_size: int = 8,
    on_done: Callable[[int], None] | None = None,
) -> list:
    """Greedy text for every prompt (token-id lists), `batch_size` at a time; the same tokens
    as `mlxft.inference.sampling.generate` at temperature 0 (tested), stop tokens not included."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list = [None] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            outputs = _batch(
                backend, [prompts[i] for i in chunk], max_tokens, stop_ids, context_length
            )
            for i, tokens in zip(chunk, outputs):
                texts[i] = _decode(tokenizer, prompts[i], tokens)
            if on_done:
                on_done(len(chunk))
    finally:
        backend.end_generation()
    return texts


def _limits(prompts: list, max_tokens: int, context_length: int | None) -> list:
    return [
        max_tokens if not context_length else max(0, min(max_tokens, context_length - len(p)))
        for p in prompts
    ]


def _batch(
    backend, prompts: list, max_tokens: int, stop_ids: set, context_length: int | None
) -> list:
    limits = _limits(prompts, max_tokens, context_length)
    try:
        logits = backend.start_batch_generation(prompts)
    except NotImplementedError:
        return [_one(backend, p, n, stop_ids) for p, n in zip(prompts, limits)]
    tokens: list = [[] for _ in prompts]
    done = [n == 0 for n in limits]
    while not all(done):
        picks = [int(np.argmax(row)) for row in logits]
        for r, pick in enumerate(picks):
            if done[r]:
                continue
            if pick in stop_ids:
                done[r] = True
                continue
            tokens[r].append(pick)
            done[r] = len(tokens[r]) >= limits[r]
        if not all(done):
            logits = backend.next_batch_logits(picks)
    return tokens


def _one(backend, prompt: list, limit: int, stop_ids: set) -> list:
    tokens: list = []
    if limit == 0:
        return tokens
    logits = backend.start_generation(list(prompt))
    while True:
        pick = int(np.argmax(logits))
        if pick in stop_ids:
            return tokens
        tokens.append(pick)
        if len(tokens) >= limit:
            return tokens
        logits = backend.next_logits(pick)


def _decode(tokenizer, prompt: list, tokens: list) -> str:
    """The generated text exactly as `mlxft generate` streams it (leading spaces kept)."""
    decoder = StreamDecoder(tokenizer, prompt)
    return "".join(decoder.add(t) for t in tokens) + decoder.flush()


# --------------------------------------------------------------------------- the command's work
def run(
    cfg,
    adapter_path: str | None,
    split: str,
    max_tokens: int,
    limit: int | None,
    batch_size: int,
    text_split: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Load the model (+ adapter), generate for the split's records, score; the report as a dict."""
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    scorers()  # a missing extra fails before the model loads
    parts = load_records(cfg)
    if split not in parts:
        raise UserError(
            f"{cfg.data or 'hf_dataset'}: no {split} split (there are: {', '.join(parts)}); "
            "pass --split " + ("valid" if "valid" in parts else "train")
        )
    quantization = trained_quantization(adapter_path) if cfg.backend == "mlx" else {}
    loaded = load_for_inference(
        cfg.model,
        adapter_path,
        backend=cfg.backend,
        device=cfg.device,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
        quantization=quantization,
    )
    renderer = Renderer(replace(cfg, mask_prompt=True), loaded.tokenizer)
    found, formats = [], []
    for _, records, fmt in parts[split]:
        found += examples(records[:limit] if limit else records, fmt, renderer, text_split)
        formats.append(fmt)
    found = found[:limit] if limit else found
    stops = eos_ids(
        loaded.tokenizer,
        loaded.model_path,
        loaded.model_config,
        uses_chat(formats, renderer),
        renderer.override,
    )
    context = loaded.context_length
    kept = [e for e in found if not context or len(e.prompt_ids) < context]
    skipped = [e.where for e in found if context and len(e.prompt_ids) >= context]
    for where in skipped[:3]:
        echo(
            f"Skipped {where}: its prompt is not shorter than the context window ({context} tokens)"
        )
    if not kept:
        raise UserError(
            f"{split}: no record left to evaluate (every prompt is at least the context window)"
        )
    with progress.bar(len(kept), "Evaluating", unit="ex") as bar:
        predictions = generate_greedy(
            loaded.backend,
            loaded.tokenizer,
            [e.prompt_ids for e in kept],
            max_tokens,
            stops,
            context,
            batch_size,
            on_done=bar.update,
        )
    summary, rows = score(predictions, [e.reference for e in kept])
    results = [
        {
            "where": e.where,
            "prompt": _text(loaded.tokenizer, e.prompt_ids),
            "reference": e.reference,
            "prediction": pred,
            **row,
        }
        for e, pred, row in zip(kept, predictions, rows)
    ]
    return {
        "model": cfg.model,
        "adapter_path": adapter_path,
        "data": cfg.data or cfg.hf_dataset,
        "split": split,
        "formats": formats,
        "backend": cfg.backend,
        "max_tokens": max_tokens,
        "examples": len(kept),
        "skipped": skipped,
        "scores": summary,
        "scoring": SCORING,
        "results": results,
    }


def _text(tokenizer, ids: list) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def summary_lines(report: dict, worst: int) -> list:
    s = report["scores"]
    lines = [
        f"{report['split']}: {report['examples']} examples, exact match {s['exact_match']:.1f}%, "
        f"normalized {s['normalized_exact_match']:.1f}%, ROUGE-L (char) {s['rouge_l']:.1f}, "
        f"BLEU (char) {s['bleu']:.1f}"
    ]
    if report["skipped"]:
        lines.append(
            f"skipped {len(report['skipped'])} records whose prompt fills the context window"
        )
    ranked = sorted(report["results"], key=lambda r: (r["rouge_l"], r["bleu"]))[:worst]
    if ranked:
        lines.append(f"Worst {len(ranked)} by ROUGE-L:")
    for r in ranked:
        lines.append(f"  {r['where']}  ROUGE-L {r['rouge_l']:.1f}")
        lines.append(f"    reference:  {_one_line(r['reference'])}")
        lines.append(f"    prediction: {_one_line(r['prediction'])}")
    return lines


def _one_line(text: str, limit: int = 200) -> str:
    text = text.strip().replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."
