"""`mlxft export --to ollama`: the Modelfile's TEMPLATE, rendered by Go's text/template with the
data Ollama passes (tests/ollama_render/main.go), must give exactly the model's own HF chat
template string, for real models' templates (tests/fixtures/chat_templates, with sources).

Ollama's runner adds BOS itself when the GGUF says add_bos, so the Go template must not write
it: HF string == BOS text (if added) + Go string.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.data.templates import render_text
from mlxft.errors import UserError
from mlxft.export.ollama import conversations, match_family, stop_strings
from tests.tiny_models import TEMPLATES, build_export_model

GO = shutil.which("go")
needs_go = pytest.mark.skipif(
    GO is None,
    reason="Go is not installed (Debian: apt-get install golang-go); "
    "the TEMPLATE is checked with Go's own text/template",
)

# fixture -> (family, bos text, eos text, whether the tokenizer adds BOS, special tokens,
#             end-of-turn token)
FIXTURES = {
    "qwen2-7b-instruct": (
        "chatml",
        "",
        "<|im_end|>",
        False,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
    ),
    "qwen2.5-7b-instruct": (
        "chatml",
        "",
        "<|im_end|>",
        False,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
    ),
    "qwen3-0.6b": (
        "chatml",
        "",
        "<|im_end|>",
        False,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
    ),
    "deepseek-r1-distill-qwen": (
        "deepseek-r1",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        True,
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "<｜end▁of▁sentence｜>",
    ),
    "llama-3-8b-instruct": (
        "llama3",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        True,
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "<|eot_id|>",
    ),
    "llama-3.1-8b-instruct": (
        "llama3",
        "<|begin_of_text|>",
        "<|eot_id|>",
        True,
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "<|eot_id|>",
    ),
    "phi-3.5-mini-instruct": (
        "phi3",
        "<s>",
        "<|endoftext|>",
        False,
        ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<|end|>",
    ),
    "mistral-7b-instruct-v0.1": ("mistral", "<s>", "</s>", True, ["<s>", "</s>"], "</s>"),
    "mixtral-8x7b-instruct-v0.1": ("mistral", "<s>", "</s>", True, ["<s>", "</s>"], "</s>"),
    "mistral-nemo-instruct-2407": ("mistral", "<s>", "</s>", True, ["<s>", "</s>"], "</s>"),
}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, conversations) -> strings, by a compiled tests/ollama_render/main.go."""
    if GO is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    out = tmp_path_factory.mktemp("go")
    binary = out / "ollama_render"
    src = Path(__file__).parent / "ollama_render" / "main.go"
    env = {
        "GOCACHE": str(out / "cache"),
        "GOPATH": str(out / "gopath"),
        "HOME": str(out),
        "GO111MODULE": "off",
        "PATH": "/usr/bin:/bin:/usr/local/bin:" + str(Path(GO).parent),
    }
    subprocess.run(
        [GO, "build", "-o", str(binary), str(src)], check=True, env=env, capture_output=True
    )

    def render(template: str, convs: list) -> list:
        done = subprocess.run(
            [str(binary)],
            input=json.dumps({"template": template, "conversations": convs}),
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(done.stdout)

    return render


def template_of(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@needs_go
@pytest.mark.parametrize("name", list(FIXTURES))
def test_go_template_renders_the_hf_template(name, go_render):
    family, bos, eos, add_bos, _, _ = FIXTURES[name]
    hf_template = template_of(name)
    render = lambda messages: render_text(hf_template, messages, bos, eos)  # noqa: E731
    found = match_family(hf_template, render, bos if add_bos else "", name)
    assert found.name == family
    cases, expected = [], []
    for messages in conversations("You are a terse SQL assistant."):
        try:
            expected.append(render(messages))
        except Exception:  # the template refuses a system message (Mistral v0.1): no comparison
            assert messages[0]["role"] == "system" and family == "mistral"
            continue
        cases.append(messages)
    assert len(cases) >= 3
    got = go_render(found.go(), cases)
    for messages, want, have in zip(cases, expected, got):
        assert (bos if add_bos else "") + have == want, (len(messages), want, have)


def _family_tokenizer(out: Path, name: str):
    """A small BPE tokenizer holding the family's special tokens, with the fixture as template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, bos, eos, add_bos, specials, _ = FIXTURES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["You are a terse SQL assistant. SELECT a FROM t"] * 5,
        trainer=trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos or None,
        eos_token=eos,
        additional_special_tokens=specials,
    )
    fast.chat_template = template_of(name)
    fast.save_pretrained(out)
    return fast


@pytest.mark.parametrize("name", list(FIXTURES))
def test_stop_list_holds_end_of_turn_and_eos(name, tmp_path):
    *_, eot = FIXTURES[name]
    tokenizer = _family_tokenizer(tmp_path, name)
    eos = tokenizer.eos_token
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tokenizer.convert_tokens_to_ids(eot), tokenizer.eos_token_id]})
    )
    stops = stop_strings(tokenizer, tmp_path, {"eos_token_id": tokenizer.eos_token_id})
    assert eot in stops and eos in stops


def test_unknown_template_is_refused_with_the_way_out():
    alpaca = (
        "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
        "### Response:\n"
    )
    with pytest.raises(UserError, match=r"--template FILE"):
        match_family(alpaca, lambda messages: render_text(alpaca, messages), "", "MODEL")


def test_a_look_alike_with_other_details_is_refused():
    """ChatML markers but a different turn layout: detection alone must not pass it."""
    odd = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "<|im_start|>assistant: "
    )
    with pytest.raises(UserError, match=r"--template FILE"):
        match_family(odd, lambda messages: render_text(odd, messages), "", "MODEL")


# ---------------------------------------------------------------------------- the whole export
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_export_model(tmp_path_factory.mktemp("ollama") / "qwen2", "qwen2")


@pytest.fixture(scope="module")
def exported(qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("ollama-out") / "sqlbot"
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--to",
            "ollama",
            "--model",
            str(qwen),
            "--save-path",
            str(out),
            "--outtype",
            "f32",
            "--system",
            "You write SQL.",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result.stdout


def parse_modelfile(text: str) -> dict:
    out = {"PARAMETER": []}
    for key, value in re.findall(
        r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) ("""[\s\S]*?"""|.*)$', text, flags=re.M
    ):
        value = value[3:-3] if value.startswith('"""') else value
        if key == "PARAMETER":
            out["PARAMETER"].append(tuple(value.split(" ", 1)))
        else:
            out[key] = value
    return out


def test_ollama_dir_and_modelfile(exported):
    out, stdout = exported
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert f"ollama create sqlbot -f {out / 'Modelfile'}" in stdout
    modelfile = parse_modelfile((out / "Modelfile").read_text())
    assert modelfile["FROM"] == "./model.gguf"
    assert modelfile["SYSTEM"] == "You write SQL."
    params = dict((k, v) for k, v in modelfile["PARAMETER"] if k != "stop")
    assert params == {"temperature": "0.7", "top_p": "0.8", "top_k": "20", "repeat_penalty": "1.05"}
    stops = {json.loads(v) for k, v in modelfile["PARAMETER"] if k == "stop"}
    assert stops == {"<|im_end|>", "<|endoftext|>"}


@needs_go
def test_ollama_prompt_tokens_equal_mlxft_chat(exported, qwen, go_render):
    """What Ollama would feed llama.cpp (Go TEMPLATE with the Modelfile's SYSTEM prepended, as
    Ollama does when a chat has none, tokenized by the exported GGUF) == mlxft's chat prompt."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoTokenizer

    from mlxft.data.templates import chat_prompt_ids

    out, _ = exported
    modelfile = parse_modelfile((out / "Modelfile").read_text())
    turns = [
        {"role": "user", "content": "table: t columns: a"},
        {"role": "assistant", "content": "SELECT a FROM t"},
        {"role": "user", "content": "Q: count rows"},
    ]
    messages = [{"role": "system", "content": modelfile["SYSTEM"]}] + turns
    [prompt] = go_render(modelfile["TEMPLATE"], [messages])
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=256, vocab_only=True, verbose=False)
    # add_bos: llama.cpp honours the GGUF flag
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    assert tokens == chat_prompt_ids(AutoTokenizer.from_pretrained(str(qwen)), messages)


def test_template_file_is_used_verbatim(qwen, tmp_path):
    go = tmp_path / "t.tmpl"
    go.write_text("{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant: ")
    out = tmp_path / "custom"
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--to",
            "ollama",
            "--model",
            str(qwen),
            "--save-path",
            str(out),
            "--outtype",
            "q8_0",
            "--template",
            str(go),
        ],
    )
    assert result.exit_code == 0, result.output
    assert parse_modelfile((out / "Modelfile").read_text())["TEMPLATE"] == go.read_text()
