"""`eval_prompts`: greedy generations at each evaluation, to watch behaviour change, not only loss.

Prompts are rendered the way the training data is (`mlxft.inference.evaluate.sample_prompt_ids`)
and generated with `mlxft.inference.sampling.generate` (the backend's start_generation /
next_logits).  Greedy decoding draws no random numbers and `end_generation` puts the model back in
its training mode, so a run with eval_prompts trains exactly as one without (tested on both
backends, with LoRA dropout).
"""

from __future__ import annotations

from pathlib import Path

from mlxft.data.records import read_records
from mlxft.data.render import Renderer, unwrap
from mlxft.errors import UserError
from mlxft.inference.evaluate import sample_prompt_ids, uses_chat
from mlxft.inference.load import context_length
from mlxft.inference.sampling import Sampler, SamplingParams, eos_ids, generate
from mlxft.model_dir import read_model_config


def read_prompts(value) -> list:
    """eval_prompts as a list: given inline, or read from a .txt (one per line) / .jsonl / .json
    file whose records have a "prompt" field."""
    if isinstance(value, list):
        return list(value)
    path = Path(value)
    if not path.is_file():
        raise UserError(
            f"eval_prompts: file {path} not found (give a list of prompts or a .txt/.jsonl file)"
        )
    if path.suffix in (".jsonl", ".json"):
        prompts = []
        for where, record in read_records(path):
            if not isinstance(record.get("prompt"), str) or not record["prompt"]:
                raise UserError(
                    f'{where}: an eval_prompts record needs a non-empty string "prompt"'
                )
            prompts.append(record["prompt"])
        return prompts
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"eval_prompts: {path} has no prompts")
    return prompts


class EvalSamples:
    """The prompts, tokenized once and checked against the context window; `run(backend)`
    generates them greedily."""

    def __init__(self, cfg, tokenizer, model_path: Path, train_format: str):
        self.prompts = read_prompts(cfg.eval_prompts)
        self.max_tokens = cfg.eval_max_tokens
        self.tok = unwrap(tokenizer)
        renderer = Renderer(cfg, tokenizer)
        self.ids = [sample_prompt_ids(renderer, p, train_format) for p in self.prompts]
        model_config = read_model_config(model_path)
        self.context = context_length(model_config)
        for i, ids in enumerate(self.ids):
            if self.context and len(ids) + 1 > self.context:
                raise UserError(
                    f"eval_prompts[{i}]: the prompt is {len(ids)} tokens, the model's context "
                    f"window is {self.context} (max_position_embeddings); shorten it"
                )
        chat = uses_chat([train_format], renderer)
        self.stops = eos_ids(self.tok, model_path, model_config, chat, renderer.override)

    def run(self, backend) -> list:
        """[{"prompt", "output"}] for every prompt, greedy; the backend's training mode is
        restored afterwards."""
        out = []
        try:
            for prompt, ids in zip(self.prompts, self.ids):
                result = generate(
                    backend,
                    self.tok,
                    ids,
                    Sampler(SamplingParams()),
                    self.max_tokens,
                    self.stops,
                    self.context,
                )
                out.append({"prompt": prompt, "output": result.text})
        finally:
            backend.end_generation()
        return out
