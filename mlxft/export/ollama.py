"""`mlxft export --to ollama`: DIR/model.gguf + DIR/Modelfile that `ollama create` takes as is.

Ollama does not run the model's Jinja chat template: the Modelfile's TEMPLATE is a Go
text/template over Ollama's data (.System, .Messages with .Role/.Content, ...).  A wrong one
is the classic failure: the model never stops, or ignores the chat format.  So the TEMPLATE is
not guessed from the model name.  The HF template is recognised as one of a few families by
its markers, the family's free parameters (default system prompt, the generation prompt, the
Llama-3.1 knowledge-date header, where Mistral puts the system message) are read off renders
of probe conversations, and then `Family.render` -- a Python twin of the Go template we write
-- must reproduce the HF template's string for 1-3 turn conversations with and without a
system message.  If it does not, the export stops and asks for `--template FILE`.
(tests/test_ollama.py renders the written TEMPLATE with Go's text/template itself.)

Known, documented limits: Go templates cannot trim or split strings, so a template that trims
message content (Llama-3) or strips `<think>` from past assistant turns (Qwen3, DeepSeek-R1)
matches only for messages without surrounding whitespace / reasoning -- which is what Ollama
passes (it keeps reasoning in .Thinking, not in .Content).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlxft.errors import UserError

S, U1, A1, U2, A2, U3 = "SYSMSGX", "USRONEX", "ASTONEX", "USRTWOX", "ASTTWOX", "USRTHREEX"


def conversations(system: str | None = S) -> list:
    """Probe conversations: 1, 2 and 3 user turns, each with and without a system message,
    all ending with a user turn (the generation prompt follows)."""
    turns = [
        [("user", U1)],
        [("user", U1), ("assistant", A1), ("user", U2)],
        [("user", U1), ("assistant", A1), ("user", U2), ("assistant", A2), ("user", U3)],
    ]
    out = []
    for t in turns:
        msgs = [{"role": r, "content": c} for r, c in t]
        out.append(msgs)
        if system is not None:
            out.append([{"role": "system", "content": system}] + msgs)
    return out


def lit(text: str) -> str:
    """A Go template action printing `text` exactly (a Go string literal: JSON's escapes are
    Go's)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


# ----------------------------------------------------------------------------- families
@dataclass
class Turns:
    """Templates where each message is prefix(role) + content + suffix(role), then a generation
    prompt: ChatML, Llama-3, Phi-3, DeepSeek-R1.  Probed: the preamble, a system header text
    that precedes the system content (Llama-3.1's date lines), a default system message used when
    there is none, and the generation prompt."""

    name: str
    markers: tuple
    prefix: Callable[[str], str]
    suffix: Callable[[str], str]
    params: dict = field(default_factory=dict)

    def probe(self, render: Callable[[list], str]) -> None:
        one = render([{"role": "user", "content": U1}])
        with_sys = render([{"role": "system", "content": S}, {"role": "user", "content": U1}])
        user = self.prefix("user") + U1 + self.suffix("user")
        if user not in one or user not in with_sys:
            raise _mismatch(self.name, "user turn")
        gen = one[one.index(user) + len(user) :]
        head0, head1 = one[: one.index(user)], with_sys[: with_sys.index(user)]
        sys_open, sys_close = self.prefix("system"), self.suffix("system")
        at = head1.find(S)
        if at < 0 or not head1.endswith(S + sys_close):
            raise _mismatch(self.name, "system message")
        before = head1[:at]
        opened = before.rfind(sys_open) if sys_open else len(before)
        if opened < 0:
            raise _mismatch(self.name, "system header")
        preamble, lead = before[:opened], before[opened + len(sys_open) :]
        default = None
        if head0 != preamble:
            body = head0[len(preamble) :]
            if not (body.startswith(sys_open + lead) and body.endswith(sys_close)):
                raise _mismatch(self.name, "default system message")
            default = body[len(sys_open + lead) : len(body) - len(sys_close)]
        self.params = {"preamble": preamble, "lead": lead, "default": default, "gen": gen}

    def render(self, messages: list) -> str:
        """What the Go template below writes for `messages` (Ollama's .System: the joined system
        messages)."""
        p = self.params
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = p["preamble"]
        if system or p["default"] is not None:
            out += (
                self.prefix("system") + p["lead"] + (system or p["default"]) + self.suffix("system")
            )
        for m in messages:
            if m["role"] != "system":
                out += self.prefix(m["role"]) + m["content"] + self.suffix(m["role"])
        return out + p["gen"]

    def go(self) -> str:
        p = self.params
        lines = [lit(p["preamble"]) if p["preamble"] else ""]
        system = (
            lit(self.prefix("system") + p["lead"]) + "{{ .System }}" + lit(self.suffix("system"))
        )
        if p["default"] is None:
            lines.append("{{- if .System }}" + system + "{{ end }}")
        else:
            default = lit(self.prefix("system") + p["lead"] + p["default"] + self.suffix("system"))
            lines.append("{{- if .System }}" + system + "{{ else }}" + default + "{{ end }}")
        lines.append("{{- range .Messages }}")
        for role in ("user", "assistant"):
            keyword = "if" if role == "user" else "else if"
            lines.append(
                f'{{{{- {keyword} eq .Role "{role}" }}}}'
                + lit(self.prefix(role))
                + "{{ .Content }}"
                + lit(self.suffix(role))
            )
        lines.append("{{- end }}")
        lines.append("{{- end }}")
        lines.append("{{- " + json.dumps(p["gen"], ensure_ascii=False) + " }}")
        return "\n".join(line for line in lines if line)


@dataclass
class Inst:
    """Mistral's [INST] templates: no role header for the assistant, the system message glued
    into the first or the last user turn (or refused), versions differing in spaces.  All of it
    probed: the [INST] opening/closing strings, what surrounds an assistant reply, and where the
    system message goes."""

    name: str = "mistral"
    markers: tuple = ("[INST]", "[/INST]")
    params: dict = field(default_factory=dict)

    def probe(self, render: Callable[[list], str]) -> None:
        one = render([{"role": "user", "content": U1}])
        two = render(
            [
                {"role": "user", "content": U1},
                {"role": "assistant", "content": A1},
                {"role": "user", "content": U2},
            ]
        )
        start = one.find("[INST]")
        if start < 0 or U1 not in one:
            raise _mismatch(self.name, "user turn")
        preamble, open_ = one[:start], one[start : one.index(U1)]
        close = one[one.index(U1) + len(U1) :]
        head = preamble + open_ + U1 + close
        if not two.startswith(head) or A1 not in two:
            raise _mismatch(self.name, "assistant turn")
        reply_pre = two[len(head) : two.index(A1)]
        reply_post = two[two.index(A1) + len(A1) : two.rindex(open_ + U2)]
        placement, sep = "none", ""
        try:
            sys_two = render(
                [{"role": "system", "content": S}]
                + [
                    {"role": "user", "content": U1},
                    {"role": "assistant", "content": A1},
                    {"role": "user", "content": U2},
                ]
            )
        except Exception:  # v0.1-style templates refuse a system message
            sys_two = None
        if sys_two is not None:
            last = sys_two.find(S) > sys_two.find(U1)
            placement = "last" if last else "first"
            following = U2 if last else U1
            sep = sys_two[sys_two.index(S) + len(S) : sys_two.index(following)]
        self.params = {
            "preamble": preamble,
            "open": open_,
            "close": close,
            "reply_pre": reply_pre,
            "reply_post": reply_post,
            "placement": placement,
            "sep": sep,
        }

    def render(self, messages: list) -> str:
        p = self.params
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [m for m in messages if m["role"] != "system"]
        users = [i for i, m in enumerate(chat) if m["role"] == "user"]
        out = p["preamble"]
        for i, m in enumerate(chat):
            if m["role"] == "user":
                glued = (
                    system
                    and p["placement"] != "none"
                    and i == (users[-1] if p["placement"] == "last" else users[0])
                )
                out += p["open"] + (system + p["sep"] if glued else "") + m["content"] + p["close"]
            elif m["role"] == "assistant":
                out += p["reply_pre"] + m["content"] + p["reply_post"]
        return out

    def go(self) -> str:
        p = self.params
        # "last": the last user message is the last message (a generation prompt follows it)
        if p["placement"] == "last":
            glue = (
                "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}"
                + lit(p["sep"])
                + "{{ end }}"
            )
        elif p["placement"] == "first":
            glue = (
                "{{ if and $.System $first }}{{ $.System }}"
                + lit(p["sep"])
                + "{{ end }}{{ $first = false }}"
            )
        else:
            glue = ""
        lines = [
            lit(p["preamble"]) if p["preamble"] else "",
            "{{- $first := true }}",
            "{{- range $i, $_ := .Messages }}",
            '{{- if eq .Role "user" }}'
            + lit(p["open"])
            + glue
            + "{{ .Content }}"
            + lit(p["close"]),
            '{{- else if eq .Role "assistant" }}'
            + lit(p["reply_pre"])
            + "{{ .Content }}"
            + lit(p["reply_post"]),
            "{{- end }}",
            "{{- end }}",
        ]
        return "\n".join(line for line in lines if line)


def families() -> list:
    """Fresh family objects, in detection order (most specific markers first)."""
    return [
        Turns(
            "chatml",
            ("<|im_start|>", "<|im_end|>"),
            lambda r: f"<|im_start|>{r}\n",
            lambda r: "<|im_end|>\n",
        ),
        Turns(
            "llama3",
            ("<|start_header_id|>", "<|eot_id|>"),
            lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n",
            lambda r: "<|eot_id|>",
        ),
        Turns(
            "phi3",
            ("<|user|>", "<|assistant|>", "<|end|>"),
            lambda r: f"<|{r}|>\n",
            lambda r: "<|end|>\n",
        ),
        Turns(
            "deepseek-r1",
            ("<｜User｜>", "<｜Assistant｜>"),
            lambda r: {"user": "<｜User｜>", "assistant": "<｜Assistant｜>"}.get(r, ""),
            lambda r: "<｜end▁of▁sentence｜>" if r == "assistant" else "",
        ),
        Inst(),
    ]


FAMILY_NAMES = ("chatml (Qwen2/2.5/3)", "llama3", "phi3", "mistral [INST]", "deepseek-r1 <think>")


def _mismatch(family: str, part: str) -> UserError:
    return UserError(
        f"the chat template looks like the {family} family but its {part} differs from what the "
        "Ollama template would write; pass --template FILE (an Ollama Go template) instead"
    )


def match_family(template: str, render: Callable[[list], str], bos_prefix: str, where: str):
    """The family whose Go template reproduces `template` on every probe conversation.

    `bos_prefix` is the BOS text the runtime adds itself (llama.cpp adds BOS when the GGUF says
    add_bos), so the Go template must not write it: HF string == bos_prefix + Go string."""
    hint = "pass --template FILE (an Ollama Go template for this model)"
    found = next((f for f in families() if all(m in template for m in f.markers)), None)
    if found is None:
        raise UserError(
            f"{where}: its chat template is none of the families mlxft writes Ollama templates for "
            f"({', '.join(FAMILY_NAMES)}); {hint}"
        )

    def without_bos(text):
        if bos_prefix and not text.startswith(bos_prefix):
            raise UserError(
                f"{where}: llama.cpp adds BOS ({bos_prefix}) to every prompt but the chat template "
                f"does not write it, so Ollama's prompts would differ from training; {hint}"
            )
        return text[len(bos_prefix) :]

    found.probe(lambda messages: without_bos(render(messages)))
    for messages in conversations():
        try:
            text = render(messages)
        except Exception:  # the template refuses this conversation (e.g. a system message)
            continue
        if found.render(messages) != without_bos(text):
            raise UserError(
                f"{where}: its chat template renders a {len(messages)}-message conversation "
                "differently "
                f"from the {found.name} Ollama template; {hint}"
            )
    return found


# ----------------------------------------------------------------------------- Modelfile
def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'{what} contains """, which a Modelfile cannot quote')
    return '"""' + text + '"""'


def sampling_parameters(model_dir: Path) -> list:
    """PARAMETER lines from generation_config.json (the model authors' recommended sampling)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if gen.get("do_sample") is False:
        return [("temperature", 0)]
    keys = (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("repetition_penalty", "repeat_penalty"),
    )
    return [
        (ours, gen[theirs])
        for theirs, ours in keys
        if isinstance(gen.get(theirs), (int, float)) and not isinstance(gen.get(theirs), bool)
    ]


def modelfile(template: str, stops: list, system: str | None, parameters: list) -> str:
    lines = ["FROM ./model.gguf", "", f"TEMPLATE {_quote(template, 'the template')}", ""]
    if system:
        lines += [f"SYSTEM {_quote(system, '--system')}", ""]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in parameters]
    return "\n".join(lines) + "\n"


def stop_strings(tokenizer, model_path: Path, config: dict) -> list:
    """Each end-of-turn token of the chat template and each EOS id (tokenizer, config.json,
    generation_config.json) as text: Ollama stops on strings, and a model whose end-of-turn
    token is missing here never stops."""
    from mlxft.inference.sampling import eos_ids

    ids = sorted(
        eos_ids(tokenizer, model_path, config, chat=bool(getattr(tokenizer, "chat_template", None)))
    )
    found = []
    for i in ids:
        text = tokenizer.convert_ids_to_tokens(int(i))
        if text and text not in found:
            found.append(text)
    return found


def _check_dir(dest: Path) -> None:
    if dest.is_dir() and any(p.name not in ("model.gguf", "Modelfile") for p in dest.iterdir()):
        raise UserError(
            f"save_path: {dest} already holds other files; give a new or empty directory "
            "(it will hold model.gguf and Modelfile)"
        )


def read_go_template(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--template: file {path} not found (an Ollama Go template)")
    return file.read_text()


def export_ollama(
    model: str,
    adapter_path: str | None,
    save_path: str,
    outtype: str,
    system: str | None,
    template_file: str | None,
    name: str | None,
    trust_remote_code: bool,
    note: Callable[[str], None],
) -> list:
    """Write DIR/model.gguf and DIR/Modelfile; returns the lines to print (the ollama commands)."""
    from types import SimpleNamespace

    from mlxft.data.templates import render as render_template
    from mlxft.export.gguf import (
        check_architecture,
        checked_output,
        export_gguf,
        read_config,
        require_gguf,
    )
    from mlxft.export.gguf_vocab import adds_special
    from mlxft.fileio import atomic_dir
    from mlxft.hub import load_tokenizer

    require_gguf()
    dest = checked_output(save_path, is_dir=True)
    _check_dir(dest)
    if adapter_path is not None and not Path(adapter_path).expanduser().is_dir():
        raise UserError(f"{adapter_path}: adapter directory not found")
    model_path, config = read_config(model)
    check_architecture(config, model)
    tokenizer = load_tokenizer(model_path, SimpleNamespace(trust_remote_code=trust_remote_code))
    if template_file:
        go_template = read_go_template(template_file)
    else:
        hf_template = getattr(tokenizer, "chat_template", None)
        if not hf_template:
            raise UserError(
                f"{model}: the tokenizer has no chat template, so there is no chat format to give "
                "Ollama; pass --template FILE (an Ollama Go template)"
            )
        bos = tokenizer.bos_token if adds_special(tokenizer, tokenizer.bos_token_id) else ""

        def render(messages):
            return render_template(tokenizer, messages, None, True)

        family = match_family(hf_template, render, bos, str(model))
        if system and isinstance(family, Inst) and family.params["placement"] == "none":
            raise UserError(
                f"--system: the chat template of {model} refuses system messages, so Ollama would "
                "drop it; leave --system out or pass --template FILE"
            )
        go_template = family.go()
    stops = stop_strings(tokenizer, model_path, config)
    text = modelfile(go_template, stops, system, sampling_parameters(model_path))
    # `_check_dir` allowed only an earlier export's two files there: they are replaced
    with atomic_dir(dest, replace=True) as tmp:
        export_gguf(model, adapter_path, str(tmp / "model.gguf"), outtype, trust_remote_code, note)
        (tmp / "Modelfile").write_text(text)
    tag = name or dest.name.lower().replace(" ", "-")
    return [
        f"Wrote {dest / 'model.gguf'} and {dest / 'Modelfile'}",
        f"Next: ollama create {tag} -f {dest / 'Modelfile'}",
        f"Then: ollama run {tag}",
    ]
