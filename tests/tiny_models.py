"""Tiny Hugging Face model directories built offline: random weights, a trained BPE tokenizer.

Every family the tests cover is made the way a user's download looks (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with a chat template), so the
code under test takes the same path as with a real hub model.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "table: 1-10015132-11 columns: Player, No., Nationality, Position",
    "Q: What position does the player who played for butler cc (ks) play?",
    "A: SELECT Position FROM 1-10015132-11 WHERE School/Club Team = 'Butler CC (KS)'",
    "Once upon a time there was a little girl named Lily. She loved to play outside.",
    "The quick brown fox jumps over the lazy dog. 0123456789 = < > ( ) ' \" , . ? !",
    "### Instruction: answer the question. ### Response: yes, no, maybe <think> </think>",
]

FAMILIES = ("llama", "qwen2", "mistral", "phi3")


def build_tokenizer(out: Path, vocab_size: int = 320, chat_template: str | None = CHATML):
    """Byte-level BPE trained on a few lines; ChatML special tokens; saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return fast


def _config(family: str, vocab_size: int):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **common)
    if family == "phi3":
        return tf.Phi3Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=16, **common)
    raise ValueError(family)


def build_model(
    out: Path, family: str = "llama", seed: int = 0, chat_template: str | None = CHATML
):
    """A random-init `family` model with a trained tokenizer, saved as a HF directory (fp32)."""
    import torch
    import transformers as tf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, chat_template=chat_template)
    torch.manual_seed(seed)
    config = _config(family, len(tokenizer))
    config.torch_dtype = "float32"
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger-than-default weights so logits are not all ~0
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    gen = {"bos_token_id": 1, "eos_token_id": [2, tokenizer.convert_tokens_to_ids("<|im_end|>")]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


# ---------------------------------------------------------------------------- export models
# Models for the llama.cpp / Ollama export tests: each with a tokenizer of its family's real kind
# (llama.cpp re-implements tokenizers, so the test must exercise the kind the family ships):
# stories260K's sentencepiece for llama, mistral and phi3; a Qwen2-style byte-level BPE (the
# Qwen2 pre-tokenizer regex, ChatML special tokens, no BOS) for qwen2 and qwen3.
EXPORT_FAMILIES = ("llama", "mistral", "phi3", "qwen2", "qwen3")
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
STORIES = Path(__file__).resolve().parents[1] / "examples" / "models" / "stories260K"


def build_qwen_tokenizer(out: Path, chat_template: str, vocab_size: int = 320):
    """Byte-level BPE with Qwen2's pre-tokenizer and ChatML specials, no BOS (as Qwen2.5 ships)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.add_special_tokens(specials)  # after the merges, as in Qwen's files (ids at the end)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return fast


PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]


def _stories_tokenizer(out: Path, family: str) -> int:
    """stories260K's sentencepiece tokenizer; phi3 gets Phi-3's added chat tokens after the
    base vocabulary, no BOS and its own EOS, as Phi-3.5 ships.  Returns the embedding rows."""
    import shutil

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    if family == "phi3":
        tok.add_special_tokens({"additional_special_tokens": PHI3_TOKENS})
        tok.eos_token = "<|endoftext|>"
        tok.add_bos_token = False
        tok.chat_template = (TEMPLATES / "phi-3.5-mini-instruct.jinja").read_text()
    elif family == "mistral":
        tok.chat_template = (TEMPLATES / "mistral-nemo-instruct-2407.jinja").read_text()
    tok.save_pretrained(out)
    shutil.copy(STORIES / "tokenizer.model", out / "tokenizer.model")
    if family == "phi3":  # written explicitly, as Phi-3.5's tokenizer_config.json does
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["add_bos_token"] = False
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return len(tok) + 3  # padded embedding rows (Phi-3 has 32064 rows for 32011 tokens)
    return len(tok)


def build_export_model(out: Path, family: str, seed: int | None = None) -> Path:
    """A random-init `family` model (fp32, random biases too) with its family's tokenizer kind."""
    import torch
    import transformers as tf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if family in ("qwen2", "qwen3"):
        template = (
            TEMPLATES / ("qwen2.5-7b-instruct.jinja" if family == "qwen2" else "qwen3-0.6b.jinja")
        ).read_text()
        tokenizer = build_qwen_tokenizer(out, template)
        vocab, ids = (
            len(tokenizer),
            {
                "bos_token_id": None,
                "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            },
        )
    else:
        vocab = _stories_tokenizer(out, family)
        eos = 512 if family == "phi3" else 2
        ids = {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": None}
    config = _config(family, vocab)
    for key, value in ids.items():
        setattr(config, key, value)
    config.torch_dtype = "float32"
    torch.manual_seed(EXPORT_FAMILIES.index(family) if seed is None else seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    if family in ("qwen2", "qwen3"):  # Qwen ships its sampling defaults and both end tokens here
        gen = {
            "eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]],
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
        }
        (out / "generation_config.json").write_text(json.dumps(gen))
    if family == "phi3":  # <|end|> ends a turn, <|endoftext|> the text
        (out / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [514, 512], "bos_token_id": 1})
        )
    return out
