"""The tokenizer part of a GGUF file: token list, scores, types, merges, special ids, flags
and the chat template, read with gguf-py's own vocab classes.

llama.cpp re-implements each tokenizer family rather than running the Hugging Face one, so
a GGUF must name the family (`tokenizer.ggml.model`) and, for byte-level BPE, the
pre-tokenizer regex (`tokenizer.ggml.pre`).  Getting either wrong does not fail: llama.cpp
loads the file and tokenizes differently from training, which is the silent quality loss
users hit with hand conversions.  So an unknown pre-tokenizer is refused here, not guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlxft.errors import UserError

# The pre-tokenizer regexes of tokenizer.json files (as the Split pre-tokenizer stores them),
# and the name llama.cpp's vocab loader knows each one by.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}
GPT2_PRE = "gpt-2"  # ByteLevel(use_regex=True) with no Split: GPT-2's own regex


@dataclass
class Vocab:
    """What the Modelfile and the checks need to know about the exported vocabulary."""

    kind: str  # "llama" (sentencepiece) or "gpt2" (byte-level BPE)
    tokens: list = field(default_factory=list)  # token texts (str), index = id
    special_ids: dict = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    chat_template: str | None = None
    notes: list = field(default_factory=list)  # one-line warnings for the user


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None


def _splits(pre: dict | None) -> list:
    """(kind, regex) of every pre-tokenizer step, flattening Sequence."""
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [s for p in pre.get("pretokenizers", []) for s in _splits(p)]
    if pre.get("type") == "Split":
        return [("split", pre.get("pattern", {}).get("Regex"))]
    if pre.get("type") == "ByteLevel":
        return [("bytelevel", pre.get("use_regex", True))]
    return [(pre.get("type"), None)]


def bpe_pre_name(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's name for this byte-level BPE pre-tokenizer, or a clear refusal."""
    steps = _splits(tokenizer_json.get("pre_tokenizer"))
    regexes = [r for kind, r in steps if kind == "split"]
    if len(regexes) == 1 and regexes[0] in PRE_TOKENIZERS and ("bytelevel", False) in steps:
        return PRE_TOKENIZERS[regexes[0]]
    if steps == [("bytelevel", True)]:
        return GPT2_PRE
    # every digit alone, then GPT-2's regex (StarCoder; \d differs from \p{N} only on numerals
    # such as superscripts, which are not decimal digits)
    if (
        len(steps) == 2
        and steps[0] in (("split", r"\p{N}"), ("split", r"\d"))
        and steps[1] == ("bytelevel", True)
    ):
        return "starcoder"
    raise UserError(
        f"{where}: its pre-tokenizer ({', '.join(str(k) for k, _ in steps) or 'none'}) is not one "
        "llama.cpp knows by name (supported: GPT-2, Llama-3, Qwen2 and StarCoder style byte-level "
        "BPE, and sentencepiece); exporting it would tokenize differently from training"
    )


def _added_tokens(tokenizer_json: dict | None, tokenizer_config: dict) -> dict:
    """{id: (text, special)} from tokenizer.json's added_tokens and tokenizer_config.json."""
    found = {}
    for item in (tokenizer_json or {}).get("added_tokens", []):
        found[int(item["id"])] = (item["content"], bool(item.get("special")))
    for key, item in tokenizer_config.get("added_tokens_decoder", {}).items():
        found.setdefault(int(key), (item["content"], bool(item.get("special"))))
    return found


def _padded(tokens: list, scores: list, types: list, vocab_size: int):
    """Models often have more embedding rows than tokens (padded for speed); llama.cpp needs
    one token per row, so the extra rows get unused placeholder tokens, as llama.cpp's converter
    does."""
    import gguf

    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _retype(tokens: list, scores: list, types: list, added: dict) -> None:
    """Added tokens: special ones are CONTROL (never produced from plain text, rendered only by
    the template), the others USER_DEFINED (matched whole), as the Hugging Face tokenizer treats
    them.  Ids past the base vocabulary (Phi-3's <|end|>, ...) extend the lists."""
    import gguf

    for i, (text, special) in sorted(added.items()):
        while i >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        tokens[i] = text.encode("utf-8")
        scores[i] = -1000.0
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED


def adds_special(tokenizer, special_id) -> bool:
    """Whether the Hugging Face tokenizer puts this special token around plain text (the truth
    llama.cpp's add_bos/add_eos flags must copy; tokenizer_config.json and the post-processor
    can disagree, and llama.cpp's default for sentencepiece is to add BOS)."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return special_id is not None and bool(ids) and special_id in (ids[0], ids[-1])


def _spm_from_tokenizer_json(model: dict) -> list:
    """(text, score, type) of a sentencepiece-BPE vocabulary that only exists as tokenizer.json
    (as transformers >= 5 and mlx-lm save it).  llama.cpp's sentencepiece tokenizer merges the
    pair whose result scores highest, so a token's score is minus the rank of the merge that
    makes it: the order the Hugging Face BPE applies its merges (sentencepiece's own scores)."""
    import gguf

    rank = {}
    for i, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    out = []
    for text, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        kind = (
            gguf.TokenType.BYTE
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text)
            else gguf.TokenType.NORMAL
        )
        out.append((text.encode("utf-8"), -float(rank[text]) if text in rank else 0.0, kind))
    return out


def add_vocab(writer, model_dir: Path, vocab_size: int, tokenizer) -> Vocab:
    """Write the tokenizer metadata of `model_dir` into `writer` (a gguf.GGUFWriter);
    `tokenizer` is the Hugging Face tokenizer loaded from it."""
    import gguf

    tok_json_path = model_dir / "tokenizer.json"
    tok_json = _read_json(tok_json_path) if tok_json_path.is_file() else None
    config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(config_path) if config_path.is_file() else {}
    model = (tok_json or {}).get("model", {})
    if (model_dir / "tokenizer.model").is_file() and (
        model.get("type") != "BPE" or model.get("byte_fallback")
    ):
        kind, triples = "llama", list(gguf.SentencePieceVocab(model_dir).all_tokens())
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        # sentencepiece saved as tokenizer.json only
        kind, triples = "llama", _spm_from_tokenizer_json(model)
    elif model.get("type") == "BPE" and (tok_json.get("decoder") or {}).get("type") == "ByteLevel":
        kind, triples = "gpt2", list(gguf.BpeVocab(model_dir).all_tokens())
    else:
        raise UserError(
            f"{model_dir}: the tokenizer is neither sentencepiece (tokenizer.model) nor byte-level "
            "BPE (tokenizer.json); llama.cpp export supports those two"
        )
    writer.add_tokenizer_model(kind)
    if kind == "llama":
        writer.add_tokenizer_pre("default")
        if isinstance(tok_config.get("add_prefix_space"), bool):
            writer.add_add_space_prefix(tok_config["add_prefix_space"])
    else:
        writer.add_tokenizer_pre(bpe_pre_name(tok_json, tok_json_path))
    tokens, scores, types = (list(x) for x in zip(*triples))
    _retype(tokens, scores, types, _added_tokens(tok_json, tok_config))
    if len(tokens) > vocab_size:
        raise UserError(
            f"{model_dir}: the tokenizer has {len(tokens)} tokens but the model only "
            f"{vocab_size} embedding rows (vocab_size in config.json)"
        )
    tokens, scores, types = _padded(tokens, scores, types, vocab_size)
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    special.add_special_token["bos"] = adds_special(tokenizer, special.special_token_ids.get("bos"))
    special.add_special_token["eos"] = adds_special(tokenizer, special.special_token_ids.get("eos"))
    special.add_to_gguf(writer, quiet=True)
    eot = end_of_turn(tokenizer, special.special_token_ids.get("eos"))
    if eot is not None:
        writer.add_eot_token_id(eot)
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in tokens]
    template = special.chat_template if isinstance(special.chat_template, str) else None
    notes = []
    if kind == "llama" and _prepends_first_only(tok_json) and template:
        notes.append(
            "Note: this sentencepiece tokenizer puts '▁' only before the first word; "
            "llama.cpp also puts "
            "one after each special token, so chat prompts can tokenize slightly differently there"
        )
    return Vocab(
        kind,
        texts,
        dict(special.special_token_ids),
        bool(special.add_special_token.get("bos")),
        template,
        notes,
    )


def _prepends_first_only(tok_json: dict | None) -> bool:
    pre = (tok_json or {}).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme") == "first" for p in steps)


def end_of_turn(tokenizer, eos_id) -> int | None:
    """The chat template's end-of-turn token when it is not EOS (<|im_end|>, <|eot_id|>, <|end|>):
    written as tokenizer.ggml.eot_token_id so llama.cpp stops there even when its text is
    unusual."""
    from mlxft.data.templates import end_of_turn_ids

    if not getattr(tokenizer, "chat_template", None):
        return None
    ids = sorted(i for i in end_of_turn_ids(tokenizer) if i != eos_id)
    return ids[0] if ids else None
