"""`mlxft bench`: the same training work on each backend, one fresh process after another.

    mlxft bench --config cfg.yaml [--backends mlx,torch] [--steps N] [--warmup K]
                [--json out.json] [--plot out.png]          (command line: `bench_cli.py`)

Every backend trains from identical LoRA weights on identical batches (see `mlxft.bench.worker`),
so the figures compare like with like:

- tokens/s: trained (non-padding, unmasked) tokens per second of step time, after warm-up
  steps (the first steps carry one-off costs: allocator growth, kernel builds for mx.compile);
- step time: median and the p10-p90 spread, after warm-up;
- peak memory: the backend's own accounting (MLX's allocator, torch's device counters) and the
  process's peak RSS (everything: framework, weights, Python), each process measured alone;
- loss: first and last step loss, and the per-step difference between backends.

With `--world-size N` each backend also runs the same work data-parallel on N local processes
under its own launcher (`mlx.launch`, `torchrun`): the same global batches, so the same losses,
with the share of each step spent in the all-reduce (waiting for the slower rank included).
On one machine the ranks share its cores, so this measures what splitting a batch costs, not
a speed-up; the report says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from mlxft.errors import UserError

BACKENDS = ("mlx", "torch")
LAUNCH_NAMES = {"mlx": "mlx.launch, ring over loopback", "torch": "torchrun, gloo"}
DEFAULT_STEPS = 20  # not the config's iters: a benchmark needs steady-state steps, not a whole run


def available(backend: str) -> str | None:
    """None if `backend` can run here, else why not (checked without importing torch)."""
    if backend == "mlx":
        return None if importlib.util.find_spec("mlx") else "mlx is not installed"
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install 'mlxft[torch]')"
    if importlib.util.find_spec("mlxft.torch_backend") is None:  # top-level lookup: imports nothing
        return "the torch backend package is missing from this install"
    return None


def parse_backends(text: str | None) -> list[str]:
    """`--backends mlx,torch`; without it, every backend that can run here."""
    if not text:
        return [b for b in BACKENDS if available(b) is None]
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in BACKENDS:
            raise UserError(
                f"--backends: unknown backend '{name}'; choose from {', '.join(BACKENDS)}"
            )
        reason = available(name)
        if reason:
            raise UserError(f"--backends: backend '{name}' is unavailable: {reason}")
    if len(set(names)) != len(names):
        raise UserError("--backends: a backend is listed twice")
    return names


def world_env(processes: int) -> dict:
    """The environment for `processes` ranks on this machine: its cores split between them
    (each rank's BLAS and OpenMP threads), unless the caller chose already."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(name, threads)
    return env


def run_worker(spec: dict, timeout: float | None = None, processes: int = 1) -> dict:
    """One backend in a fresh Python process (or `processes` ranks under its launcher); its
    JSON result (or a UserError with its reason)."""
    from mlxft.training.world import launcher_command

    with tempfile.TemporaryDirectory(prefix="mlxft-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "mlxft.bench.worker", str(spec_path), str(out_path)]
        env = None
        if processes > 1:
            command = launcher_command(spec["backend"], processes, command)
            env = world_env(processes)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if out_path.exists():
            result = json.loads(out_path.read_text())
        else:
            tail = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:]
            result = {"error": f"worker exited with status {proc.returncode}: {' '.join(tail)}"}
    if "error" in result:
        raise UserError(f"bench: backend '{spec['backend']}' failed: {result['error']}")
    return result


def summarize(raw: dict, warmup: int) -> dict:
    """Steady-state figures from one worker's per-step record."""
    seconds = np.asarray(raw["seconds"][warmup:])
    tokens = np.asarray(raw["tokens"][warmup:])
    comm = np.asarray(raw.get("comm_seconds", [0.0] * len(raw["seconds"]))[warmup:])
    out = {
        k: raw[k]
        for k in (
            "backend",
            "device",
            "dtype",
            "peak_memory_gb",
            "peak_rss_gb",
            "load_seconds",
            "trainable_parameters",
            "total_parameters",
            "versions",
        )
        if k in raw
    }
    if "blas" in raw:
        out["blas"] = raw["blas"]
    out.update(
        processes=raw.get("processes", 1),
        allreduce_share=float(comm.sum() / seconds.sum()),
        tokens_per_second=float(tokens.sum() / seconds.sum()),
        step_time={
            "median": float(np.median(seconds)),
            "p10": float(np.percentile(seconds, 10)),
            "p90": float(np.percentile(seconds, 90)),
            "mean": float(seconds.mean()),
        },
        warmup_seconds=float(sum(raw["seconds"][:warmup])),
        first_step_seconds=float(raw["seconds"][0]),
        first_loss=raw["loss"][0],
        last_loss=raw["loss"][-1],
        trained_tokens=int(sum(raw["tokens"])),
        padding_fraction=1.0 - sum(raw["tokens"]) / max(1, sum(raw["positions"])),
        losses=raw["loss"],
        step_seconds=raw["seconds"],
        step_tokens=raw["tokens"],
    )
    return out


def loss_difference(results: dict) -> dict | None:
    """Per-step loss gap of every backend against the first one (None with one backend)."""
    names = list(results)
    if len(names) < 2:
        return None
    ref = np.asarray(results[names[0]]["losses"])
    out = {}
    for name in names[1:]:
        other = np.asarray(results[name]["losses"])
        diff = other - ref
        out[f"{name}-{names[0]}"] = {
            "first": float(diff[0]),
            "last": float(diff[-1]),
            "max_abs": float(np.abs(diff).max()),
        }
    return out


def settings_of(cfg) -> dict:
    p = cfg.lora_parameters
    return {
        "model": cfg.model,
        "data": cfg.data,
        "fine_tune_type": cfg.fine_tune_type,
        "batch_size": cfg.batch_size,
        "grad_accumulation_steps": cfg.grad_accumulation_steps,
        "max_seq_length": cfg.max_seq_length,
        "learning_rate": cfg.learning_rate,
        "optimizer": cfg.optimizer,
        "num_layers": cfg.num_layers,
        "rank": p["rank"],
        "alpha": p["alpha"],
        "keys": p["keys"],
        "grad_checkpoint": cfg.grad_checkpoint,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
    }


def table(report: dict) -> list[str]:
    header = (
        f"{'backend':<10}{'device':<8}{'dtype':<10}{'tok/s':>9}{'step ms (p10-p90)':>22}"
        f"{'peak GB':>9}{'RSS GB':>8}{'loss first':>11}{'last':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, r in report["backends"].items():
        st = r["step_time"]
        spread = f"{1e3 * st['median']:.0f} ({1e3 * st['p10']:.0f}-{1e3 * st['p90']:.0f})"
        lines.append(
            f"{name:<10}{r['device']:<8}{r['dtype']:<10}{r['tokens_per_second']:>9.0f}{spread:>22}"
            f"{r['peak_memory_gb']:>9.3f}{r['peak_rss_gb']:>8.2f}{r['first_loss']:>11.4f}"
            f"{r['last_loss']:>8.4f}"
        )
    for pair, d in (report.get("loss_difference") or {}).items():
        lines.append(
            f"loss difference {pair}: first {d['first']:+.2e}, last {d['last']:+.2e}, "
            f"max |diff| over {len(next(iter(report['backends'].values()))['losses'])} steps "
            f"{d['max_abs']:.2e}"
        )
    singles = {n: r for n, r in report["backends"].items() if r.get("processes", 1) == 1}
    if len(singles) >= 2:
        rates = {n: r["tokens_per_second"] for n, r in singles.items()}
        first = next(iter(rates))
        for name in list(rates)[1:]:
            lines.append(f"throughput {name}/{first}: {rates[name] / rates[first]:.2f}x")
    lines += world_lines(report)
    for name, r in report["backends"].items():
        if r.get("blas"):
            lines.append(f"{name} BLAS: {r['blas']}")
    return lines


def world_lines(report: dict) -> list[str]:
    """Data-parallel runs against their single-process run, and what the numbers mean here."""
    lines = []
    for name, r in report["backends"].items():
        n = r.get("processes", 1)
        if n == 1:
            continue
        single = report["backends"][r["backend"]]
        lines.append(
            f"data parallel {name}/{r['backend']}: "
            f"{r['tokens_per_second'] / single['tokens_per_second']:.2f}x tokens/s (the world's "
            f"total), all-reduce {100 * r['allreduce_share']:.1f}% of the step on rank 0 "
            "(waiting for the slower rank included)"
        )
    if len(lines):
        cpus = report["machine"]["cpus"]
        lines.append(
            f"note: all {report['world_size']} processes ran on this one machine ({cpus} CPU "
            "cores, split between them): this shows what splitting the batch and the all-reduce "
            "cost, not a speed-up; speed-ups need more machines or GPUs (README: More than one "
            "machine)"
        )
    return lines


def plot(report: dict, path: Path) -> bool:
    """Loss curves and throughput as a PNG; False (and nothing written) without matplotlib."""
    from mlxft.plotting import pyplot

    try:
        plt = pyplot()
    except UserError:  # matplotlib is not installed
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, r) in enumerate(
        report["backends"].items()
    ):  # dashed after the first: curves may coincide
        left.plot(
            range(1, len(r["losses"]) + 1),
            r["losses"],
            "-" if i == 0 else "--",
            label=f"{name} ({r['device']})",
        )
    left.set(xlabel="step", ylabel="train loss", title="Loss per step")
    left.legend()
    names = list(report["backends"])
    right.bar(
        names,
        [report["backends"][n]["tokens_per_second"] for n in names],
        color=["#4C72B0", "#DD8452"][: len(names)],
    )
    right.set(
        ylabel="trained tokens / s", title=f"Throughput (after {report['warmup']} warm-up steps)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def bench(
    config: str | None,
    backends: list[str],
    steps: int | None,
    warmup: int,
    overrides: dict | None = None,
    echo=click.echo,
    world_size: int = 1,
) -> dict:
    """Run every backend in turn and return the report (also what --json writes)."""
    from mlxft.config import build_config

    overrides = dict(overrides or {})
    cfg = build_config(config, {**overrides, "train": True})
    steps = steps or DEFAULT_STEPS
    if steps <= warmup:
        raise UserError(f"--steps ({steps}) must be larger than --warmup ({warmup})")
    if cfg.model is None or cfg.data is None:
        raise UserError(f"{config or 'bench'}: the config needs 'model' and 'data'")
    if ".cache/bench-" in cfg.model and not Path(cfg.model).exists():
        raise UserError(
            f"{cfg.model}: the benchmark model is not built yet; run: python "
            f"benchmarks/make_bench_model.py"
        )
    if world_size > 1 and cfg.batch_size % world_size:
        raise UserError(
            f"--world-size {world_size}: batch_size {cfg.batch_size} does not divide evenly over "
            f"{world_size} processes; use a batch_size that is a multiple of {world_size}"
        )
    results = {}
    for name in backends:
        echo(f"[{name}] {steps} steps ({warmup} warm-up) in a fresh process ...")
        spec = {"config": config, "overrides": overrides, "backend": name, "steps": steps}
        results[name] = summarize(run_worker(spec), warmup)
        if world_size > 1:
            echo(f"[{name}] the same steps on {world_size} processes ({LAUNCH_NAMES[name]}) ...")
            results[f"{name} x{world_size}"] = summarize(
                run_worker(spec, processes=world_size), warmup
            )
    return {
        "config": config,
        "settings": settings_of(cfg),
        "steps": steps,
        "warmup": warmup,
        "world_size": world_size,
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "backends": results,
        "loss_difference": loss_difference(results),
    }
