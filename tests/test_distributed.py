"""Data-parallel training through the real launchers on loopback: `mlx.launch --backend ring`
(MLX) and `torchrun --standalone` (gloo), 2 processes against 1 on the same global batches.

The unit tests at the top check the pieces without processes (shares of a batch, reading the
launchers' variables, the watchdog, per-rank state); the slow ones launch real worlds: per-step
losses and final adapters equal to one process (with grad accumulation, with mask_prompt; and
DPO's losses and reward metrics, pairs shared whole), one metrics.jsonl and one adapter, a
killed rank ending the other within the timeout, `--resume` afterwards reproducing the
uninterrupted run, a hung rank timed out, and a batch that does not divide refused before any
work.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mlxft.config import build_config
from mlxft.data.batching import make_batch, share, share_bounds
from mlxft.data.preference import make_pair_batch, share_pairs
from mlxft.errors import UserError, _Leaving
from mlxft.training import watchdog as watchdog_module
from mlxft.training.preference import DPO_METRICS
from mlxft.training.world import (
    World,
    check_same_start,
    gather_states,
    launcher_command,
    read_world,
)
from tests.conftest import REPO, STORIES, WIKISQL

MLXFT = Path(sys.executable).parent / "mlxft"
ITERS, SAVE_EVERY = 10, 4
TOLERANCE = 1e-5


# --------------------------------------------------------------------------- shares of a batch
def _batch(lengths, pad=0):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 50, size=n) for n in sorted(lengths)]
    masks = [np.r_[np.zeros(n // 2, bool), np.ones(n - n // 2, bool)] for n in sorted(lengths)]
    return make_batch(seqs, masks, pad)


def test_shares_are_contiguous_rows_trimmed_to_their_own_longest():
    batch = _batch([5, 7, 9, 12])
    first, second = share(batch, 0, 2), share(batch, 1, 2)
    assert first.inputs.shape == (2, 6) and second.inputs.shape == (2, 11)
    np.testing.assert_array_equal(first.inputs, batch.inputs[:2, :6])
    np.testing.assert_array_equal(second.targets, batch.targets[2:, :11])
    # trimming drops only padding: every trained token is in exactly one share
    assert first.ntokens + second.ntokens == batch.ntokens
    assert share(batch, 0, 1) is batch


def test_an_uneven_last_batch_may_leave_a_rank_without_rows():
    assert [share_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [share_bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    empty = share(_batch([4]), 1, 2)
    assert empty.inputs.shape == (0, 0) and empty.ntokens == 0 and len(empty.lengths) == 0


class _Split:
    """Pairs of token lists (answer tokens trained), as `make_pair_batch` reads them."""

    def __init__(self, chosen_lengths, rejected_lengths):
        rng = np.random.default_rng(1)
        self.chosen = [rng.integers(3, 50, size=n) for n in chosen_lengths]
        self.rejected = [rng.integers(3, 50, size=n) for n in rejected_lengths]
        self.chosen_masks = [np.arange(n) >= 2 for n in chosen_lengths]
        self.rejected_masks = [np.arange(n) >= 2 for n in rejected_lengths]
        self.ref_logps = -np.arange(2 * len(chosen_lengths), dtype=np.float32).reshape(-1, 2)


def test_pair_shares_keep_a_pairs_chosen_and_rejected_together():
    split = _Split([5, 6, 9, 4, 7], [8, 3, 5, 12, 6])
    batch = make_pair_batch(split, [0, 1, 2, 3, 4], pad_id=0)
    first, second = share_pairs(batch, 0, 2), share_pairs(batch, 1, 2)
    assert first.pairs.tolist() == [0, 1, 2] and second.pairs.tolist() == [3, 4]
    # rows: this share's chosen, then the same pairs' rejected, trimmed to their own longest
    np.testing.assert_array_equal(first.lengths, [5, 6, 9, 8, 3, 5])
    assert first.inputs.shape == (6, 8) and second.inputs.shape == (4, 11)
    np.testing.assert_array_equal(second.inputs, batch.inputs[[3, 4, 8, 9], :11])
    np.testing.assert_array_equal(second.ref_logps, [-6, -8, -7, -9])
    assert first.ntokens + second.ntokens == batch.ntokens
    # the objective's denominators stay the global batch's on every share
    assert first.denominators == second.denominators == batch.denominators
    nll = (float(batch.nll_mask(prompt=True).sum()), float(batch.nll_mask(prompt=False).sum()))
    assert batch.denominators == (5, *nll)
    assert share_pairs(batch, 0, 1) is batch


def test_a_short_last_pair_batch_may_leave_a_rank_without_pairs():
    split = _Split([5], [7])
    empty = share_pairs(make_pair_batch(split, [0], pad_id=0), 1, 2)
    assert empty.size == 0 and empty.inputs.shape == (0, 0) and empty.ntokens == 0
    assert empty.denominators[0] == 1


# --------------------------------------------------------------------------- the launchers' world
def _cfg(**kw):
    return build_config(overrides={"model": "m", "data": "d", "train": True, **kw})


def test_read_world_from_mlx_launch_and_torchrun(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    world = read_world(_cfg(distributed_timeout=30), {"MLX_RANK": "1", "MLX_HOSTFILE": str(hosts)})
    assert (world.rank, world.size, world.launcher, world.transport) == (1, 2, "mlx.launch", "ring")
    assert world.timeout == 30 and not world.is_main and world.distributed
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    world = read_world(_cfg(backend="torch"), env)
    assert (world.rank, world.size, world.launcher, world.is_main) == (0, 2, "torchrun", True)
    assert read_world(_cfg(), {}) == World(timeout=600.0)  # a plain process
    (tmp_path / "one_host").write_text("")  # mlx.launch -n 1
    one = read_world(_cfg(), {"MLX_RANK": "0", "MLX_HOSTFILE": str(tmp_path / "one_host")})
    assert one.size == 1 and not one.distributed


def test_the_launcher_must_be_the_backends_own_and_the_batch_must_divide(tmp_path):
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(UserError, match="started by torchrun with 2 processes, but backend is mlx"):
        read_world(_cfg(), torchrun)
    with pytest.raises(UserError, match="batch_size 3 does not divide evenly over the 2") as err:
        read_world(_cfg(backend="torch", batch_size=3), torchrun)
    assert err.value.every_rank  # rank 0 alone prints it


def test_error_lines_name_the_rank_and_shared_errors_print_once(monkeypatch, capsys):
    from mlxft.errors import user_errors

    @user_errors
    def fail(every_rank):
        raise UserError("bad thing", every_rank=every_rank)

    monkeypatch.setenv("MLX_RANK", "1")
    # an error every rank meets: rank 0 says it; rank 1 leaves with 0, or the launcher would
    # terminate rank 0 before it printed
    for every_rank, expected, code in ((False, "Error: rank 1: bad thing\n", 2), (True, "", 0)):
        monkeypatch.setattr("mlxft.errors.LEAVING", _Leaving())
        with pytest.raises(SystemExit) as exit_:
            fail(every_rank)
        assert exit_.value.code == code and capsys.readouterr().err == expected


def test_an_engine_error_is_cut_to_its_first_sentence():
    from mlxft.errors import engine_message

    gloo = RuntimeError(
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:25260: Connection reset by peer. This is typically caused by a remote "
        "worker hanging.\nmore"
    )
    assert engine_message(gloo) == "Read error [127.0.0.1]:25260: Connection reset by peer"
    ring = RuntimeError("[ring] connection to a peer was lost")
    assert engine_message(ring) == "[ring] connection to a peer was lost"


# --------------------------------------------------------------------------- watchdog
def test_the_watchdog_ends_a_wait_that_outlives_the_timeout(monkeypatch, capsys):
    """A 'collective' that never returns: the watchdog says what hung, where, and exits 2."""
    monkeypatch.setattr(watchdog_module, "LEAVING", _Leaving())
    exited = threading.Event()
    codes = []

    def fake_exit(code):
        codes.append(code)
        exited.set()

    dog = watchdog_module.Watchdog(0.2, "a known hang", exit_process=fake_exit)
    dog.start(signals=False)
    dog.where = "step 3"
    with dog.guard("the gradient all-reduce"):
        assert exited.wait(30), "the watchdog never fired"
    assert codes == [2]
    line = capsys.readouterr().err.strip()
    assert line.startswith("Error: the gradient all-reduce at step 3 did not finish within")
    assert "distributed_timeout (0.2 s)" in line and "(a known hang)" in line and "--resume" in line


def test_a_guarded_wait_that_returns_in_time_is_left_alone(monkeypatch):
    monkeypatch.setattr(watchdog_module, "LEAVING", _Leaving())
    codes = []
    dog = watchdog_module.Watchdog(30.0, exit_process=codes.append).start(signals=False)
    for _ in range(50):
        with dog.guard("an all-gather"):
            pass
    assert codes == []


# --------------------------------------------------------------------------- per-rank state
class TwoRanks:
    """all_gather as two ranks would see it: this rank's values and the other's."""

    def __init__(self, other):
        self.other = other

    def all_gather(self, values):
        return np.stack([np.asarray(values), np.asarray(self.other(values))])


def test_rng_states_are_gathered_per_rank_and_restored_by_rank():
    from mlxft.training.checkpoint import rank_rng

    world = World(rank=0, size=2)
    mine = {"mlx.key": np.array([1, 2], np.uint32), "x": np.arange(3.0)}
    backend = TwoRanks(lambda v: v[::-1].copy())  # the other rank's bytes differ
    states = gather_states(world, backend, mine)
    np.testing.assert_array_equal(states[0]["mlx.key"], [1, 2])
    assert states[1]["mlx.key"].dtype == np.uint32 and not np.array_equal(states[1]["x"], mine["x"])
    saved = {"mlx.key": np.array([1, 2]), "rank1.mlx.key": np.array([3, 4]), "numpy.pos": 5}
    assert set(rank_rng(saved, 0)) == {"mlx.key", "numpy.pos"}
    np.testing.assert_array_equal(rank_rng(saved, 1)["mlx.key"], [3, 4])
    assert rank_rng(saved, 2) == {}  # written by fewer processes: a fresh stream


def test_ranks_that_do_not_start_alike_are_refused():
    from mlxft.training.checkpoint import Position

    world, pos = World(rank=0, size=2), Position(step=4, epoch=0, index=4, trained_tokens=99)
    same = TwoRanks(lambda v: v)
    check_same_start(world, same, pos, {"data": "abc"})
    later = TwoRanks(lambda v: np.r_[8, v[1:]])
    with pytest.raises(UserError, match="rank 1 starts at step 8 but rank 0 at step 4"):
        check_same_start(world, later, pos, {"data": "abc"})
    other_data = TwoRanks(lambda v: np.r_[v[:4], v[4] + 1])
    with pytest.raises(UserError, match="rank 1 does not train what rank 0 trains"):
        check_same_start(world, other_data, pos, {"data": "abc"})


# --------------------------------------------------------------------------- real worlds
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """29 short rows of varied length (cut WikiSQL text): with batch_size 4 each epoch has a
    1-row batch (one rank gets no row), and each rank's share is trimmed to its own longest."""
    out = tmp_path_factory.mktemp("dp_text")
    lines = (WIKISQL / "train.jsonl").read_text().splitlines()[:35]
    rows = [json.loads(line)["text"][: 60 + (i * 37) % 150] for i, line in enumerate(lines)]
    for name, part in (("train", rows[:29]), ("valid", rows[29:])):
        text = "\n".join(json.dumps({"text": row}) for row in part)
        (out / f"{name}.jsonl").write_text(text + "\n")
    return out


@pytest.fixture(scope="module")
def completions(data, tmp_path_factory):
    """The same rows as prompt/completion (the first half is the prompt): for mask_prompt."""
    out = tmp_path_factory.mktemp("dp_completions")
    for name in ("train", "valid"):
        rows = []
        for line in (data / f"{name}.jsonl").read_text().splitlines():
            text = json.loads(line)["text"]
            half = len(text) // 2
            rows.append(json.dumps({"prompt": text[:half], "completion": text[half:]}))
        (out / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return out


# Adam's eps at 1e-4, not 1e-8: a LoRA A element whose gradient is float-rounding noise around
# zero would otherwise take full-size steps in whichever direction the noise points.  With 1e-8
# one element in 512 ends 4e-5 apart between 1 and 2 processes, and 1.5e-5 between the MLX and
# torch backends on one process; with 1e-4 the adapters agree to 3e-7.
ADAM = Path(__file__).resolve().parent / "data_parallel_adam.yaml"


def lora_args(data, out, backend, *extra):
    return [
        "lora",
        "--config",
        ADAM,
        "--train",
        "--backend",
        backend,
        "--model",
        STORIES,
        "--data",
        data,
        "--adapter-path",
        out,
        "--iters",
        ITERS,
        "--batch-size",
        4,
        "--max-seq-length",
        256,
        "--num-layers",
        -1,
        "--steps-per-report",
        1,
        "--steps-per-eval",
        5,
        "--val-batches",
        -1,
        "--learning-rate",
        "1e-3",
        "--save-every",
        SAVE_EVERY,
        "--distributed-timeout",
        60,
        *extra,
    ]


# plain: the kill/resume test; masked: grad accumulation and mask_prompt together
VARIANTS = {"plain": (), "masked": ("--grad-accumulation-steps", 2, "--mask-prompt")}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, completions):
    """One process, one thread like each rank: {(backend, variant): adapter_path}, run once."""
    runs = {}

    def get(backend, variant):
        if (backend, variant) not in runs:
            out = tmp_path_factory.mktemp(f"one_{backend}_{variant}")
            source = completions if variant == "masked" else data
            run_one(lora_args(source, out, backend, *VARIANTS[variant]))
            runs[backend, variant] = out
        return runs[backend, variant]

    return get


def run_one(args) -> None:
    """One plain process (no launcher), one thread like each rank."""
    result = subprocess.run(
        [str(MLXFT), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **ONE_THREAD),
    )
    assert result.returncode == 0, result.stderr[-3000:]


def launch(backend, args, processes=2, **popen):
    """The real launcher from this venv, one thread per rank (2 cores, shared)."""
    if backend == "torch":
        pytest.importorskip("torch")
    command = launcher_command(backend, processes, [str(MLXFT), *[str(a) for a in args]])
    env = dict(os.environ, **ONE_THREAD)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
    )


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"the launcher did not finish within {timeout}s: {err[-2000:]}")
    return out, err


def ranks(proc) -> dict:
    """{rank: pid} of the launcher's mlxft processes (their environment names the rank)."""
    found, todo = {}, [proc.pid]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                todo.append(child)
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                names = dict(e.split(b"=", 1) for e in environ if b"=" in e)
                rank = names.get(b"MLX_RANK", names.get(b"RANK"))
                if rank is not None and any(a.endswith(b"mlxft") for a in argv[:2]):
                    found[int(rank)] = child
    return found


def kill_tree(proc) -> None:
    for pid in ranks(proc).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()


def losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        (r["step"], key): (r[key], r["trained_tokens"])
        for r in rows
        for key in ("train_loss", "val_loss")
        if key in r
    }


def assert_same_run(reference: Path, run: Path) -> None:
    """Per-step losses (train and validation) and the final adapter within 1e-5; the same
    trained-token counts (the world's) on every row."""
    from mlxft.adapters.files import load_adapter

    ref, got = losses(reference), losses(run)
    assert sorted(ref) == sorted(got), "the runs report different steps"
    assert sum(1 for _, kind in got if kind == "train_loss") == ITERS
    for key in ref:
        assert ref[key][1] == got[key][1], f"{key}: trained tokens differ"
        assert abs(ref[key][0] - got[key][0]) <= TOLERANCE, (
            f"{key}: {ref[key][0]} on one process vs {got[key][0]} on two"
        )
    _, a = load_adapter(reference)
    _, b = load_adapter(run)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=TOLERANCE, rtol=0)


def error_lines(text: str) -> list:
    """Our one-line errors. The launcher and the ranks share one stderr, so a launcher warning
    written without its newline (`[WARN] Node … exited with code -9`) can precede ours on the
    same line; a traceback's `RuntimeError:` is not ours (a letter before `Error:`)."""
    return [m.group(0) for m in re.finditer(r"(?<![A-Za-z])Error: .*", text)]


BACKENDS = ["mlx", "torch"]
HEADERS = {"mlx": "World: 2 processes (mlx.launch, ring), backend mlx", "torch": "(torchrun)"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_train_like_one(backend, completions, reference, tmp_path):
    """Grad accumulation 2 and mask_prompt (the head on trained rows only) on 2 ranks."""
    out = tmp_path / "two"
    args = lora_args(completions, out, backend, *VARIANTS["masked"], "--report-to", "tensorboard")
    stdout, stderr = finish(launch(backend, args))
    assert error_lines(stderr) == [], stderr[-3000:]
    assert HEADERS[backend] in stdout and "batch_size 4 is global: 2 rows per process" in stdout
    assert stdout.count("Saved adapter to") == 1  # rank 0 alone reports
    assert_same_run(reference(backend, "masked"), out)
    # one metrics.jsonl (rank 0's: no rank appended to it), one adapter, nothing else
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "mlxft_config.yaml",
        "checkpoints",
        "trackers.json",
        "runs",
    }
    # one tracker run, rank 0's, holding metrics.jsonl's training losses step for step
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    got = [(e.step, e.value) for e in acc.Scalars("train_loss")]
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """13 short WikiSQL preference pairs for training (batch_size 4: each epoch ends with a
    1-pair batch, so one rank gets no pair), 5 for validation (shares of 3 and 2 pairs)."""
    out = tmp_path_factory.mktemp("dp_pairs")
    lines = (REPO / "examples" / "data" / "wikisql_dpo" / "train.jsonl").read_text().splitlines()
    rows = []
    for line in lines[:30]:
        pair = json.loads(line)
        row = {
            "prompt": "Q: " + pair["prompt"].split("\nQ: ", 1)[1],
            "chosen": pair["chosen"].split(" FROM ")[0],
            "rejected": pair["rejected"].split(" FROM ")[0],
        }
        if row["chosen"] != row["rejected"]:
            rows.append(json.dumps(row))
    for name, part in (("train", rows[:13]), ("valid", rows[13:18])):
        (out / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    return out


# DPO + NLL (rpo_alpha: its token mean is over the world's chosen answers) with grad
# accumulation: MLX with the reference log-probs precomputed (computed per rank and gathered),
# torch with the reference computed each step on each rank's shares (adapter off)
DPO = {
    "mlx": ("--train-mode", "dpo", "--grad-accumulation-steps", 2, "--precompute-ref-log-probs"),
    "torch": ("--train-mode", "dpo", "--grad-accumulation-steps", 2),
}
DPO = {k: (*v, "--rpo-alpha", 0.5) for k, v in DPO.items()}
# what a preference row reports, compared between 1 and 2 processes
PREFERENCE_KEYS = ("train_loss", "val_loss", "nll_loss", *DPO_METRICS)


def preference_rows(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        (r["step"], "val" if "val_loss" in r else "train", key): r[key]
        for r in rows
        for key in (*PREFERENCE_KEYS, "trained_tokens")
        if key in r
    }


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_tune_preferences_like_one(backend, pairs, tmp_path):
    """DPO on 2 ranks: the same per-step losses and reward metrics (training and validation)
    and the same adapter as one process, to 1e-5 (log-prob sums: relative)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_one(lora_args(pairs, one, backend, *DPO[backend]))
    stdout, stderr = finish(launch(backend, lora_args(pairs, two, backend, *DPO[backend])))
    assert error_lines(stderr) == [], stderr[-3000:]
    assert HEADERS[backend] in stdout and "DPO: beta" in stdout and "(rpo_alpha)" in stdout
    assert stdout.count("Saved adapter to") == 1
    ref, got = preference_rows(one), preference_rows(two)
    assert sorted(ref) == sorted(got), "the runs report different steps or metrics"
    assert sum(1 for _, _, key in got if key == "train_loss") == ITERS
    assert any(key == "val_loss" for _, _, key in got)
    assert any(key == "nll_loss" for _, _, key in got)
    gaps = {}
    for key in ref:
        if key[2] == "trained_tokens":
            assert ref[key] == got[key], f"{key}: trained tokens differ"
            continue
        # relative above 1: logps/* are sums over an answer's tokens (~-170 here), whose float32
        # step (the sums' precision on the device and in the all-reduce) is 1.5e-5
        gaps[key] = abs(ref[key] - got[key]) / max(1.0, abs(ref[key]))
        assert gaps[key] <= TOLERANCE, f"{key}: {ref[key]} on one process vs {got[key]} on two"
    worst = max(gaps, key=gaps.get)
    print(f"largest metric gap, 2 vs 1 processes ({backend}): {gaps[worst]:.2e} at {worst}")
    from mlxft.adapters.files import load_adapter

    _, a = load_adapter(one)
    _, b = load_adapter(two)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=TOLERANCE, rtol=0)
    print(f"largest adapter gap ({backend}): {max(np.abs(a[k] - b[k]).max() for k in a):.2e}")
    if backend == "mlx":  # the gathered reference log-probs are the one-process run's
        from safetensors.numpy import load_file

        name = "checkpoints/step-0000004/ref_logps.safetensors"
        r1, r2 = load_file(str(one / name)), load_file(str(two / name))
        for split in ("train", "valid"):
            np.testing.assert_allclose(r1[split], r2[split], rtol=1e-6)  # sums of ~-150


def wait_for_checkpoint(proc, out: Path, step: int, timeout: float = 300.0) -> None:
    """Poll (bounded) until checkpoints/step-N is complete."""
    target = out / "checkpoints" / f"step-{step:07d}" / "trainer_state.json"
    deadline = time.monotonic() + timeout
    while not target.is_file():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"no checkpoint at step {step} within {timeout}s")
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("backend, victim, resume_on", [("mlx", 0, 2), ("torch", 1, 1)])
def test_a_killed_rank_ends_the_other_and_resume_matches_one_process(
    backend, victim, resume_on, data, reference, tmp_path
):
    """Kill rank 0 (the writer) or rank 1 mid-run; resume on the same world (MLX) or on one
    process (torch: the data position is global, so another world size continues the run)."""
    out = tmp_path / "run"
    args = lora_args(data, out, backend)
    proc = launch(backend, args)
    wait_for_checkpoint(proc, out, SAVE_EVERY)
    pids = ranks(proc)
    assert sorted(pids) == [0, 1]
    killed_at = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    _, stderr = finish(proc, timeout=120)
    assert time.monotonic() - killed_at < 60  # within --distributed-timeout
    survivor = 1 - victim
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]  # the survivor's one line; the dead rank says nothing
    prefix = "Error: rank 1: " if survivor else "Error: "
    assert lines[0].startswith(prefix) and "--resume" in lines[0], lines
    assert "lost another rank" in lines[0] or "stopped by SIGTERM" in lines[0], lines
    assert not (out / "adapter_model.safetensors").exists()
    if resume_on == 2:
        stdout, stderr = finish(launch(backend, [*args, "--resume"]))
    else:
        done = subprocess.run(
            [str(MLXFT), *map(str, args), "--resume"],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, **ONE_THREAD),
        )
        stdout, stderr = done.stdout, done.stderr
        assert done.returncode == 0, stderr[-3000:]
        assert "checkpoint written by 2 process(es), resumed on 1" in stdout
    assert error_lines(stderr) == [], stderr[-3000:]
    assert "Resuming from" in stdout
    assert_same_run(reference(backend, "plain"), out)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_after_the_same_step(data, tmp_path):
    """Ctrl-C reaches the launcher and every rank (one process group, as in a terminal), and
    torchrun forwards it once more: the ranks agree on the step (the vote rides on the step's
    all-reduce), rank 0 saves a checkpoint there and says how to resume, all exit 130."""
    out = tmp_path / "run"
    proc = launch("torch", lora_args(data, out, "torch"), start_new_session=True)
    wait_for_checkpoint(proc, out, SAVE_EVERY)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = finish(proc, timeout=120)
    said = [line for line in stderr.splitlines() if line.startswith("Interrupted at step")]
    assert len(said) == 1, stderr[-3000:]
    step = int(said[0].split()[3].rstrip(":"))
    assert SAVE_EVERY < step < ITERS and "--resume" in said[0]
    assert (out / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "train_loss" in r) == step
    assert stderr.count("Interrupt: finishing this step") == 1  # rank 0 speaks for the world
    assert "mlxft/" not in stderr  # no traceback of ours (torchrun prints its own on SIGINT)
    assert error_lines(stderr) == []
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_hung_rank_is_timed_out_with_one_line(data, tmp_path):
    """SIGSTOP a rank (a stand-in for mlx#4475's all_sum that never returns): the other ends
    after distributed_timeout with one line; the launcher then ends the stopped one."""
    out = tmp_path / "run"
    timeout = 20
    proc = launch("mlx", lora_args(data, out, "mlx", "--distributed-timeout", timeout))
    wait_for_checkpoint(proc, out, SAVE_EVERY)
    pids = ranks(proc)
    stopped_at = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        deadline = stopped_at + timeout + 60
        while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
            state = Path(f"/proc/{pids[0]}/stat").read_text().split()[2]
            if state == "Z":
                break
            time.sleep(0.05)
        waited = time.monotonic() - stopped_at
    finally:
        os.kill(pids[1], signal.SIGKILL)
    _, stderr = finish(proc, timeout=120)
    assert timeout <= waited < timeout + 60
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("Error: the gradient all-reduce at step ")
    assert f"did not finish within distributed_timeout ({timeout} s)" in lines[0]
    assert "ml-explore/mlx#4475" in lines[0]


@pytest.mark.slow
def test_a_batch_that_does_not_divide_is_one_line_before_any_work(data, tmp_path):
    out = tmp_path / "run"
    stdout, stderr = finish(
        launch("mlx", lora_args(data, out, "mlx", "--batch-size", 3)), timeout=300
    )
    lines = error_lines(stderr)
    assert lines == [
        "Error: batch_size 3 does not divide evenly over the 2 processes mlx.launch started: "
        "use a multiple of 2 (batch_size is the global batch; each process trains on "
        "batch_size / 2 rows per step)"
    ], stderr
    assert "Model" not in stdout and not out.exists()


@pytest.mark.slow
def test_bench_runs_one_and_two_processes(tmp_path, data):
    import yaml

    config = tmp_path / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(STORIES),
                "data": str(data),
                "batch_size": 4,
                "max_seq_length": 128,
                "num_layers": -1,
                "lora_parameters": {"rank": 4},
            }
        )
    )
    report_path = tmp_path / "report.json"
    env = dict(os.environ, **ONE_THREAD)
    args = ["bench", "-c", config, "--backends", "mlx", "--steps", "3", "--warmup", "1"]
    result = subprocess.run(
        [str(MLXFT), *map(str, args), "--world-size", "2", "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    one, two = report["backends"]["mlx"], report["backends"]["mlx x2"]
    assert (one["processes"], two["processes"], report["world_size"]) == (1, 2, 2)
    assert one["allreduce_share"] == 0 and 0 < two["allreduce_share"] < 1
    np.testing.assert_allclose(one["losses"], two["losses"], atol=TOLERANCE)
    assert one["step_tokens"] == two["step_tokens"]  # the world's tokens, the same work
    assert "data parallel mlx x2/mlx: " in result.stdout and "not a speed-up" in result.stdout
