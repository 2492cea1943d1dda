"""Peak memory of QLoRA (4/8-bit base) against LoRA on a full-precision base, MLX backend.

    python benchmarks/make_bench_model.py        # once: .cache/bench-40m + data
    python benchmarks/qlora_memory.py [--steps 5] [--seq 256] [--batch 2]

Each variant trains `--steps` steps of `--batch` x `--seq` tokens (packed WikiSQL rows cut to
`--seq`) in a fresh process, so one variant's allocations never count for another.  Reported:
MLX's peak allocator memory over the steps (weights included: the model is loaded before the
counter is reset, and the weights stay resident), the process's peak RSS, median step time and
the first/last loss.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VARIANTS = {  # name -> config overrides
    "LoRA fp32": {"dtype": "float32"},
    "LoRA bf16": {"dtype": "bfloat16"},
    "QLoRA 8-bit (g32)": {"dtype": "float32", "quantize": 8, "q_group_size": 32},
    "QLoRA 4-bit (g32)": {"dtype": "float32", "quantize": 4, "q_group_size": 32},
    "QLoRA 4-bit (g64)": {"dtype": "float32", "quantize": 4, "q_group_size": 64},
    "QDoRA 4-bit (g32)": {
        "dtype": "float32",
        "quantize": 4,
        "q_group_size": 32,
        "fine_tune_type": "dora",
    },
    "full fp32 (reference)": {"dtype": "float32", "fine_tune_type": "full"},
}


def run_one(name: str, args) -> dict:
    """In this process: load, adapt, train `args.steps` steps; return the measurements."""
    import mlx.core as mx

    import mlxft  # noqa: F401
    from mlxft.config import build_config
    from mlxft.data import epoch_batches
    from mlxft.training.session import Session

    with tempfile.TemporaryDirectory() as tmp:
        values = dict(
            model=str(args.model),
            data=str(args.data),
            adapter_path=tmp,
            train=True,
            iters=args.steps,
            batch_size=args.batch,
            max_seq_length=args.seq,
            num_layers=-1,
            learning_rate=1e-4,
            val_batches=1,
            seed=0,
            **VARIANTS[name],
        )
        cfg = build_config(overrides=values, lora_overrides={"rank": 8})
        session = Session(cfg, reporter_quiet=True)
        backend = session.backend
        trainable, total = backend.parameter_counts()
        backend.setup_training(cfg)
        batches = epoch_batches(
            session.splits["train"], args.batch, seed=0, epoch=0, pad_id=session.pad_id
        )
        batches = sorted(batches, key=lambda b: -b.inputs.shape[1])[
            : args.steps
        ]  # the longest: full --seq
        mx.synchronize()
        weights_gb = mx.get_active_memory() / 1e9
        backend.reset_peak_memory()
        times, losses = [], []
        for batch in batches:
            tic = time.perf_counter()
            loss, tokens = backend.train_step([batch], cfg.learning_rate)[:2]
            times.append(time.perf_counter() - tic)
            losses.append(loss / tokens)
        return {
            "variant": name,
            "shape": list(batches[0].inputs.shape),
            "trainable_m": trainable / 1e6,
            "total_m": total / 1e6,
            "weights_gb": weights_gb,
            "peak_gb": backend.peak_memory_gb(),
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "step_s": sorted(times)[len(times) // 2],
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(HERE / ".cache" / "bench-40m"))
    parser.add_argument("--data", default=str(HERE / ".cache" / "data" / "packed512"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--only", help="run this one variant in-process and print its JSON (used internally)"
    )
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return 0
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"{args.model}: no model; run python benchmarks/make_bench_model.py first")
    rows = []
    for name in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--only",
            name,
            "--model",
            args.model,
            "--data",
            args.data,
            "--steps",
            str(args.steps),
            "--seq",
            str(args.seq),
            "--batch",
            str(args.batch),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_gb"]
    print(
        f"MLX {__import__('mlx.core').core.default_device()}, batch {args.batch} x seq {args.seq}, "
        f"{args.steps} steps, rank 8 on all linears of all blocks\n"
    )
    print(
        "| variant | trainable | weights resident | peak (MLX) | vs LoRA fp32 | peak RSS | step "
        "(median) "
        "| loss first -> last |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['trainable_m']:.2f}M of {r['total_m']:.1f}M | "
            f"{r['weights_gb']:.3f} GB "
            f"| {r['peak_gb']:.3f} GB | {r['peak_gb'] / base:.2f}x | {r['rss_gb']:.2f} GB | "
            f"{r['step_s']:.2f} s "
            f"| {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
