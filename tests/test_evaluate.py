"""`mlxft evaluate`: prompts as trained, batched greedy generation equal to `generate`, scores equal
to sacrebleu / rouge-score on the same strings, a model whose outputs are known, both backends."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.config import build_config
from mlxft.data.render import Renderer
from mlxft.data.templates import chat_prompt_ids
from mlxft.inference.evaluate import examples, generate_greedy
from mlxft.inference.load import load_for_inference
from mlxft.inference.sampling import Sampler, SamplingParams, generate, raw_prompt_ids
from mlxft.inference.scores import CharTokenizer, normalize, score
from tests.test_data import CONVO, write_jsonl

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "Once upon a time",
    "Lily and Tom went to the park. They saw",
    "The sun",
    "One day, a big dog named Max",
]


def run(*args):
    return CliRunner().invoke(main, ["evaluate", *[str(a) for a in args]])


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_batched_greedy_equals_generate(stories, backend, monkeypatch):
    loaded = load_for_inference(str(stories), backend=backend)
    ids = [raw_prompt_ids(loaded.tokenizer, p) for p in PROMPTS]
    stops = {2}
    one_by_one = [
        generate(loaded.backend, loaded.tokenizer, p, Sampler(SamplingParams()), 20, stops).text
        for p in ids
    ]
    for batch_size in (3,):  # a full batch and a short one; the default (8) below takes all four
        assert (
            generate_greedy(loaded.backend, loaded.tokenizer, ids, 20, stops, batch_size=batch_size)
            == one_by_one
        )
    # a context window that leaves the longest prompt two tokens: each row stops at its own limit
    limited = generate_greedy(
        loaded.backend, loaded.tokenizer, ids, 20, stops, context_length=len(ids[1]) + 2
    )
    assert (
        limited[1]
        == generate(
            loaded.backend, loaded.tokenizer, ids[1], Sampler(SamplingParams()), 2, stops
        ).text
    )

    def no_batches(prompts):
        raise NotImplementedError

    monkeypatch.setattr(loaded.backend, "start_batch_generation", no_batches)
    assert (
        generate_greedy(loaded.backend, loaded.tokenizer, ids, 20, stops, batch_size=4)
        == one_by_one
    )


def test_scores_equal_the_libraries_on_the_same_strings():
    preds = ["SELECT Notes FROM t", " select notes from t. ", "我爱上海", "abc", ""]
    refs = ["SELECT Notes FROM t", "SELECT Notes FROM t", "我爱北京天安门", "abd", "x"]
    summary, rows = score(preds, refs)
    assert [r["exact_match"] for r in rows] == [100, 0, 0, 0, 0]
    assert [r["normalized_exact_match"] for r in rows] == [100, 100, 0, 0, 0]
    bleu = sacrebleu.corpus_bleu(
        [p.strip() for p in preds], [[r.strip() for r in refs]], tokenize="char"
    ).score
    assert summary["bleu"] == pytest.approx(bleu)
    # ROUGE-L on characters: LCS("我爱上海", "我爱北京天安门") = 2, P = 2/4, R = 2/7
    assert rows[2]["rouge_l"] == pytest.approx(100 * 2 * (2 / 4) * (2 / 7) / (2 / 4 + 2 / 7))
    # on lower-case ASCII, rouge-score's own tokenizer over space-separated characters agrees
    plain = rouge_scorer.RougeScorer(["rougeL"])
    assert rows[3]["rouge_l"] == pytest.approx(
        100 * plain.score("a b d", "a b c")["rougeL"].fmeasure
    )
    assert summary["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in rows) / len(rows))
    assert rows[0]["bleu"] == pytest.approx(100)
    assert CharTokenizer().tokenize("a b\n中") == ["a", "b", "中"]
    assert normalize("  Hello,  WORLD! ") == normalize("hello world") == "hello world"


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_model_with_known_outputs_scores_as_expected(stories, backend, tmp_path):
    """stories260K's greedy continuations are known (generate); references equal to them score
    100, a wrong one 0, and the report's BLEU/ROUGE-L are the libraries' on its predictions."""
    loaded = load_for_inference(str(stories), backend=backend)
    known = [
        generate(
            loaded.backend,
            loaded.tokenizer,
            raw_prompt_ids(loaded.tokenizer, p),
            Sampler(SamplingParams()),
            12,
            {2},
        ).text
        for p in PROMPTS
    ]
    rows = [{"prompt": p, "completion": k} for p, k in zip(PROMPTS[:3], known)] + [
        {"prompt": PROMPTS[3], "completion": "SELECT Position FROM t"}
    ]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows)
    report = tmp_path / "report.json"
    result = run(
        "--model",
        stories,
        "--data",
        tmp_path / "d",
        "--max-tokens",
        12,
        "--batch-size",
        3,
        "--backend",
        backend,
        "--report",
        report,
        "--worst",
        1,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert [r["prediction"] for r in data["results"]] == known
    assert data["scores"]["exact_match"] == data["scores"]["normalized_exact_match"] == 75.0
    assert data["scores"]["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(
            [k.strip() for k in known], [[r["completion"].strip() for r in rows]], tokenize="char"
        ).score
    )
    assert [r["rouge_l"] for r in data["results"]][:3] == [100.0, 100.0, 100.0]
    assert "test: 4 examples, exact match 75.0%" in result.stdout
    assert "Worst 1 by ROUGE-L:" in result.stdout and "SELECT Position FROM t" in result.stdout
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".report")
    ] == []  # atomic: no temp left
    first_two = run(
        "--model",
        stories,
        "--data",
        tmp_path / "d",
        "--max-tokens",
        12,
        "--backend",
        backend,
        "--limit",
        2,
        "--report",
        report,
    )
    assert first_two.exit_code == 0 and "test: 2 examples, exact match 100.0%" in first_two.stdout
    assert [r["prediction"] for r in json.loads(report.read_text())["results"]] == known[:2]


def test_prompts_are_the_training_renderings(tiny_llama, stories):
    """Chat: the conversation up to the last assistant turn plus the assistant header, exactly the
    ids chat generation uses; text: up to --text-split, with BOS as in training."""
    from mlxft.hub import load_tokenizer

    cfg = build_config(overrides={"mask_prompt": True})
    tok = load_tokenizer(tiny_llama, cfg)
    chat = examples([("d:1", {"messages": CONVO})], "chat", Renderer(cfg, tok), None)
    assert (
        chat[0].prompt_ids == chat_prompt_ids(tok, CONVO[:-1]) and chat[0].reference == "SELECT 1"
    )
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    got = examples([("d:2", sharegpt)], "sharegpt", Renderer(cfg, tok), None)[0]
    assert (
        got.prompt_ids == chat_prompt_ids(tok, [{"role": "user", "content": "hi"}])
        and got.reference == "yo"
    )
    stok = load_tokenizer(stories, cfg)
    text = "table: t\nQ: who?\nA: SELECT x FROM t"
    got = examples([("d:3", {"text": text})], "text", Renderer(cfg, stok), "A:")[0]
    assert (
        got.prompt_ids == raw_prompt_ids(stok, "table: t\nQ: who?\nA:")
        and got.reference == " SELECT x FROM t"
    )


def test_cli_errors_are_one_line(stories, tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "a A: b"}, {"text": "c A: d"}])
    result = run("--model", stories, "--data", tmp_path / "d", "--split", "valid")
    assert (
        result.exit_code == 2
        and "plain-text records hold no prompt/reference pair; pass --text-split" in result.stderr
    )
    result = run("--model", stories, "--data", tmp_path / "d")
    assert (
        result.exit_code == 2
        and "no test split (there are: train, valid); pass --split valid" in result.stderr
    )
    result = run(
        "--model", stories, "--data", tmp_path / "d", "--split", "valid", "--text-split", "Z:"
    )
    assert (
        result.exit_code == 2 and "--text-split 'Z:' does not occur in this record" in result.stderr
    )
    assert "Traceback" not in result.output
