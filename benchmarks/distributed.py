"""Data parallelism on one machine: 1 process against N, per backend, same global batches.

    python benchmarks/distributed.py [--processes 2] [--steps 12] [--warmup 3]
                                     [--threads 1] [--model DIR] [--backends mlx,torch]

Runs `mlxft bench --world-size N` (`mlxft.bench.compare.bench`): each backend trains the same
steps in a fresh process, then on N processes under its own launcher (`mlx.launch --backend
ring` over loopback, `torchrun --standalone` with gloo).  Reported per run: tokens/s (the
world's trained tokens per second of rank 0's step time, after warm-up), the median step, the
share of the step rank 0 spends in the all-reduce (waiting for the slower rank included) and
the largest per-step loss gap to one process.  `--threads` pins OpenMP/OpenBLAS threads per
process for every run (default: the cores split between the ranks, all of them for one
process).  The ranks share this machine's cores, so the ratio is the cost of splitting a batch,
not the speed-up of more machines.  Prints a Markdown table with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, help="OpenMP/OpenBLAS threads per process, every run")
    ap.add_argument("--model", default=str(REPO / "examples" / "models" / "stories260K"))
    ap.add_argument("--data", default=str(REPO / "examples" / "data" / "wikisql"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--backends", default="mlx,torch")
    args = ap.parse_args()
    if args.threads:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(args.threads)

    from mlxft.bench.compare import bench, parse_backends

    config = {
        "model": args.model,
        "data": args.data,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "num_layers": -1,
        "learning_rate": 1e-4,
        "lora_parameters": {"rank": 8},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(config))
        report = bench(
            str(path),
            parse_backends(args.backends),
            args.steps,
            args.warmup,
            world_size=args.processes,
            echo=lambda line: print(line, file=sys.stderr),
        )
    load = os.getloadavg()
    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the end; model "
        f"{Path(args.model).name}, batch {args.batch_size} (global) x max {args.max_seq_length} "
        f"tokens, LoRA r8 on every linear, {args.steps} steps, first {args.warmup} left out\n"
    )
    print(
        "| backend | processes | threads/process | tok/s | step ms (median) | all-reduce share "
        "| max loss gap to 1 process |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in report["backends"].values():
        single = report["backends"][r["backend"]]
        gap = max(abs(a - b) for a, b in zip(r["losses"], single["losses"]))
        threads = os.environ.get("OMP_NUM_THREADS") or (
            max(1, (os.cpu_count() or 1) // r["processes"])
            if r["processes"] > 1
            else os.cpu_count()
        )
        print(
            f"| {r['backend']} | {r['processes']} | {threads} | {r['tokens_per_second']:.0f} | "
            f"{1e3 * r['step_time']['median']:.0f} | {100 * r['allreduce_share']:.1f}% | "
            f"{gap:.1e} |"
        )


if __name__ == "__main__":
    main()
