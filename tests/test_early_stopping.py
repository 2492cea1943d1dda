"""Early stopping, the best adapter, epoch boundaries and eval_prompts, on real training runs.

The reference is always an uninterrupted run without the feature: its validation curve says
where patience must stop (computed here, independently of mlxft.training.early_stopping), its
per-step checkpoints hold the weights `best/` and the final adapter must equal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlxft.training.early_stopping import EarlyStopping
from mlxft.training.session import Session
from tests.conftest import write_wikisql
from tests.session_helpers import make_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 8
PATIENCE = 3
# a learning rate this high makes stories260K's validation loss jump about: an early minimum
RUN = dict(
    iters=STEPS,
    steps_per_eval=1,
    learning_rate=0.05,
    batch_size=2,
    max_seq_length=64,
    val_batches=2,
)


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list:
    """(step, kind, loss) of every report: what two runs must agree on."""
    return [
        (r["step"], "val" if "val_loss" in r else "train", r.get("val_loss", r.get("train_loss")))
        for r in metrics(out)
    ]


def weights(folder: Path) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def predicted_stop(curve: list, patience: int, min_delta: float = 0.0):
    """Keras' rule, written out: the step at which `patience` evaluations in a row have not
    lowered the loss by min_delta below the last such improvement (None: never)."""
    reference, waited = math.inf, 0
    for step, loss in curve:
        if loss < reference - min_delta:
            reference, waited = loss, 0
        else:
            waited += 1
            if waited >= patience:
                return step
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_wikisql(tmp_path_factory.mktemp("es_data"), 32, 8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """{backend: run dir}: uninterrupted runs with a checkpoint after every step, made on demand."""
    from tests.conftest import STORIES

    runs = {}

    def get(backend: str) -> Path:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"es_ref_{backend}") / "run"
            train(
                STORIES, data, out, backend=backend, save_every=1, keep_checkpoints=STEPS + 1, **RUN
            )
            runs[backend] = out
        return runs[backend]

    return get


# --------------------------------------------------------------------------- the rule
def test_rule_on_crafted_curves(tmp_path):
    curve = [5.0, 4.0, 4.5, 3.99, 4.2, 4.1, 4.3]
    stop = EarlyStopping(patience=2, min_delta=0.05, save_best=False, adapter_path=tmp_path)
    decisions = [stop.update(step, loss) for step, loss in enumerate(curve)]
    # 3.99 is the new best (argmin) but not an improvement of 0.05 over 4.0: patience keeps counting
    assert decisions == [False, False, False, True, True, True, True][: len(decisions)]
    assert decisions.index(True) == predicted_stop(list(enumerate(curve)), 2, 0.05) == 3
    assert (stop.best_step, stop.best_loss) == (3, 3.99)
    again = EarlyStopping(patience=2, min_delta=0.05, save_best=False, adapter_path=tmp_path)
    again.load_state(json.loads(json.dumps(stop.state())))
    assert again.state() == stop.state()
    fresh = EarlyStopping(patience=None, min_delta=0.0, save_best=True, adapter_path=tmp_path)
    assert fresh.state()["best_loss"] is None and not any(
        fresh.update(s, loss) for s, loss in enumerate(curve)
    )


# --------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_stops_at_the_predicted_step_and_keeps_the_argmin(
    backend, stories, data, reference, tmp_path, capsys
):
    ref = reference(backend)
    curve = [(s, loss) for s, kind, loss in losses(ref) if kind == "val"]
    stop = predicted_stop(curve, PATIENCE)
    assert stop is not None and stop < STEPS, (
        f"the reference curve never triggers patience {PATIENCE}: {curve}"
    )
    out = tmp_path / "es"
    session = Session(
        make_config(
            stories,
            data,
            out,
            backend=backend,
            early_stopping_patience=PATIENCE,
            save_best=True,
            **RUN,
        )
    )
    session.train()
    assert (
        f"Early stopping at step {stop}: validation loss has not improved "
        f"for {PATIENCE} evaluations" in capsys.readouterr().out
    )
    assert losses(out) == [row for row in losses(ref) if row[0] <= stop]  # same run, cut at `stop`
    assert same_weights(
        out, ref / "checkpoints" / f"step-{stop:07d}"
    )  # the adapter of the stop step
    best_step, best_loss = min(((s, loss) for s, loss in curve if s <= stop), key=lambda x: x[1])
    assert best_step > 0, "the curve's minimum is the untrained model"
    assert json.loads((out / "best" / "best.json").read_text()) == {
        "step": best_step,
        "val_loss": best_loss,
    }
    assert same_weights(out / "best", ref / "checkpoints" / f"step-{best_step:07d}")
    assert (out / "best" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_resumed_run_stops_at_the_same_step_with_the_same_best(stories, data, reference, tmp_path):
    ref = reference("mlx")
    curve = [(s, loss) for s, kind, loss in losses(ref) if kind == "val"]
    stop = predicted_stop(curve, PATIENCE)
    assert stop is not None and stop >= 3, curve
    settings = dict(RUN, early_stopping_patience=PATIENCE, save_best=True)
    whole = tmp_path / "whole"
    train(stories, data, whole, **settings)
    cut = (
        tmp_path / "cut"
    )  # ends before the stop; its last eval may write a best/ the resume must drop
    train(stories, data, cut, **dict(settings, iters=stop - 1, save_every=1))
    assert (cut / "best").is_dir()
    resumed = Session(make_config(stories, data, cut, resume=True, **settings), reporter_quiet=True)
    assert resumed.checkpoint.name == f"step-{stop - 2:07d}"
    resumed.train()
    assert losses(cut) == losses(whole)
    assert json.loads((cut / "best" / "best.json").read_text()) == json.loads(
        (whole / "best" / "best.json").read_text()
    )
    assert same_weights(cut / "best", whole / "best") and same_weights(cut, whole)


def test_a_fresh_run_drops_an_earlier_best(stories, data, tmp_path):
    out = tmp_path / "run"
    train(stories, data, out, iters=2, steps_per_eval=1, save_best=True)
    assert (out / "best").is_dir()
    train(stories, data, out, iters=2, steps_per_eval=1)
    assert not (out / "best").exists()


def test_epoch_lines_and_evaluations(stories, tmp_path, capsys):
    data = write_wikisql(tmp_path / "d", 8, 4)  # 8 rows, batch 2: 4 batches per epoch
    out = tmp_path / "run"
    Session(make_config(stories, data, out, iters=10, eval_every_epoch=True)).train()
    text = capsys.readouterr().out
    assert (
        "Epoch 1 done at step 4" in text
        and "Epoch 2 done at step 8" in text
        and "Epoch 3" not in text
    )
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [0, 4, 8, 10]
    train(
        stories,
        data,
        tmp_path / "grouped",
        iters=3,
        grad_accumulation_steps=3,
        eval_every_epoch=True,
    )
    # groups of 3 batches: epoch 1 ends inside step 2, epoch 2 inside step 3
    assert [r["step"] for r in metrics(tmp_path / "grouped") if "val_loss" in r] == [0, 2, 3]


# --------------------------------------------------------------------------- eval_prompts
PROMPTS = [
    "table: 1-10015132-11\ncolumns: Player, No.\nQ: Who wears number 3?\nA:",
    "Once upon a time",
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_eval_prompts_leave_training_untouched(backend, stories, data, tmp_path):
    """LoRA dropout on: a generation that left dropout off, or drew random numbers, would change
    the losses that follow.  The last samples equal `generate` with the saved adapter."""
    from mlxft.inference.load import load_for_inference
    from mlxft.inference.sampling import Sampler, SamplingParams, generate, raw_prompt_ids

    settings = dict(backend=backend, iters=6, steps_per_eval=2, dropout=0.2, learning_rate=1e-2)
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    train(stories, data, plain, **settings)
    train(stories, data, sampled, eval_prompts=PROMPTS, eval_max_tokens=12, **settings)
    assert losses(sampled) == losses(plain)
    evals = [r for r in metrics(sampled) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert all([s["prompt"] for s in r["samples"]] == PROMPTS for r in evals)
    assert evals[0]["samples"] != evals[-1]["samples"]
    loaded = load_for_inference(str(stories), str(sampled), backend=backend)
    for prompt, sample in zip(PROMPTS, evals[-1]["samples"]):
        ids = raw_prompt_ids(loaded.tokenizer, prompt)
        expected = generate(
            loaded.backend, loaded.tokenizer, ids, Sampler(SamplingParams()), 12, {2}
        )
        assert sample["output"] == expected.text


def test_eval_prompts_from_a_file_and_chat_rendering(tiny_llama, tmp_path):
    """Chat data: a prompt is sent as a user turn with the assistant header, like training data."""
    from mlxft.data.templates import chat_prompt_ids
    from mlxft.hub import load_tokenizer
    from mlxft.training.eval_samples import EvalSamples
    from tests.test_data import CONVO, write_jsonl

    data = tmp_path / "chat"
    write_jsonl(data / "train.jsonl", [{"messages": CONVO}] * 4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nSELECT what?\n")
    cfg = make_config(
        tiny_llama, data, tmp_path / "out", eval_prompts=str(prompts), mask_prompt=True
    )
    tok = load_tokenizer(tiny_llama, cfg)
    samples = EvalSamples(cfg, tok, tiny_llama, "chat")
    assert samples.prompts == ["hello there", "SELECT what?"]
    assert samples.ids[0] == chat_prompt_ids(tok, [{"role": "user", "content": "hello there"}])
    assert 5 in samples.stops  # <|im_end|> from the template ends a sample


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "hf_dataset": {"path": "org/name", "prompt_feature": "q"},
            "eval_prompts": ["a", "b"],
            "early_stopping_patience": 2,
            "early_stopping_min_delta": 0.01,
            "save_best": True,
            "eval_every_epoch": True,
            "eval_max_tokens": 9,
        },
    ],
)
def test_new_keys_round_trip_through_the_saved_config(values, tmp_path):
    """mlxft_config.yaml (what --config of a run, and `--resume`'s printed command, read back)."""
    from mlxft.config import build_config, save_config

    cfg = build_config(overrides=values)
    save_config(cfg, tmp_path / "c.yaml")
    assert build_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
