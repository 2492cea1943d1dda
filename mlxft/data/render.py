"""Records → "pieces": text (or the EOS id) tagged with whether it is a target to learn.

Rendering is kept apart from tokenizing so every format reduces to one shape, and the
target mask is decided on *characters* of the final string, then mapped to tokens by offset
(`tokenize.py`).  That is what makes mask_prompt exact for any chat template: we never
assume a template's turn markers tokenize the same alone as in context.
"""

from __future__ import annotations

from mlxft.data.records import sharegpt_messages
from mlxft.data.templates import read_chat_template, render
from mlxft.errors import UserError

EOS = -1  # piece meaning "the EOS id, unless the text already ends with it"
Piece = tuple[str | int, bool]

FALLBACK_NOTICE = (
    "the tokenizer has no chat template, so chat records are rendered as plain '<role>: content' "
    "lines "
    "with EOS after each assistant turn; to use a real one set chat_template "
    "(a jinja string or a .jinja file, e.g. chat_template: templates/chatml.jinja)"
)


def unwrap(tokenizer):
    """The HF tokenizer behind an mlx-lm TokenizerWrapper (which is not callable itself)."""
    if not callable(tokenizer) and hasattr(tokenizer, "_tokenizer"):
        return tokenizer._tokenizer
    return tokenizer


class Renderer:
    """Holds the per-run choices (template, mask_prompt, EOS) so each record renders cheaply."""

    def __init__(self, cfg, tokenizer):
        self.tok = unwrap(tokenizer)
        self.cfg = cfg
        self.mask_prompt = bool(cfg.mask_prompt)
        self.eos_id = getattr(self.tok, "eos_token_id", None)
        self.override = read_chat_template(cfg.chat_template)
        self.has_own = bool(getattr(self.tok, "chat_template", None))
        self.notices: list[str] = []
        if cfg.prompt_template is not None and cfg.completion_template is None:
            raise UserError(
                "prompt_template is set but completion_template is not; set both, "
                "e.g. completion_template: '{output}'"
            )
        if cfg.completion_template is not None and cfg.prompt_template is None:
            raise UserError("completion_template is set but prompt_template is not; set both")

    @property
    def template(self) -> str | None:
        """The chat template in use for chat records, None when only the fallback is left."""
        return (
            self.override if self.override else (self.tok.chat_template if self.has_own else None)
        )

    def completion_uses_chat(self) -> bool:
        if self.override:
            return True
        if self.cfg.use_chat_template == "false":
            return False
        if self.cfg.use_chat_template == "true" and not self.has_own:
            raise UserError(
                "use_chat_template is true but the tokenizer has no chat template; "
                "set chat_template (a jinja string or .jinja file) or use_chat_template: auto"
            )
        return self.has_own

    def render(self, record: dict, fmt: str, where: str) -> tuple[list[Piece], bool]:
        """(pieces, add_special): add_special says whether the tokenizer adds BOS itself."""
        if fmt == "text":
            return [(record["text"], True), (EOS, True)], True
        if fmt == "template":
            prompt = self._format("prompt_template", record, where)
            completion = self._format("completion_template", record, where)
            return [(prompt, False), (completion, True), (EOS, True)], True
        if fmt == "completion" and not self.completion_uses_chat():
            return [(record["prompt"], False), (record["completion"], True), (EOS, True)], True
        if fmt == "alpaca":
            user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": record["output"]},
            ]
        elif fmt == "completion":
            messages = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
        elif fmt == "sharegpt":
            messages = sharegpt_messages(record)
        else:
            messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        if self.template is None:
            if FALLBACK_NOTICE not in self.notices:
                self.notices.append(FALLBACK_NOTICE)
            return self._fallback(messages), True
        return self._chat(messages, where), False

    def _format(self, key: str, record: dict, where: str) -> str:
        try:
            return getattr(self.cfg, key).format(**record)
        except KeyError as err:
            raise UserError(f"{where}: record has no field {err} used by {key}") from None
        except (IndexError, ValueError, AttributeError, TypeError) as err:
            raise UserError(
                f"{key}: cannot fill it from {where}: {err} "
                "(write fields as {name}; double literal braces: {{ }})"
            ) from None

    def _fallback(self, messages: list[dict]) -> list[Piece]:
        pieces: list[Piece] = []
        for i, msg in enumerate(messages):
            header = ("\n" if i else "") + f"{msg['role']}: "
            if msg["role"] == "assistant":
                pieces += [(header, False), (msg["content"], True), (EOS, True)]
            else:
                pieces.append((header + msg["content"], False))
        return pieces

    def _apply(self, messages: list[dict], where: str, generation: bool) -> str:
        return render(self.tok, messages, self.override, generation, where)

    def _chat(self, messages: list[dict], where: str) -> list[Piece]:
        full = self._apply(messages, where, False)
        if not self.mask_prompt:
            return [(full, True)]
        pieces: list[Piece] = []
        pos = 0
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            try:
                start = self._apply(messages[:k], where, True)
                end = self._apply(messages[: k + 1], where, False)
            except UserError:
                start = end = None
            if (
                start is None
                or not (full.startswith(start) and full.startswith(end))
                or len(start) < pos
            ):
                raise UserError(
                    f"{where}: mask_prompt needs a chat template whose rendering of the first "
                    f"turns is a prefix "
                    "of the whole conversation, and this one is not; set mask_prompt: false or "
                    "pass a "
                    "different chat_template"
                )
            pieces += [(full[pos : len(start)], False), (full[len(start) : len(end)], True)]
            pos = max(len(end), len(start))
        pieces.append((full[pos:], False))
        return pieces
