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
