"""The torch backend on its own: device/dtype choice, refusals, the CLI report and files,
PEFT reading its adapters, KV-cached generation, and resumable optimizer/RNG state."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from mlxft.cli import main  # noqa: E402
from mlxft.data import epoch_batches  # noqa: E402
from mlxft.errors import UserError  # noqa: E402
from mlxft.torch_backend.device import available_devices, pick_device, pick_dtype  # noqa: E402
from mlxft.training.session import Session  # noqa: E402
from tests.conftest import REPO, write_wikisql  # noqa: E402
from tests.session_helpers import make_config  # noqa: E402

TRAIN_FIELDS = {
    "step",
    "train_loss",
    "learning_rate",
    "tokens_per_second",
    "iterations_per_second",
    "trained_tokens",
    "peak_memory_gb",
    "grad_norm",
}
VAL_FIELDS = {
    "step",
    "val_loss",
    "val_perplexity",
    "val_tokens",
    "val_seconds",
    "learning_rate",
    "tokens_per_second",
    "iterations_per_second",
    "trained_tokens",
    "peak_memory_gb",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_wikisql(tmp_path_factory.mktemp("torch_data"), 32, 8)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def session(model, data, out, **overrides) -> Session:
    return Session(make_config(model, data, out, backend="torch", **overrides), reporter_quiet=True)


# ---------------------------------------------------------------- device and dtype
def test_default_device_is_the_best_available():
    best = next(d for d in ("mps", "cuda", "cpu") if d in available_devices())
    assert pick_device(None).type == best
    assert pick_device("cpu") == torch.device("cpu")


def test_device_errors_name_the_fix():
    with pytest.raises(UserError, match=r"device must be mps, cuda, cuda:N or cpu, got 'tpu'"):
        pick_device("tpu")
    missing = next((d for d in ("cuda", "mps") if d not in available_devices()), None)
    if missing is None:
        pytest.skip("both cuda and mps are available here")
    with pytest.raises(
        UserError, match=rf"device '{missing}' is not available here .*available: cpu"
    ):
        pick_device(missing)


def test_dtype_defaults_to_float32_and_refuses_unsupported_halves():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu, stored="bfloat16") == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="dtype float16 is not supported on the CPU"):
        pick_dtype("float16", cpu)


def test_cli_refuses_unavailable_device_and_dtype(tiny_llama, data, tmp_path):
    missing = next((d for d in ("cuda", "mps") if d not in available_devices()), None)
    base = (
        "lora",
        "--train",
        "--backend",
        "torch",
        "--model",
        tiny_llama,
        "--data",
        data,
        "--adapter-path",
        tmp_path / "a",
    )
    if missing:
        result = cli(*base, "--device", missing)
        assert result.exit_code == 2
        assert f"Error: device '{missing}' is not available here" in result.output
    config = tmp_path / "half.yaml"
    config.write_text("dtype: float16\ndevice: cpu\n")
    result = cli(*base, "-c", config)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: dtype float16 is not supported on the CPU by the torch backend; use float32 or "
        "bfloat16"
    )


def test_cli_refuses_a_quantized_mlx_base(tiny_llama, data, tmp_path):
    model = tmp_path / "q4"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    result = cli(
        "lora",
        "--train",
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        tmp_path / "a",
    )
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"Error: {model}: this is a 4-bit quantized MLX model")
    assert "use --backend mlx" in message and f"mlxft convert --to-hf --mlx-path {model}" in message


def test_optimizer_options_are_checked(tiny_llama, data, tmp_path):
    # checked once, in the config layer, before any model loads (it was the torch backend's)
    with pytest.raises(UserError, match=r"optimizer_config.adamw.momentum: not an option of adamw"):
        session(tiny_llama, data, tmp_path / "o", optimizer_config={"adamw": {"momentum": 0.9}})


# ---------------------------------------------------------------- the CLI run
@pytest.fixture(scope="module")
def cli_run(tiny_llama, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_cli") / "adapter"
    result = cli(
        "lora",
        "--train",
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--model",
        tiny_llama,
        "--data",
        data,
        "--adapter-path",
        out,
        "--iters",
        4,
        "--batch-size",
        2,
        "--max-seq-length",
        64,
        "--rank",
        4,
        "--num-layers",
        -1,
        "--learning-rate",
        1e-2,
        "--steps-per-report",
        2,
        "--steps-per-eval",
        4,
        "--val-batches",
        2,
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cli_report_lines(cli_run, tiny_llama):
    out, output = cli_run
    lines = output.strip().splitlines()
    assert lines[0] == f"Model {tiny_llama} (float32) on torch:cpu"
    assert lines[1].startswith("Trainable parameters: ")
    assert lines[2].startswith("LORA: rank 4, scale 2 (alpha 8), dropout 0, 14 modules (")
    assert not any(line.startswith(("BLAS:", "Loading weights")) for line in lines)
    for step in (2, 4):
        line = next(li for li in lines if li.startswith(f"Iter {step}: train loss "))
        assert ", lr 1.000e-02, it/s " in line and line.endswith(" GB")
    assert [li.split(":")[0] for li in lines if "Val loss" in li] == ["Iter 0", "Iter 4"]
    assert (
        lines[-1]
        == f"Saved adapter to {out} (PEFT layout: adapter_config.json, adapter_model.safetensors)"
    )


def test_cli_metrics_and_files(cli_run):
    out, _ = cli_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if "train_loss" in r]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in trains] == [2, 4] and [r["step"] for r in vals] == [0, 4]
    assert all(set(r) == TRAIN_FIELDS for r in trains) and all(set(r) == VAL_FIELDS for r in vals)
    assert all(
        r["peak_memory_gb"] > 0 and r["trained_tokens"] > 0 and r["grad_norm"] > 0 for r in trains
    )
    assert vals[1]["val_loss"] < vals[0]["val_loss"]
    assert {"adapter_config.json", "adapter_model.safetensors", "mlxft_config.yaml"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)  # raised inside PEFT
def test_peft_loads_the_adapter_with_the_same_logits(cli_run, tiny_llama, data, tmp_path):
    """PEFT (the reference implementation) reads our file as is and computes our logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = cli_run
    ours = Session(
        make_config(tiny_llama, data, out, backend="torch", train=False, device="cpu"),
        reporter_quiet=True,
    )
    ids = np.asarray(ours.splits["valid"].sequences[0][:24])[None]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(torch.tensor(ids)).logits.numpy()
        theirs = PeftModel.from_pretrained(base, out).eval()(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - plain).max() > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(ours.backend.logits(ids), theirs, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- generation
def test_cached_generation_matches_a_full_forward(tiny_llama, data, tmp_path):
    s = session(tiny_llama, data, tmp_path / "g")
    rng = np.random.default_rng(0)
    for _, layer in s.backend._lora_layers():  # a non-zero adapter, so its path is exercised
        with torch.no_grad():
            layer.lora_B.copy_(
                torch.tensor(rng.normal(0, 0.05, tuple(layer.lora_B.shape)), dtype=torch.float32)
            )
    ids = list(s.splits["valid"].sequences[0][:16])
    full = s.backend.logits(np.asarray(ids)[None])[0]
    steps = [s.backend.start_generation(ids[:6])] + [s.backend.next_logits(t) for t in ids[6:]]
    assert all(x.dtype == np.float32 and x.shape == (full.shape[-1],) for x in steps)
    np.testing.assert_allclose(np.stack(steps), full[5:], rtol=0, atol=1e-5)
    again = s.backend.start_generation(ids[:6])  # a new prompt starts a fresh cache
    np.testing.assert_allclose(again, full[5], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- training details
def test_grad_checkpoint_recomputes_the_blocks(tiny_llama, data, tmp_path):
    """Checkpointing recomputes every block but the last, without the attention kernel (kept) or
    the block's last base matmul (not needed by the backward), and gives the same gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mlxft.torch_backend.checkpoint import attention_ops

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    calls, attention, grads = {}, {}, {}
    for checkpoint in (False, True):
        s = session(tiny_llama, data, tmp_path / str(checkpoint), grad_checkpoint=checkpoint)
        s.backend.setup_training(s.cfg)
        blocks = s.backend._blocks(s.backend.model)
        assert len(blocks) >= 2
        watched = {
            "first q": blocks[0].self_attn.q_proj,
            "first down base": blocks[0].mlp.down_proj.base,
            "last q": blocks[-1].self_attn.q_proj,
        }
        calls[checkpoint] = dict.fromkeys(watched, 0)
        for name, module in watched.items():
            module.register_forward_hook(
                lambda *_, c=calls[checkpoint], n=name: c.__setitem__(n, c[n] + 1)
            )
        batch = epoch_batches(s.splits["train"], 2, seed=0, epoch=0, pad_id=s.pad_id)[0]
        s.backend._set_training(True)
        loss = s.backend._loss_sum(batch)
        with Ops() as ops:
            loss.backward()
        attention[checkpoint] = sum(op in attention_ops() for op in ops.seen)
        grads[checkpoint] = [p.grad.clone() for _, p in s.backend._named_trainable()]
    assert calls[False] == {"first q": 1, "first down base": 1, "last q": 1}
    assert calls[True] == {"first q": 2, "first down base": 1, "last q": 1}
    assert attention == {
        False: 0,
        True: 0,
    }  # no attention forward in the backward, recomputed or not
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "optimizer, state_names", [("adamw", {"exp_avg", "exp_avg_sq"}), ("sgd", {"momentum_buffer"})]
)
def test_resume_replays_exactly(tiny_llama, data, tmp_path, optimizer, state_names):
    """Adapter + optimizer state + RNG state after 2 steps reproduce steps 3-4 (dropout on)."""
    overrides = dict(dropout=0.3, optimizer=optimizer, optimizer_config={"sgd": {"momentum": 0.9}})
    first = session(tiny_llama, data, tmp_path / "a", **overrides)
    first.backend.setup_training(first.cfg)
    batches = epoch_batches(first.splits["train"], 2, seed=0, epoch=0, pad_id=first.pad_id)
    for i in range(2):
        first.backend.train_step(batches[i : i + 1], 1e-2)
    saved = (
        first.backend.adapter_weights(),
        first.backend.optimizer_state(),
        first.backend.rng_state(),
    )
    expected = [first.backend.train_step(batches[i : i + 1], 1e-2) for i in (2, 3)]

    opt_state = saved[1]
    assert int(opt_state["step"].reshape(-1)[0]) == 2
    assert {k.rsplit(".", 1)[1] for k in opt_state if k != "step"} == state_names
    assert {k.rsplit(".", 1)[0] for k in opt_state if k != "step"} == set(saved[0])

    def resumed(restore_rng: bool):
        again = session(tiny_llama, data, tmp_path / "b", **overrides)
        again.backend.setup_training(again.cfg)
        again.backend.set_adapter_weights(saved[0])
        again.backend.load_optimizer_state(saved[1])
        if restore_rng:
            again.backend.set_rng_state(saved[2])
        return [again.backend.train_step(batches[i : i + 1], 1e-2) for i in (2, 3)]

    assert resumed(True) == expected
    assert resumed(False) != expected  # the dropout masks depend on the restored RNG


def test_mlx_path_does_not_import_torch():
    code = (
        "import mlxft.training.session, mlxft.mlx_backend, mlxft.cli, sys; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
