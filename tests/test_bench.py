"""`mlxft bench`: real runs of both backends on stories260K, checked through the JSON report."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from mlxft.bench.compare import available, loss_difference, plot, summarize
from mlxft.cli import main


def _config(tmp_path, stories, wikisql_small, **extra):
    cfg = {
        "model": str(stories),
        "data": str(wikisql_small),
        "batch_size": 2,
        "max_seq_length": 96,
        "num_layers": -1,
        "learning_rate": 1e-3,
        "lora_parameters": {"rank": 4},
        **extra,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bench_reports_every_backend(tmp_path, stories, wikisql_small):
    backends = ["mlx"] + (["torch"] if available("torch") is None else [])
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "-c",
            str(_config(tmp_path, stories, wikisql_small)),
            "--backends",
            ",".join(backends),
            "--steps",
            "4",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output and "mlx" in result.output
    report = json.loads(out.read_text())
    assert list(report["backends"]) == backends
    assert report["steps"] == 4 and report["warmup"] == 1
    assert report["settings"]["rank"] == 4 and report["settings"]["batch_size"] == 2
    for name, r in report["backends"].items():
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["tokens_per_second"] > 0
        st = r["step_time"]
        assert 0 < st["p10"] <= st["median"] <= st["p90"]
        assert r["peak_rss_gb"] > 0.05 and r["peak_memory_gb"] >= 0
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"])
        assert r["trained_tokens"] == sum(r["step_tokens"]) > 0
        # tokens/s is trained tokens after warm-up over their step time
        assert r["tokens_per_second"] == pytest.approx(
            sum(r["step_tokens"][1:]) / sum(r["step_seconds"][1:])
        )
    assert report["backends"]["mlx"]["blas"]  # the BLAS behind MLX's CPU matmuls is recorded
    assert f"mlx BLAS: {report['backends']['mlx']['blas']}" in result.output
    if len(backends) == 2:
        diff = report["loss_difference"]["torch-mlx"]
        assert diff["max_abs"] < 1e-3  # identical batches from identical LoRA weights
        assert "loss difference torch-mlx" in result.output
    else:
        assert report["loss_difference"] is None


def test_bench_bad_arguments_are_one_line_errors(tmp_path, stories, wikisql_small):
    cfg = str(_config(tmp_path, stories, wikisql_small))
    runner = CliRunner()
    bad = runner.invoke(main, ["bench", "-c", cfg, "--backends", "mlx,jax"])
    assert bad.exit_code == 2 and "unknown backend 'jax'" in bad.output
    short = runner.invoke(
        main, ["bench", "-c", cfg, "--backends", "mlx", "--steps", "2", "--warmup", "2"]
    )
    assert short.exit_code == 2 and "--steps (2) must be larger than --warmup (2)" in short.output
    missing = runner.invoke(
        main, ["bench", "-c", cfg, "--backends", "mlx", "--model", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 2 and "model directory not found" in missing.output


def test_unavailable_torch_is_a_clean_error(tmp_path, stories, wikisql_small, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    result = CliRunner().invoke(
        main, ["bench", "-c", str(_config(tmp_path, stories, wikisql_small)), "--backends", "torch"]
    )
    assert result.exit_code == 2
    assert "backend 'torch' is unavailable: PyTorch is not installed" in result.output


def _raw(losses, seconds, tokens):
    return {
        "backend": "mlx",
        "device": "cpu",
        "dtype": "float32",
        "peak_memory_gb": 0.1,
        "peak_rss_gb": 0.5,
        "loss": losses,
        "seconds": seconds,
        "tokens": tokens,
        "positions": [t + 2 for t in tokens],
    }


def test_summary_leaves_warmup_out_and_diffs_losses(tmp_path):
    a = summarize(_raw([5.0, 4.0, 3.0], [10.0, 1.0, 3.0], [100, 100, 200]), warmup=1)
    assert a["tokens_per_second"] == pytest.approx(300 / 4.0)
    assert a["warmup_seconds"] == 10.0 and a["first_step_seconds"] == 10.0
    assert a["step_time"]["median"] == pytest.approx(2.0)
    b = summarize(_raw([5.0, 4.5, 2.0], [1.0, 1.0, 1.0], [100, 100, 200]), warmup=1)
    diff = loss_difference({"mlx": a, "torch": b})["torch-mlx"]
    assert diff == {"first": 0.0, "last": -1.0, "max_abs": 1.0}
    assert loss_difference({"mlx": a}) is None
    report = {"backends": {"mlx": a, "torch": {**b, "backend": "torch"}}, "warmup": 1}
    png = tmp_path / "chart.png"
    wrote = plot(report, png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert wrote is False and not png.exists()
    else:
        assert wrote and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
