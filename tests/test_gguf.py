"""`mlxft export --to gguf / gguf-lora`, with llama.cpp (llama-cpp-python) as the oracle.

Each GGUF is written once per module.  llama.cpp runs with a float32 KV cache: its default f16
cache alone moves logits by ~1e-2, which would hide the export's own error (~1e-6 at f32).
"""

from __future__ import annotations

import math
import sys
from functools import partial

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import main
from tests.conftest import STORIES, WIKISQL, write_wikisql
from tests.tiny_models import EXPORT_FAMILIES, build_export_model

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[dev]')"
)
pytest.importorskip("gguf", reason="gguf is not installed (pip install -e '.[gguf]')")

TEXT = (
    "table: 1-10015132-11 columns: Player, No., Nationality, Position. "
    "Q: What position does the player play?"
)
GREEDY = 30


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def llama(path, **kw):
    return llama_cpp.Llama(
        str(path), n_ctx=512, n_threads=1, type_k=0, type_v=0, verbose=False, **kw
    )


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def models(root):
    """{family: tiny model dir}, each with its family's tokenizer kind (tests/tiny_models.py)."""
    return {f: build_export_model(root / "models" / f, f) for f in EXPORT_FAMILIES}


@pytest.fixture(scope="module")
def lora(root):
    """A stories260K LoRA trained for 20 steps on shipped WikiSQL rows, by `mlxft lora`."""
    out = root / "lora"
    data = write_wikisql(root / "wikisql", train=160, valid=8)
    result = run(
        "lora",
        "--train",
        "--model",
        STORIES,
        "--data",
        data,
        "--iters",
        20,
        "--batch-size",
        2,
        "--learning-rate",
        "3e-3",
        "--adapter-path",
        out,
        "--val-batches",
        1,
        "--steps-per-eval",
        20,
        "--max-seq-length",
        128,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def export(root, lora):
    """export(name, outtype, model=STORIES, adapter=the LoRA) -> path, written once per module."""
    done = {}

    def make(name: str, outtype: str, model=STORIES, adapter=lora, to="gguf"):
        key = (name, outtype, to)
        if key not in done:
            path = root / f"{name}-{outtype}-{to}.gguf"
            args = ["export", "--to", to, "--model", model, "--save-path", path]
            if to == "gguf":
                args += ["--outtype", outtype]
            if adapter is not None:
                args += ["--adapter-path", adapter]
            result = run(*args)
            assert result.exit_code == 0, result.output
            done[key] = path
        return done[key]

    return make


def ours(model, adapter=None):
    from mlxft.inference.load import load_for_inference

    return load_for_inference(str(model), None if adapter is None else str(adapter))


def mlxft_greedy(loaded, prompt_ids) -> list:
    """Tokens of `mlxft generate --temp 0` (the same function the command runs)."""
    from mlxft.inference.sampling import Sampler, SamplingParams, eos_ids, generate

    stops = eos_ids(loaded.tokenizer, loaded.model_path, loaded.model_config, False)
    return generate(
        loaded.backend,
        loaded.tokenizer,
        prompt_ids,
        Sampler(SamplingParams()),
        GREEDY,
        stops,
        loaded.context_length,
    ).tokens, stops


def llama_greedy(llm, prompt_ids, stops) -> list:
    llm.reset()
    llm.eval(list(prompt_ids))
    out = []
    while len(out) < GREEDY:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stops:
            break
        out.append(token)
        llm.eval([token])
    return out


def all_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)])


# ---------------------------------------------------------------------------- f32: exact
CASES = ["stories-lora"] + list(EXPORT_FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_f32_gguf_in_llama_cpp_equals_mlxft(case, models, lora, export):
    model, adapter = (STORIES, lora) if case == "stories-lora" else (models[case], None)
    path = export(case, "f32", model=model, adapter=adapter)
    llm = llama(path, logits_all=True)
    loaded = ours(model, adapter)
    ids = loaded.tokenizer.encode(TEXT)
    # same tokenizer, same BOS rule
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids
    logits = all_logits(llm, ids)
    expected = loaded.backend.logits(np.array([ids]))[0]
    assert np.abs(logits[-1] - expected[-1]).max() < 1e-3
    assert np.abs(logits - expected).max() < 1e-3
    tokens, stops = mlxft_greedy(loaded, ids)
    assert llama_greedy(llm, ids, stops) == tokens
    assert len(tokens) > 0


def test_adapter_changed_the_model(models, lora, export):
    """The LoRA case above would pass with the adapter silently dropped if it did nothing."""
    fused = all_logits(
        llama(export("stories-lora", "f32"), logits_all=True), ours(STORIES).tokenizer.encode(TEXT)
    )
    base = ours(STORIES)
    assert (
        np.abs(fused - base.backend.logits(np.array([base.tokenizer.encode(TEXT)]))[0]).max() > 0.1
    )


# ---------------------------------------------------------------------------- quantized
def valid_rows(n: int = 12) -> list:
    import json

    return [
        json.loads(line)["text"] for line in (WIKISQL / "valid.jsonl").read_text().splitlines()[:n]
    ]


def perplexity(llm, tokenizer, rows) -> float:
    nll, count = 0.0, 0
    for text in rows:
        ids = tokenizer.encode(text)[:256]
        logits = all_logits(llm, ids)[:-1].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return math.exp(nll / count)


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_f16_q8_0_top1_agreement(outtype, lora, export):
    loaded = ours(STORIES, lora)
    rows = valid_rows(4)
    ids = loaded.tokenizer.encode(" ".join(rows))[:400]
    got = all_logits(llama(export("stories-lora", outtype), logits_all=True), ids).argmax(-1)
    want = loaded.backend.logits(np.array([ids]))[0].argmax(-1)
    assert (got == want).mean() >= 0.95


@pytest.mark.slow
def test_q4_k_m_loads_generates_and_its_perplexity_is_reported(
    lora, export, record_property, capsys
):
    tokenizer = ours(STORIES, lora).tokenizer
    f32, q4 = export("stories-lora", "f32"), export("stories-lora", "q4_k_m")
    assert q4.stat().st_size < f32.stat().st_size / 2
    llm = llama(q4, logits_all=True)
    assert llm.create_completion("table: 1-1000181-1 columns:", max_tokens=8, temperature=0)[
        "choices"
    ][0]["text"]
    rows = valid_rows()
    ppl = {
        "f32": perplexity(llama(f32, logits_all=True), tokenizer, rows),
        "q4_k_m": perplexity(llm, tokenizer, rows),
    }
    record_property("wikisql_valid_perplexity", ppl)
    with capsys.disabled():
        print(
            f"\nWikiSQL valid perplexity, stories260K + LoRA: f32 {ppl['f32']:.3f}  "
            f"q4_k_m {ppl['q4_k_m']:.3f}"
        )
    assert ppl["q4_k_m"] < 1.5 * ppl["f32"]


# ---------------------------------------------------------------------------- LoRA adapter GGUF
@pytest.mark.slow
def test_gguf_lora_in_llama_cpp_equals_fused(lora, export):
    base = export("stories-base", "f32", adapter=None)
    adapter = export("stories", "f32", to="gguf-lora")
    fused = llama(export("stories-lora", "f32"), logits_all=True)
    with_lora = llama(base, logits_all=True, lora_path=str(adapter))
    loaded = ours(STORIES, lora)
    ids = loaded.tokenizer.encode(TEXT)
    stops = {loaded.tokenizer.eos_token_id}
    assert np.abs(all_logits(with_lora, ids) - all_logits(fused, ids)).max() < 1e-3
    assert llama_greedy(with_lora, ids, stops) == llama_greedy(fused, ids, stops)


def test_gguf_lora_metadata(lora, export):
    import gguf

    reader = gguf.GGUFReader(str(export("stories", "f32", to="gguf-lora")))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.4.ffn_down.weight.lora_b" in names


# ---------------------------------------------------------------------------- chat + metadata
@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_llama_cpp_chat_completion_prompt_equals_mlxft_chat(family, models, export):
    """llama.cpp renders the embedded tokenizer.chat_template itself (Jinja2ChatFormatter) and
    tokenizes it: the prompt must be the tokens mlxft feeds its own model."""
    from mlxft.data.templates import chat_prompt_ids

    messages = [
        {"role": "system", "content": "You write SQL."},
        {"role": "user", "content": "table: t columns: a, b"},
        {"role": "assistant", "content": "SELECT a FROM t"},
        {"role": "user", "content": "Q: what is b?"},
        {"role": "assistant", "content": "SELECT b FROM t"},
        {"role": "user", "content": "Q: count rows"},
    ]
    llm = llama(export(family, "f32", model=models[family], adapter=None))
    out = llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0)
    prompt = [int(t) for t in llm.input_ids[: out["usage"]["prompt_tokens"]]]
    assert prompt == chat_prompt_ids(ours(models[family]).tokenizer, messages)


def _field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def test_metadata_holds_tokenizer_facts(models, export):
    import json

    import gguf
    from transformers import AutoTokenizer

    for family, pre, add_bos in (
        ("qwen2", "qwen2", False),
        ("phi3", "default", False),
        ("mistral", "default", True),
    ):
        reader = gguf.GGUFReader(str(export(family, "f32", model=models[family], adapter=None)))
        field = partial(_field, reader)
        tok = AutoTokenizer.from_pretrained(str(models[family]))
        assert field("tokenizer.ggml.pre") == pre
        assert field("tokenizer.ggml.add_bos_token") is add_bos
        assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
        assert field("tokenizer.chat_template") == tok.chat_template
        vocab = json.loads((models[family] / "config.json").read_text())["vocab_size"]
        assert len(field("tokenizer.ggml.tokens")) == vocab  # one token per embedding row
    qwen = gguf.GGUFReader(str(export("qwen2", "f32", model=models["qwen2"], adapter=None)))
    assert len(qwen.fields["tokenizer.ggml.merges"].contents()) > 0
    # its EOS <|im_end|> already ends a turn
    assert "tokenizer.ggml.eot_token_id" not in qwen.fields
    phi = gguf.GGUFReader(str(export("phi3", "f32", model=models["phi3"], adapter=None)))
    tokens = phi.fields["tokenizer.ggml.tokens"].contents()
    # added tokens, then padded rows
    assert tokens[514] == "<|end|>" and tokens[-1].startswith("[PAD")
    # <|end|>, while EOS is <|endoftext|>
    assert phi.fields["tokenizer.ggml.eot_token_id"].contents() == 514


# ---------------------------------------------------------------------------- other inputs
@pytest.mark.slow
def test_dora_and_mlx_quantized_base(models, root, capsys):
    """A DoRA adapter is fused with its magnitude; an MLX-quantized base is de-quantized (with a
    note), alone and under a LoRA trained on it (QLoRA on a pre-quantized model)."""
    from mlx_lm import convert

    from tests.test_fuse import small_data, train_adapter

    base = models["llama"]
    dora = train_adapter(base, small_data(root / "dora-data"), root / "dora", fine_tune_type="dora")
    quant = root / "q4-model"
    convert(str(base), mlx_path=str(quant), quantize=True, q_bits=4, q_group_size=32)
    qlora = train_adapter(quant, small_data(root / "qlora-data"), root / "qlora")
    for model, adapter, name in (
        (base, dora, "dora"),
        (quant, None, "q4"),
        (quant, qlora, "q4-lora"),
    ):
        path = root / f"{name}.gguf"
        args = ["export", "--to", "gguf", "--outtype", "f32", "--model", model, "--save-path", path]
        result = run(*args, *(["--adapter-path", adapter] if adapter else []))
        assert result.exit_code == 0, result.output
        assert ("de-quantized" in result.stderr) == name.startswith("q4")
        loaded = ours(model, adapter)
        ids = loaded.tokenizer.encode(TEXT)
        llm = llama(path, logits_all=True)
        # mlx-lm saved tokenizer.json only
        assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids
        got = all_logits(llm, ids)
        assert np.abs(got - loaded.backend.logits(np.array([ids]))[0]).max() < 1e-3


def test_k_quant_without_llama_cpp_is_one_line(models, root, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    result = run(
        "export",
        "--to",
        "gguf",
        "--outtype",
        "q4_k_m",
        "--model",
        models["llama"],
        "--save-path",
        root / "none.gguf",
    )
    assert result.exit_code == 2 and "pip install llama-cpp-python" in result.stderr
    assert not (root / "none.gguf").exists()


def test_failed_write_leaves_nothing(models, root, monkeypatch):
    """A failure half-way through the tensors leaves neither the file nor a temporary one."""
    import mlxft.export.gguf as g

    real = g._encode
    calls = []

    def failing(data, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(data, qtype)

    monkeypatch.setattr(g, "_encode", failing)
    out = root / "half" / "m.gguf"
    with pytest.raises(OSError):
        g.export_gguf(str(models["llama"]), None, str(out), "f16")
    assert list(out.parent.iterdir()) == []


def test_training_path_never_imports_gguf():
    """The CLI (every command registered), the MLX training loop and backend, and fusing import
    neither optional package: they are the export's alone."""
    import subprocess

    code = (
        "import sys, mlxft.cli, mlxft.training.session, mlxft.backends, "
        "mlxft.mlx_backend.backend, mlxft.mlx_backend.fuse, mlxft.inference.fuse; "
        "assert 'gguf' not in sys.modules and 'llama_cpp' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('gguf', 'llama_cpp'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
