"""DPO speed and memory: mlxft (MLX and torch backends) against mlx-lm-lora's DPO trainer.

    python benchmarks/make_bench_model.py                    # the 40M bench model (once)
    python benchmarks/dpo_bench.py --setup                    # mlx-lm-lora in its own venv (once)
    python benchmarks/dpo_bench.py [--steps 16 --warmup 4] [--json OUT.json]

Same pairs (the shipped WikiSQL preference pairs, examples/data/wikisql_dpo), same batches in
the same order (our length-sorted, seeded pair batches; mlx-lm-lora's loop is handed them by
benchmarks/mlx_lm_lora_run.py), rendered through the bench tokenizer's chat template by every
trainer, LoRA r8 / alpha 16 on every linear of every block, Adam 1e-4, beta 0.1, batch 4 pairs.
Each trainer runs as its own process (benchmarks/common.run_measured: peak RSS from the kernel).
Rates: answer tokens (chosen + rejected, the positions the DPO loss reads; every trainer counts
them the same way) per second of step time, after `--warmup` steps.

mlx-lm-lora pins its own dependency set, so it lives in a separate virtual environment
(benchmarks/.cache/mlx-lm-lora-venv, made by --setup with the same constraints as ours when
MLXFT_CONSTRAINTS names a pip constraints file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    CACHE,
    HERE,
    PY,
    REPO,
    Run,
    fmt_ratio,
    machine,
    read_jsonl,
    run_measured,
    steps_from_reports,
    tail,
)

MODEL = CACHE / "bench-40m"
DATA = CACHE / "data" / "dpo"
RUNS = CACHE / "runs" / "dpo"
VENV = CACHE / "mlx-lm-lora-venv"
PAIRS = REPO / "examples" / "data" / "wikisql_dpo"
LR, RANK, ALPHA, BETA, BATCH, SEQ = 1e-4, 8, 16.0, 0.1, 4, 512
MLXFT = [PY, "-c", "from mlxft.cli import main; main()"]


def setup_venv() -> None:
    """mlx-lm-lora, MLX's CPU wheel and OpenBLAS in benchmarks/.cache/mlx-lm-lora-venv."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    constraints = os.environ.get("MLXFT_CONSTRAINTS")
    extra = ["-c", constraints] if constraints else []
    packages = ["mlx-lm-lora", "mlx[cpu]" if sys.platform == "linux" else "mlx"]
    if sys.platform == "linux":
        packages.append("ngsolve-openblas")
    subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", *extra, *packages], check=True
    )


def write_data(pairs: int) -> Path:
    """The first `pairs` shipped WikiSQL pairs (train) and 4 more (valid)."""
    DATA.mkdir(parents=True, exist_ok=True)
    lines = (PAIRS / "train.jsonl").read_text().splitlines()
    (DATA / "train.jsonl").write_text("\n".join(lines[:pairs]) + "\n")
    (DATA / "valid.jsonl").write_text("\n".join(lines[pairs : pairs + 4]) + "\n")
    return DATA


def command(trainer: str, steps: int, out: Path, lora_python: Path) -> tuple:
    if trainer.startswith("mlxft-"):
        cmd = [
            *MLXFT,
            "lora",
            "--train",
            "--train-mode",
            "dpo",
            "--beta",
            BETA,
            "--model",
            MODEL,
            "--data",
            DATA,
            "--backend",
            trainer.split("-")[1],
            "--batch-size",
            BATCH,
            "--max-seq-length",
            SEQ,
            "--iters",
            steps,
            "--num-layers",
            -1,
            "--rank",
            RANK,
            "--alpha",
            ALPHA,
            "--learning-rate",
            LR,
            "--optimizer",
            "adam",
            "--steps-per-report",
            1,
            "--steps-per-eval",
            100000,
            "--val-batches",
            1,
            "--save-every",
            100000,
            "--adapter-path",
            out / "adapter",
            "--seed",
            0,
        ]
        return cmd, out / "adapter" / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "mlx_lm_lora.yaml"
    cfg.write_text(
        json.dumps({"lora_parameters": {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0}})
    )
    cmd = [
        lora_python,
        HERE / "mlx_lm_lora_run.py",
        "--metrics",
        out / "metrics.jsonl",
        "--",
        "--model",
        MODEL,
        "--train",
        "--train-mode",
        "dpo",
        "--beta",
        BETA,
        "--data",
        DATA,
        "--batch-size",
        BATCH,
        "--max-seq-length",
        SEQ,
        "--iters",
        steps,
        "--num-layers",
        8,
        "--learning-rate",
        LR,
        "--optimizer",
        "adam",
        "--steps-per-report",
        1,
        "--steps-per-eval",
        100000,
        "--val-batches",
        1,
        "--save-every",
        100000,
        "--adapter-path",
        out / "adapter",
        "--seed",
        0,
        "-c",
        cfg,
    ]
    return cmd, out / "metrics.jsonl"


def parse(trainer: str, metrics: Path) -> tuple:
    """(per-step records, framework peak GB) from the trainer's JSON lines."""
    records = read_jsonl(metrics)
    if trainer.startswith("mlxft-"):
        train = [r for r in records if "train_loss" in r]
        return steps_from_reports(records), (train[-1]["peak_memory_gb"] if train else None)
    peaks = [r["peak_memory"] for r in records if "peak_memory" in r]
    return steps_from_reports(records), (peaks[-1] if peaks else None)


def run(trainer: str, steps: int, lora_python: Path) -> Run:
    """One trainer process.  `mlx-lm-lora-eager`: its trainer with MLX_DISABLE_COMPILE=1 (MLX's own
    switch): on a CPU each new batch shape costs its compiled step a kernel build, and length-sorted
    batches have many shapes, which is why our trainer runs eagerly there."""
    out = RUNS / trainer
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd, metrics = command(trainer, steps, out, lora_python)
    env = {"MLX_DISABLE_COMPILE": "1"} if trainer.endswith("-eager") else None
    code, wall, rss = run_measured(trainer, cmd, out / "log.txt", env=env)
    parsed, peak = parse(trainer, metrics)
    ok = code == 0 and len(parsed) == steps
    result = Run(
        trainer,
        ok,
        wall,
        rss,
        parsed,
        peak,
        {
            "command": ("MLX_DISABLE_COMPILE=1 " if env else "")
            + " ".join(str(c).replace(str(REPO) + "/", "") for c in cmd)
        },
        "" if ok else tail(out / "log.txt", 15),
    )
    print(
        f"  {trainer:<14} "
        + (
            f"{result.rate(0):.0f} tok/s all steps, RSS {rss:.2f} GB, {wall:.0f}s"
            if ok
            else f"FAILED (exit {code})\n{result.log_tail}"
        ),
        flush=True,
    )
    return result


def markdown(report: dict) -> list:
    """The RESULTS.md table for a report (tok/s after warm-up; peaks: framework and kernel RSS)."""
    runs, warmup = report["runs"], report["warmup"]
    anchors = [r for k, r in runs.items() if k.startswith("mlx-lm-lora") and r["ok"]]
    best = max((r["tokens_per_second"] for r in anchors), default=0)
    lines = [
        "| trainer | tok/s (answer tokens) | vs mlx-lm-lora (best mode) | step s median | "
        "peak mem GB (framework) | peak RSS GB | loss first → last |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        steps = r["steps"]
        loss = f"{steps[0]['loss']:.4f} → {steps[-1]['loss']:.4f}" if steps else "–"
        ratio = fmt_ratio(r["tokens_per_second"], best) if best and r["ok"] else "n/a"
        lines.append(
            f"| {name} | {r['tokens_per_second']:.0f} | {ratio} | {r['median_step_seconds']:.2f} | "
            f"{(r['peak_memory_gb'] or 0):.2f} | {r['peak_rss_gb']:.2f} | {loss} |"
        )
    return lines + [
        "",
        f"Steps {report['steps']} (first {warmup} left out of the rates), load average "
        f"{report['machine'].get('load_average')}, {report['machine'].get('cpu')}.",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the mlx-lm-lora venv and exit")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--trainers", default="mlxft-mlx,mlxft-torch,mlx-lm-lora-eager,mlx-lm-lora")
    parser.add_argument("--mlx-lm-lora-python", type=Path, default=VENV / "bin" / "python")
    parser.add_argument("--json", type=Path, default=HERE / "dpo_results.json")
    args = parser.parse_args(argv)
    if args.setup:
        setup_venv()
        return 0
    if not (MODEL / "config.json").is_file():
        print(
            f"no bench model at {MODEL}: run python benchmarks/make_bench_model.py first",
            file=sys.stderr,
        )
        return 2
    write_data(args.steps * BATCH)
    runs = {}
    for trainer in args.trainers.split(","):
        if trainer.startswith("mlx-lm-lora") and not args.mlx_lm_lora_python.exists():
            print(
                f"  mlx-lm-lora: no venv at {args.mlx_lm_lora_python}; run with --setup first",
                file=sys.stderr,
            )
            continue
        runs[trainer] = run(trainer, args.steps, args.mlx_lm_lora_python)
    anchors = [r for k, r in runs.items() if k.startswith("mlx-lm-lora") and r.ok]
    base = max(anchors, key=lambda r: r.rate(args.warmup)) if anchors else None  # its faster mode
    report = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "steps": args.steps,
        "warmup": args.warmup,
        "settings": {
            "batch_pairs": BATCH,
            "max_seq_length": SEQ,
            "rank": RANK,
            "alpha": ALPHA,
            "beta": BETA,
            "lr": LR,
        },
        "runs": {k: r.to_dict(args.warmup) for k, r in runs.items()},
    }
    print(
        f"{'trainer':<14} {'tok/s':>8} {'vs mlx-lm-lora':>15} {'peak RSS GB':>12} "
        f"{'framework peak GB':>18}"
    )
    for name, r in runs.items():
        ratio = (
            fmt_ratio(r.rate(args.warmup), base.rate(args.warmup))
            if base and base.ok and r.ok
            else "n/a"
        )
        print(
            f"{name:<14} {r.rate(args.warmup):>8.0f} {ratio:>15} {r.peak_rss_gb:>12.2f} "
            f"{(r.peak_memory_gb or 0):>18.2f}"
        )
    args.json.write_text(json.dumps(report, indent=1))
    print("\n" + "\n".join(markdown(report)))
    return 0 if all(r.ok for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
