"""Text generation for both backends: sampling, stopping, streaming text.

A backend only provides `start_generation(prompt_ids)` and `next_logits(token_id)` (float32
numpy logits of the last position); everything a user can tune or observe lives here once,
so `--backend mlx` and `--backend torch` pick the same tokens from the same logits.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft.data.templates import end_of_turn_ids
from mlxft.errors import UserError


# ---------------------------------------------------------------------------- sampling
@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax), deterministic
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def check(self) -> None:
        for flag, value in (
            ("--temp", self.temperature),
            ("--top-p", self.top_p),
            ("--repetition-penalty", self.repetition_penalty),
        ):
            if not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value}")
        if self.temperature < 0:
            raise UserError(f"--temp must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserError(
                f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )


class Sampler:
    """Picks the next token the way transformers does: repetition penalty, then temperature,
    top-k, top-p, then a draw from a seeded numpy Generator (or argmax at temperature 0)."""

    def __init__(self, params: SamplingParams):
        params.check()
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def penalized(self, logits: np.ndarray, context: list) -> np.ndarray:
        """float64 logits with transformers' repetition penalty on every token of `context`:
        a positive logit is divided by the penalty, a negative one multiplied."""
        logits = np.asarray(logits, dtype=np.float64).copy()
        if self.p.repetition_penalty != 1.0 and context:
            seen = np.unique(np.asarray(context, dtype=np.int64))
            seen = seen[seen < logits.shape[0]]
            score = logits[seen]
            logits[seen] = np.where(
                score < 0, score * self.p.repetition_penalty, score / self.p.repetition_penalty
            )
        return logits

    def probabilities(self, logits: np.ndarray, context: list) -> np.ndarray:
        """The distribution sampled from at temperature > 0 (after temperature, top-k, top-p)."""
        logits = self.penalized(logits, context) / self.p.temperature
        if 0 < self.p.top_k < logits.shape[0]:
            kth = np.partition(logits, -self.p.top_k)[-self.p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_probs = probs[order]
            before = np.cumsum(sorted_probs) - sorted_probs  # mass of the more likely tokens
            probs[order[before >= self.p.top_p]] = 0.0  # the most likely token always stays
            probs /= probs.sum()
        return probs

    def __call__(self, logits: np.ndarray, context: list) -> int:
        if self.p.temperature == 0:
            return int(np.argmax(self.penalized(logits, context)))
        cdf = np.cumsum(self.probabilities(logits, context))
        return int(
            min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(cdf) - 1)
        )


# ---------------------------------------------------------------------------- text
def _decode(tokenizer, ids: list) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class StreamDecoder:
    """Text as it grows, token by token.

    Decoding one token alone loses SentencePiece's leading spaces and splits multi-byte
    characters, so each new token is decoded together with a few tokens before it and only
    the difference is emitted; text ending in U+FFFD (an incomplete UTF-8 sequence) is held
    back until the rest of the character arrives (the approach of HF's
    text-generation-inference)."""

    def __init__(self, tokenizer, context_ids: list, lookback: int = 5):
        self.tok = tokenizer
        self.ids = [int(t) for t in context_ids[-lookback:]]
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back (a partial character at the very end is emitted as is)."""
        return self._advance(final=True) if self.read < len(self.ids) else ""

    def _advance(self, final: bool) -> str:
        before = _decode(self.tok, self.ids[self.prefix : self.read])
        now = _decode(self.tok, self.ids[self.prefix :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""


# ---------------------------------------------------------------------------- prompts and stops
def raw_prompt_ids(tokenizer, prompt: str) -> list:
    return list(tokenizer.encode(prompt, add_special_tokens=True))


def _ids(value) -> set:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def eos_ids(
    tokenizer, model_path: Path, model_config: dict, chat: bool, override: str | None = None
) -> set:
    """Tokens that end generation: the tokenizer's EOS, `eos_token_id` of config.json and
    generation_config.json (an int or a list), and in chat the template's end-of-turn."""
    found = _ids(getattr(tokenizer, "eos_token_id", None)) | _ids(model_config.get("eos_token_id"))
    gen_file = Path(model_path) / "generation_config.json"
    if gen_file.is_file():
        try:
            found |= _ids(json.loads(gen_file.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise UserError(
                f"{gen_file}: invalid JSON or eos_token_id; fix or remove the file"
            ) from None
    if chat:
        found |= end_of_turn_ids(tokenizer, override)
    return found


# ---------------------------------------------------------------------------- the loop
@dataclass
class Result:
    text: str
    tokens: list = field(default_factory=list)
    finish_reason: str = "length"  # stop | length | context
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def stats(self) -> str:
        return (
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens-per-sec\n"
            f"Generation: {len(self.tokens)} tokens, {self.generation_tps:.1f} tokens-per-sec\n"
            f"Peak memory: {self.peak_memory_gb:.3f} GB"
        )


def check_context(n_prompt: int, context_length: int | None) -> None:
    if n_prompt == 0:
        raise UserError("the prompt is empty")
    if context_length and n_prompt >= context_length:
        raise UserError(
            f"the prompt is {n_prompt} tokens, the model's context window is {context_length} "
            "(max_position_embeddings); shorten the prompt"
        )


def generate(
    backend,
    tokenizer,
    prompt_ids: list,
    sampler: Sampler,
    max_tokens: int,
    stop_ids: set,
    context_length: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Result:
    """Generate up to `max_tokens` after `prompt_ids`; stop tokens end it and are not part of the
    text.
    `on_text` receives each new piece of text as soon as it is complete."""
    check_context(len(prompt_ids), context_length)
    limit = max_tokens if not context_length else min(max_tokens, context_length - len(prompt_ids))
    decoder = StreamDecoder(tokenizer, prompt_ids)
    pieces, tokens, reason = [], [], "length" if limit == max_tokens else "context"
    context = list(prompt_ids)

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            if on_text:
                on_text(text)

    tic = time.perf_counter()
    logits = backend.start_generation(list(prompt_ids))
    prompt_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    while len(tokens) < limit:
        token = sampler(logits, context)
        if token in stop_ids:
            reason = "stop"
            break
        tokens.append(token)
        context.append(token)
        emit(decoder.add(token))
        if len(tokens) < limit:
            logits = backend.next_logits(token)
    emit(decoder.flush())
    gen_seconds = time.perf_counter() - tic
    return Result(
        "".join(pieces),
        tokens,
        reason,
        len(prompt_ids),
        len(prompt_ids) / max(prompt_seconds, 1e-9),
        len(tokens) / max(gen_seconds, 1e-9),
        backend.peak_memory_gb(),
    )
