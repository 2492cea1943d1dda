"""Preference tuning mechanics: data formats and masks, truncation, pair batches, the reference
model (adapter off / frozen copy), accumulation, checkpointing, precomputed reference log-probs
and exact resume, on both backends.  (Parity with TRL: tests/test_preference_trl.py.)"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

from mlxft.config import build_config
from mlxft.data.preference import (
    load_preference_splits,
    make_pair_batch,
    pair_epoch_batches,
    pair_eval_batches,
)
from mlxft.errors import UserError
from mlxft.hub import load_tokenizer
from mlxft.training.preference import PreferenceSpec, summarize
from mlxft.training.session import Session
from tests.conftest import REPO
from tests.session_helpers import make_config

PAIRS = REPO / "examples" / "data" / "wikisql_dpo"


def _short(pair: dict) -> dict:
    return {
        "prompt": "Q: " + pair["prompt"].split("\nQ: ", 1)[1],
        "chosen": pair["chosen"].split(" FROM ")[0],
        "rejected": pair["rejected"].split(" FROM ")[0],
    }


def _write(folder, train: list, valid: list):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """12 short WikiSQL pairs for training, 4 for validation."""
    rows = [
        _short(json.loads(line)) for line in (PAIRS / "train.jsonl").read_text().splitlines()[:40]
    ]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    return _write(tmp_path_factory.mktemp("pairs"), rows[:12], rows[12:16])


def _cfg(model, data, out, **kw):
    kw.setdefault("train_mode", "dpo")
    kw.setdefault("iters", 4)
    kw.setdefault("use_chat_template", "false")
    kw.setdefault("max_seq_length", 256)
    return make_config(model, data, out, **kw)


def _losses(out) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train_loss" in r]


def _decode(tokenizer, ids, mask) -> str:
    return tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])


# ---------------------------------------------------------------------------- data
def test_string_pairs_train_only_the_answers(tiny_llama, tmp_path):
    data = _write(
        tmp_path / "d",
        [{"prompt": "Q: who? A:", "chosen": " yes", "rejected": " no, maybe"}] * 2,
        [{"prompt": "Q: x", "chosen": " a", "rejected": " b"}],
    )
    cfg = _cfg(tiny_llama, data, tmp_path / "o")
    tok = load_tokenizer(tiny_llama, cfg)
    split = load_preference_splits(cfg, tok)["train"]
    assert split.format == "preference" and len(split) == 2
    assert _decode(tok, split.chosen[0], split.chosen_masks[0]) == " yes</s>"
    assert _decode(tok, split.rejected[0], split.rejected_masks[0]) == " no, maybe</s>"
    assert tok.decode(split.chosen[0][: int(np.argmax(split.chosen_masks[0]))]) == "<s>Q: who? A:"
    # with the chat template (use_chat_template auto), as SFT renders prompt/completion records
    chat = load_preference_splits(replace(cfg, use_chat_template="auto"), tok)["train"]
    assert _decode(tok, chat.chosen[0], chat.chosen_masks[0]) == " yes<|im_end|>\n"


def test_conversational_pairs_never_train_the_prompt_turns(tiny_llama, tmp_path):
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Q: who?"},
    ]
    record = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Lily"}],
        "rejected": [{"role": "assistant", "content": "the dog"}],
    }
    data = _write(tmp_path / "d", [record, record], [record])
    cfg = _cfg(tiny_llama, data, tmp_path / "o")
    tok = load_tokenizer(tiny_llama, cfg)
    split = load_preference_splits(cfg, tok)["train"]
    assert split.format == "preference_chat"
    assert _decode(tok, split.chosen[0], split.chosen_masks[0]) == "Lily<|im_end|>\n"  # not "hello"
    assert _decode(tok, split.rejected[0], split.rejected_masks[0]) == "the dog<|im_end|>\n"
    full = tok.apply_chat_template(prompt + record["chosen"], tokenize=False)
    assert tok.decode(split.chosen[0]) == full


def test_truncation_follows_trl(tiny_llama, tmp_path):
    long_prompt = "Q: " + "the quick brown fox " * 10 + "A:"
    data = _write(
        tmp_path / "d",
        [{"prompt": long_prompt, "chosen": " yes " * 20, "rejected": " no"}] * 2,
        [{"prompt": "Q:", "chosen": " a", "rejected": " b"}],
    )
    cfg = _cfg(tiny_llama, data, tmp_path / "o", max_seq_length=40, max_prompt_length=16)
    tok = load_tokenizer(tiny_llama, cfg)
    full = load_preference_splits(replace(cfg, max_seq_length=1024, max_prompt_length=None), tok)[
        "train"
    ]
    cut = load_preference_splits(cfg, tok)["train"]
    assert cut.truncated == 2
    p_full = int(np.argmax(full.chosen_masks[0]))
    p_cut = int(np.argmax(cut.chosen_masks[0]))
    assert p_cut == 16  # the prompt keeps its LAST 16 tokens ...
    assert list(cut.chosen[0][:16]) == list(full.chosen[0][p_full - 16 : p_full])
    assert len(cut.chosen[0]) == 40  # ... then the row keeps its first max_seq_length
    assert list(cut.chosen[0][16:]) == list(full.chosen[0][p_full : p_full + 24])
    assert list(cut.rejected[0]) == list(
        full.rejected[0][p_full - 16 :]
    )  # short side: prompt cut only


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "chosen": "b"}, "preference record has no 'rejected'"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "'chosen' and 'rejected' are identical"),
        (
            {"prompt": "a", "completion": "b"},
            "this is a supervised (SFT) record: set train_mode: sft",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"},
            "'chosen' must be a list",
        ),
        ({"prompt": "a", "chosen": 1, "rejected": "c"}, "'chosen' must be a string"),
    ],
)
def test_bad_records_name_the_line(tiny_llama, tmp_path, record, message):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    if isinstance(record.get("prompt"), list):
        good = {
            "prompt": [{"role": "user", "content": "a"}],
            "chosen": [{"role": "assistant", "content": "b"}],
            "rejected": [{"role": "assistant", "content": "c"}],
        }
    data = _write(tmp_path / "d", [good, record], [good])
    cfg = _cfg(tiny_llama, data, tmp_path / "o")
    with pytest.raises(UserError, match="train.jsonl:2: ") as err:
        load_preference_splits(cfg, load_tokenizer(tiny_llama, cfg))
    assert message in str(err.value)


def test_pair_batches_concatenate_sort_and_replay(tiny_llama, pairs, tmp_path):
    cfg = _cfg(tiny_llama, pairs, tmp_path / "o", batch_size=3)
    split = load_preference_splits(cfg, load_tokenizer(tiny_llama, cfg))["train"]
    batches = pair_epoch_batches(split, 3, seed=0, epoch=0, pad_id=3)
    assert sorted(int(i) for b in batches for i in b.pairs) == list(range(12))
    b = batches[0]
    for row, pair in enumerate(
        b.pairs
    ):  # chosen rows first, then rejected (TRL's concatenated forward)
        assert list(b.inputs[row, : len(split.chosen[pair]) - 1]) == list(split.chosen[pair][:-1])
        assert list(b.targets[3 + row, : len(split.rejected[pair]) - 1]) == list(
            split.rejected[pair][1:]
        )
    nll = b.nll_mask(prompt=True)  # ORPO: every target of the chosen rows
    assert nll[3:].sum() == 0 and nll[0].sum() == len(split.chosen[b.pairs[0]]) - 1
    answers = b.nll_mask(prompt=False)  # RPO: the chosen answers only
    assert answers[3:].sum() == 0 and answers[0].sum() == split.chosen_masks[b.pairs[0]].sum()
    assert answers[0].sum() < nll[0].sum()
    widths = split.widths()
    spans = sorted((widths[b.pairs].min(), widths[b.pairs].max()) for b in batches)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # length-sorted chunks
    again = pair_epoch_batches(split, 3, seed=0, epoch=0, pad_id=3)
    assert [list(x.pairs) for x in again] == [list(x.pairs) for x in batches]
    other = pair_epoch_batches(split, 3, seed=0, epoch=1, pad_id=3)
    assert sorted(map(tuple, (x.pairs for x in other))) == sorted(
        map(tuple, (x.pairs for x in batches))
    )


def test_config_checks():
    def build(**kw):
        return build_config(overrides=kw)

    assert build(train_mode="orpo").train_mode == "orpo"
    with pytest.raises(UserError, match="train_mode must be one of sft, dpo, orpo"):
        build(train_mode="ppo")
    with pytest.raises(UserError, match="beta must be > 0"):
        build(train_mode="dpo", beta=0)
    with pytest.raises(UserError, match=r"label_smoothing must be in \[0, 0.5\)"):
        build(train_mode="dpo", label_smoothing=0.5)
    with pytest.raises(UserError, match="label_smoothing applies to train_mode dpo only"):
        build(train_mode="orpo", label_smoothing=0.1)
    assert build(train_mode="dpo", rpo_alpha=1.0).rpo_alpha == 1.0
    with pytest.raises(UserError, match=r"rpo_alpha must be > 0 \(or unset for plain DPO\)"):
        build(train_mode="dpo", rpo_alpha=0)
    with pytest.raises(UserError, match="rpo_alpha applies to train_mode dpo only"):
        build(train_mode="orpo", rpo_alpha=1.0)
    with pytest.raises(UserError, match="precompute_ref_log_probs applies to train_mode dpo only"):
        build(train_mode="orpo", precompute_ref_log_probs=True)
    with pytest.raises(
        UserError, match="max_prompt_length must be at least 1 and below max_seq_length"
    ):
        build(train_mode="dpo", max_prompt_length=64, max_seq_length=64)


# ---------------------------------------------------------------------------- training
BACKENDS = ["mlx", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_reference_is_the_starting_model(tiny_llama, pairs, tmp_path, backend, kind):
    """Before any update the policy is its reference (adapter off with B = 0 / the frozen copy):
    loss log 2, zero rewards; then training separates chosen from rejected."""
    out = tmp_path / "o"
    cfg = _cfg(
        tiny_llama, pairs, out, backend=backend, fine_tune_type=kind, iters=3, learning_rate=5e-3
    )
    Session(cfg, reporter_quiet=True).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_val, first_train = rows[0], _losses(out)[0]
    for row, key in ((first_val, "val_loss"), (first_train, "train_loss")):
        assert row[key] == pytest.approx(math.log(2), abs=1e-6)
        assert row["rewards/chosen"] == pytest.approx(
            0, abs=1e-5
        )  # full on MLX: chunked vs plain head
        assert row["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert _losses(out)[-1]["rewards/margins"] != 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dpo", "orpo", "rpo"])
def test_accumulation_is_the_bigger_batch(tiny_llama, pairs, tmp_path, backend, mode):
    """Two batches of 2 pairs in one group give the group of one batch of 4: same loss, metrics
    and gradients (each batch's terms are scaled by the group's totals; rpo: DPO + rpo_alpha)."""
    extra = {"train_mode": "dpo", "rpo_alpha": 0.5} if mode == "rpo" else {"train_mode": mode}
    cfg = _cfg(tiny_llama, pairs, tmp_path / "o", backend=backend, **extra)
    session = Session(cfg, reporter_quiet=True)
    session.backend.set_adapter_weights(
        {k: np.full_like(v, 0.03) for k, v in session.backend.adapter_weights().items()}
    )
    session.backend.setup_training(cfg)
    split, spec = session.splits["train"], PreferenceSpec.of(cfg)
    halves = [
        make_pair_batch(split, [0, 5], session.pad_id),
        make_pair_batch(split, [7, 9], session.pad_id),
    ]
    whole = [make_pair_batch(split, [0, 5, 7, 9], session.pad_id)]
    from tests.test_preference_trl import _first_gradients

    (g_halves, r_halves), (g_whole, r_whole) = (
        _first_gradients(session.backend, g, spec) for g in (halves, whole)
    )
    for key, value in r_whole.items():
        assert r_halves[key] == pytest.approx(value, rel=1e-6, abs=1e-5), (
            key
        )  # float32 sums of ~100
    assert max(float(np.abs(g_halves[k] - g).max()) for k, g in g_whole.items()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_checkpoint_and_precompute_change_nothing(tiny_llama, pairs, tmp_path, backend):
    plain = tmp_path / "plain"
    Session(_cfg(tiny_llama, pairs, plain, backend=backend), reporter_quiet=True).train()
    other = tmp_path / "other"
    Session(
        _cfg(
            tiny_llama,
            pairs,
            other,
            backend=backend,
            grad_checkpoint=True,
            precompute_ref_log_probs=True,
        ),
        reporter_quiet=True,
    ).train()
    for a, b in zip(_losses(plain), _losses(other)):
        for key in ("train_loss", "rewards/chosen", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=2e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_replays_and_reads_the_reference_cache(
    tiny_llama, pairs, tmp_path, backend, monkeypatch
):
    """A run resumed from its step-2 checkpoint reports the uninterrupted run's steps 3-6, and takes
    the precomputed reference log-probs from the checkpoint instead of computing them again."""
    kw = dict(
        backend=backend, iters=6, precompute_ref_log_probs=True, save_every=2, learning_rate=5e-3
    )
    whole = tmp_path / "whole"
    Session(_cfg(tiny_llama, pairs, whole, **kw), reporter_quiet=True).train()
    part = tmp_path / "part"
    Session(_cfg(tiny_llama, pairs, part, **kw), reporter_quiet=True).train()
    checkpoint = part / "checkpoints" / "step-0000002"
    assert (checkpoint / "ref_logps.safetensors").is_file()
    for later in ("step-0000004",):
        shutil.rmtree(part / "checkpoints" / later)
    from mlxft.training import preference

    calls = []
    original = preference.attach_reference

    def spy(session, spec):
        notes = original(session, spec)
        calls.extend(notes)
        return notes

    monkeypatch.setattr(preference, "attach_reference", spy)
    Session(
        _cfg(tiny_llama, pairs, part, resume_from=str(checkpoint), **kw), reporter_quiet=True
    ).train()
    assert calls and all("read from" in note for note in calls)
    resumed, uninterrupted = _losses(part), _losses(whole)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed[2:], uninterrupted[2:]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)


def test_qlora_dpo_trains(tiny_llama, pairs, tmp_path):
    out = tmp_path / "q"
    Session(
        _cfg(tiny_llama, pairs, out, quantize=8, q_group_size=32, iters=3, learning_rate=5e-3),
        reporter_quiet=True,
    ).train()
    rows = _losses(out)
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(r["train_loss"]) for r in rows) and rows[-1]["rewards/margins"] != 0


def test_eval_batches_and_summary(tiny_llama, pairs, tmp_path):
    cfg = _cfg(tiny_llama, pairs, tmp_path / "o", train_mode="orpo")
    session = Session(cfg, reporter_quiet=True)
    session.backend.setup_training(cfg)
    spec = PreferenceSpec.of(cfg)
    batches = pair_eval_batches(session.splits["valid"], 2, session.pad_id)
    sums = session.backend.preference_step(batches, None, spec)
    report = summarize(sums, spec)
    assert report["loss"] == pytest.approx(
        report["nll_loss"] - spec.beta * report["log_odds_ratio"], abs=1e-5
    )
    assert report["rewards/chosen"] == pytest.approx(spec.beta * report["logps/chosen"], abs=1e-6)


def test_resume_fingerprint_covers_the_preference_settings(tmp_path):
    """A dpo checkpoint cannot resume as sft (or orpo); a changed beta resumes with a notice; SFT
    fingerprints carry no preference keys (older SFT checkpoints still resume)."""
    from pathlib import Path

    from mlxft.training import checkpoint as resume

    class Split:
        sequences, masks = [np.array([1, 2], dtype=np.int32)], [np.array([False, True])]

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def fingerprint(**kw):
        return resume.fingerprint(build_config(overrides=kw), model, Split())

    sft, dpo = fingerprint(), fingerprint(train_mode="dpo")
    assert "train_mode" not in sft and dpo["train_mode"] == "dpo"
    with pytest.raises(UserError, match="train_mode is None, the checkpoint has 'dpo'"):
        resume.check_compatible(Path("ck"), dpo, sft)
    with pytest.raises(UserError, match="train_mode is 'orpo', the checkpoint has 'dpo'"):
        resume.check_compatible(Path("ck"), dpo, fingerprint(train_mode="orpo"))
    notes = resume.check_compatible(Path("ck"), dpo, fingerprint(train_mode="dpo", beta=0.3))
    assert any("beta is 0.3, the checkpoint has 0.1" in n for n in notes)
    assert resume.check_compatible(Path("ck"), sft, fingerprint()) == []


def test_dpo_uses_the_sessions_run_features(tiny_llama, pairs, tmp_path):
    """A DPO run goes through Session's one loop: eval_prompts samples at each validation,
    early stopping and best/ on the validation objective, an earlier run moved aside."""
    out = tmp_path / "o"
    kw = dict(iters=6, steps_per_eval=1, learning_rate=5e-3, save_best=True, eval_max_tokens=4)
    Session(
        _cfg(tiny_llama, pairs, out, eval_prompts=["Q: how many"], **kw), reporter_quiet=True
    ).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == list(range(7))
    assert all(len(r["samples"]) == 1 and "rewards/accuracies" in r for r in vals)
    assert all("val_perplexity" not in r and r["val_pairs"] == 2 for r in vals)
    best = min(vals, key=lambda r: r["val_loss"])
    assert (out / "best" / "adapter_model.safetensors").is_file() and best["step"] > 0
    # a huge min_delta: no validation counts as an improvement, so patience 1 stops at step 1
    stopped = _cfg(
        tiny_llama, pairs, out, early_stopping_patience=1, early_stopping_min_delta=10.0, **kw
    )
    Session(stopped, reporter_quiet=True).train()
    assert any((out / "previous-runs").iterdir())
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in again) == 1
