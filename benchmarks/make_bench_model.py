"""Build the benchmark model and data offline, under benchmarks/.cache/ (gitignored).

Why a home-made model: benchmarks must run without a network, yet measure a model of the size
people fine-tune on a laptop CPU.  This writes

  .cache/bench-40m/      a random-init fp32 Llama (hidden 512, 8 blocks, 8 heads, MLP 1376,
                         vocab 32000, tied embeddings: 41.7M parameters) as a Hugging Face
                         directory, with a 32000-entry byte-level BPE tokenizer trained on a
                         generic corpus (Python's standard library source: English docstrings
                         and code, not the benchmark data) with digits split one by one as
                         Llama's tokenizer does, so WikiSQL rows take ~40-190 tokens;
  .cache/data/raw/       WikiSQL rows as shipped (train/valid.jsonl);
  .cache/data/packed512/ rows concatenated to <= 480 tokens  (for max_seq_length 512);
  .cache/data/packed1024/                      <= 990 tokens  (max_seq_length 1024);
  .cache/data/packed2048/                      <= 2000 tokens (max_seq_length 2048);
  .cache/data/completions/ the raw rows as {"prompt": table + question, "completion": "A: SQL"},
                         for prompt-masked training (about a quarter of each row is trained).

The tokenizer carries a minimal chat template (BOS, the turns' contents back to back, EOS after
the assistant's), because mlx_lm reads prompt/completion rows through a chat template only;
every trainer then sees "<s>" + prompt + completion + "</s>", as for a text row.

Idempotent: existing outputs are kept unless --force.  Takes ~1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
MODEL_DIR = CACHE / "bench-40m"
DATA_DIR = CACHE / "data"
WIKISQL = REPO / "examples" / "data" / "wikisql"

VOCAB = 32000
DIMS = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1376,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
# name -> (max_seq_length, packed row budget in tokens; None = raw rows)
DATASETS = {
    "raw": (512, None),
    "packed512": (512, 480),
    "packed1024": (1024, 990),
    "packed2048": (2048, 2000),
}


def _corpus(limit_bytes: int = 12_000_000):
    """Generic text for the tokenizer: the Python standard library's own source files."""
    root = Path(os.__file__).parent
    used = 0
    for path in sorted(glob.glob(str(root / "**" / "*.py"), recursive=True)):
        if "site-packages" in path or "/test" in path:
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for start in range(0, len(text), 4000):
            yield text[start : start + 4000]
        used += len(text)
        if used > limit_bytes:
            return


def build_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"\d"), behavior="isolated"
            ),  # one token per digit, as Llama
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, vocab_size: int, seed: int = 0) -> int:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **DIMS)
    config.torch_dtype = "float32"
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _rows(split: str) -> list[str]:
    return [
        json.loads(line)["text"]
        for line in (WIKISQL / f"{split}.jsonl").read_text().splitlines()
        if line.strip()
    ]


def pack(texts: list[str], tokenizer, budget: int) -> list[str]:
    """Concatenate rows (blank line between) into packed rows of <= budget tokens (BOS and EOS
    included) by first-fit decreasing, so packed rows come out nearly the same length."""
    sized = sorted(
        ((len(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"]), t) for t in texts),
        key=lambda x: -x[0],
    )
    bins: list[list] = []  # [used tokens, texts]
    for n, text in sized:
        for b in bins:
            if b[0] + n <= budget:
                b[0] += n
                b[1].append(text)
                break
        else:
            bins.append([2 + n, [text]])
    return ["\n\n".join(b[1]) for b in bins if b[0] > budget * 0.9]


def write_data(tokenizer) -> dict:
    stats = {}
    for name, (max_len, budget) in DATASETS.items():
        folder = DATA_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            texts = _rows(split)
            if budget:
                texts = pack(texts, tokenizer, budget)
                if split == "valid" and len(texts) < 4:  # keep a few valid rows at long lengths
                    texts = pack(_rows("train")[-200:], tokenizer, budget)[:4]
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in texts)
            )
            lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]
            stats[f"{name}/{split}"] = {
                "rows": len(texts),
                "min": min(lengths),
                "max": max(lengths),
                "mean": round(sum(lengths) / len(lengths), 1),
            }
            assert max(lengths) <= max_len, (name, split, max(lengths))
    return stats


def ensure_chat_template(model_dir: Path) -> None:
    """Give a model built before the template existed the same template (idempotent)."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if (
        config.get("chat_template") != CHAT_TEMPLATE
        and not (model_dir / "chat_template.jinja").exists()
    ):
        config["chat_template"] = CHAT_TEMPLATE
        path.write_text(json.dumps(config, indent=2))


def write_completions() -> None:
    """The raw rows split before "A: ": the prompt is table, columns and question."""
    folder = DATA_DIR / "completions"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows = []
        for text in _rows(split):
            cut = text.index("\nA: ") + 1
            rows.append(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    if args.force and CACHE.exists():
        shutil.rmtree(CACHE)
    if not (MODEL_DIR / "model.safetensors").exists():
        tmp = CACHE / ".bench-40m.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tokenizer = build_tokenizer(tmp)
        params = build_model(tmp, len(tokenizer))
        os.replace(tmp, MODEL_DIR)
        print(f"model: {MODEL_DIR} ({params / 1e6:.1f}M parameters)")
    ensure_chat_template(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    if not (DATA_DIR / "completions" / "valid.jsonl").exists():
        write_completions()
    if not (DATA_DIR / "packed2048" / "valid.jsonl").exists():
        stats = write_data(tokenizer)
        (DATA_DIR / "stats.json").write_text(json.dumps(stats, indent=1))
    print(f"data: {DATA_DIR}")
    print((DATA_DIR / "stats.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
