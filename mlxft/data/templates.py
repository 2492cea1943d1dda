"""Every chat-template concern, for training and for generation alike.

A template is the tokenizer's own (`tokenizer.chat_template`) or one the user passes
(`chat_template`/`--chat-template`: jinja text or a file).  Rendering goes through
transformers' `apply_chat_template` so what we train on and what we prompt with are exactly
what the model's authors defined; the turn-end tokens generation stops at are read off the
template itself rather than guessed from the model's name.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxft.errors import UserError

_SENTINEL = "MLXFTASSISTANTREPLY"


def read_chat_template(value: str | None) -> str | None:
    """A chat template option: the path of a template file, or the jinja text itself."""
    if not value:
        return None
    path = Path(os.path.expanduser(value))
    if "\n" not in value and len(value) < 4096 and path.is_file():
        return path.read_text()
    if path.suffix in (".jinja", ".j2", ".txt", ".tmpl") and "{" not in value:
        raise UserError(f"chat_template: file {value} not found")
    if "{{" not in value and "{%" not in value:
        raise UserError(
            f"chat_template: '{value[:60]}' is neither an existing file nor a jinja template"
        )
    return value


def has_chat_template(tokenizer, override: str | None = None) -> bool:
    return bool(override or getattr(tokenizer, "chat_template", None))


def render(
    tokenizer, messages: list, override: str | None, generation: bool, where: str = ""
) -> str:
    """`messages` through the template as text; a template error names `where` (a data
    file's line) or, for a prompt, the messages."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=override, tokenize=False, add_generation_prompt=generation
        )
    except Exception as err:  # jinja errors, raise_exception() in templates, ...
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        what = (
            f"{where}: the chat template failed on this record"
            if where
            else ("the chat template failed on these messages")
        )
        raise UserError(f"{what}: {message}") from None


def render_text(template: str, messages: list, bos_token: str = "", eos_token: str = "") -> str:
    """A template's text for `messages` with the generation prompt on, without a tokenizer
    (a published template checked against another renderer): transformers' own renderer, so
    the string is the one `render` gives for a tokenizer holding that template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [messages],
        chat_template=template,
        add_generation_prompt=True,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    return rendered[0]


def chat_prompt_ids(tokenizer, messages: list, override: str | None = None) -> list:
    """Messages rendered with the chat template (+ the assistant header), as token ids.
    The template writes BOS itself, so the tokenizer must not add another (as mlx_lm.generate)."""
    text = render(tokenizer, messages, override, True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def end_of_turn_ids(tokenizer, override: str | None = None) -> set:
    """Special tokens the chat template writes right after an assistant's content
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...): the model's "my turn is over"."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = render(tokenizer, messages, override, False)
    except UserError:
        return set()
    if _SENTINEL not in text:
        return set()
    tail = text[text.rindex(_SENTINEL) + len(_SENTINEL) :]
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    specials = {i for i, t in decoder.items() if getattr(t, "special", False)}
    specials |= set(getattr(tokenizer, "all_special_ids", []) or [])
    return {i for i in tokenizer.encode(tail, add_special_tokens=False) if i in specials}
