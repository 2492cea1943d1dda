"""Regenerate every benchmark figure and benchmarks/RESULTS.md in one command.

    python benchmarks/run_all.py            # full: ~2 h on a quiet 2-core machine (--reps 1: ~1 h)
    python benchmarks/run_all.py --quick    # a smoke pass of every suite: ~20 min there
    python benchmarks/run_all.py --only pairs,blas --steps 12 --reps 1

What it runs (each trainer in its own process, one at a time, alternating A/B order between
repetitions so drift in machine load hits both sides):

- pairs:   on identical settings (model, data, rank, targets, batch, max length, steps, lr,
           optimizer), our MLX trainer (`mlxft lora`) vs `mlx_lm lora` (same OpenBLAS, see
           mlx_lm_run.py), and our torch backend (`mlxft lora --backend torch`) vs PEFT +
           transformers Trainer (and a plain PEFT loop on the anchor setting);
- blas:    our MLX trainer with MLXFT_BLAS=reference (the wheel's BLAS) vs OpenBLAS (and, where the
           machine forces OpenBLAS's kernels with OPENBLAS_CORETYPE, with its own pick);
- compile: our MLX trainer with MLXFT_COMPILE=1 (cold kernel cache, then warm) vs eager;
- attribution: on the anchor setting, each of our CPU levers off in turn (MLXFT_MALLOC=system,
           MLXFT_CPU_KERNELS=0, MLXFT_CPU_MATMUL=mkl), and the anchors run with the same allocator
           thresholds; on
           prompt-masked rows, the output head on every position (MLXFT_HEAD_ROWS=0);
- bench:   `mlxft bench` itself: MLX vs torch backend on configs/bench_40m.yaml;
- peak:    the measured sgemm peak of MLX+OpenBLAS, torch's MKL and oneDNN (MFU: the best of them);
- profile: where an MLX step's time goes (forward / backward / attention softmax) vs torch.

Raw per-run records go to benchmarks/results.json; the tables to benchmarks/RESULTS.md.
Logs of every process: benchmarks/.cache/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CACHE,
    HERE,
    PY,
    REPO,
    Run,
    machine,
    read_jsonl,
    run_measured,
    steps_from_reports,
    tail,
)  # noqa: E402

MODEL = CACHE / "bench-40m"
DATA = CACHE / "data"
RUNS = CACHE / "runs"
QV = "self_attn.q_proj,self_attn.v_proj"
# the installed console script (what users run), else the same entry point through Python
MLXFT = (
    [Path(PY).parent / "mlxft"]
    if (Path(PY).parent / "mlxft").exists()
    else [PY, "-c", "from mlxft.cli import main; main()"]
)
LR, RANK, ALPHA = 1e-4, 8, 16.0  # scale 2 for every trainer
# --threads N: the same thread count for every BLAS / OpenMP pool in every child
THREAD_ENV: dict = {}
# OpenBLAS's own kernel choice where the machine forces one: both variables unset, in that command
# alone (every trainer runs with the machine's setting)
OWN_KERNELS = {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}


@dataclass(frozen=True)
class Setting:
    name: str
    data: str
    batch: int
    seq: int
    keys: str = ""  # "" = all linear modules of every block
    ckpt: bool = False
    mask_prompt: bool = False  # prompt/completion rows, completions trained only

    def describe(self) -> str:
        rows = {
            "raw": "raw WikiSQL rows (67-259 tok)",
            "completions": "WikiSQL prompt/completion rows, prompt masked",
            "packed512": "packed ~470-tok rows",
            "packed1024": "packed ~980-tok rows",
            "packed2048": "packed ~2000-tok rows",
        }[self.data]
        return (
            f"{rows}, batch {self.batch} x max {self.seq}, r{RANK} "
            f"{'q,v' if self.keys else 'all linear'}{', grad ckpt' if self.ckpt else ''}"
        )


SETTINGS = {
    s.name: s
    for s in [
        Setting("raw-b4", "raw", 4, 512),
        Setting("compl-b4", "completions", 4, 512, mask_prompt=True),
        Setting("p512-b4", "packed512", 4, 512),
        Setting("p512-b4-qv", "packed512", 4, 512, keys=QV),
        Setting("p512-b4-ckpt", "packed512", 4, 512, ckpt=True),
        Setting("p1024-b1", "packed1024", 1, 1024),
        Setting("p2048-b1", "packed2048", 1, 2048),
        Setting("p2048-b1-qv", "packed2048", 1, 2048, keys=QV),
        Setting("p2048-b1-ckpt", "packed2048", 1, 2048, ckpt=True),
    ]
}
# (setting, ours, anchor) in the order they run; --quick runs QUICK_PAIRS only.
PAIRS = (
    [(s, "mlxft-mlx", "mlx_lm") for s in SETTINGS]
    + [(s, "mlxft-torch", "peft-trainer") for s in SETTINGS]
    + [("raw-b4", "mlxft-torch", "peft-loop"), ("p512-b4", "mlxft-torch", "peft-loop")]
)
QUICK_PAIRS = [
    ("raw-b4", "mlxft-mlx", "mlx_lm"),
    ("p512-b4", "mlxft-mlx", "mlx_lm"),
    ("p2048-b1", "mlxft-mlx", "mlx_lm"),
    ("raw-b4", "mlxft-torch", "peft-trainer"),
    ("p512-b4", "mlxft-torch", "peft-trainer"),
    ("compl-b4", "mlxft-torch", "peft-trainer"),
]


# ------------------------------------------------------------------------------ trainers
def command(trainer: str, s: Setting, steps: int, out: Path) -> tuple:
    """(argv, metrics file) for one trainer on one setting."""
    data = DATA / s.data
    if trainer.startswith("mlxft-"):
        cmd = [
            *MLXFT,
            "lora",
            "--train",
            "--model",
            MODEL,
            "--data",
            data,
            "--backend",
            trainer.split("-")[1],
            "--batch-size",
            s.batch,
            "--max-seq-length",
            s.seq,
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
        cmd += [a for k in s.keys.split(",") if k for a in ("--lora-keys", k)]
        cmd += ["--grad-checkpoint"] if s.ckpt else []
        cmd += ["--mask-prompt"] if s.mask_prompt else []
        return cmd, out / "adapter" / "metrics.jsonl"
    if trainer == "mlx_lm":
        lora = {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0}
        if s.keys:
            lora["keys"] = s.keys.split(",")
        cfg = out / "mlx_lm.yaml"
        out.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps({"lora_parameters": lora}))  # JSON is YAML
        cmd = [
            PY,
            HERE / "mlx_lm_run.py",
            "--metrics",
            out / "metrics.jsonl",
            "--",
            "--model",
            MODEL,
            "--train",
            "--data",
            data,
            "--batch-size",
            s.batch,
            "--max-seq-length",
            s.seq,
            "--iters",
            steps,
            "--num-layers",
            -1,
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
        cmd += ["--grad-checkpoint"] if s.ckpt else []
        cmd += ["--mask-prompt"] if s.mask_prompt else []
        return cmd, out / "metrics.jsonl"
    mode = trainer.split("-")[1]
    cmd = [
        PY,
        HERE / "peft_run.py",
        "--mode",
        mode,
        "--model",
        MODEL,
        "--data",
        data,
        "--metrics",
        out / "metrics.jsonl",
        "--batch-size",
        s.batch,
        "--max-seq-length",
        s.seq,
        "--iters",
        steps,
        "--rank",
        RANK,
        "--alpha",
        ALPHA,
        "--learning-rate",
        LR,
        "--seed",
        0,
    ]
    cmd += ["--keys", ",".join(k.split(".")[-1] for k in s.keys.split(","))] if s.keys else []
    cmd += ["--grad-checkpoint"] if s.ckpt else []
    cmd += ["--mask-prompt"] if s.mask_prompt else []
    return cmd, out / "metrics.jsonl"


def parse(trainer: str, s: Setting, metrics: Path) -> tuple:
    """(steps, framework peak memory GB, extra facts) from a trainer's per-step file."""
    records = read_jsonl(metrics)
    if trainer.startswith("mlxft-"):
        train = [r for r in records if "train_loss" in r]
        return steps_from_reports(records), (train[-1]["peak_memory_gb"] if train else None), {}
    if trainer == "mlx_lm":
        steps = steps_from_reports(records)
        extra = {
            "blas": records[0].get("blas") if records else None,
            "reported_tokens_per_step": [st["tokens"] for st in steps],
        }
        # mlx_lm's mask trains one extra (padding) target per row; count real targets only.
        for st in steps:
            st["tokens"] -= s.batch
        peaks = [r["peak_memory"] for r in records if "peak_memory" in r]
        return steps, (peaks[-1] if peaks else None), extra
    steps = [
        {"tokens": r["tokens"], "seconds": r["seconds"], "loss": r["loss"]}
        for r in records
        if "step" in r
    ]
    return steps, None, {k: v for k, v in (records[0] if records else {}).items()}


def run_trainer(trainer: str, s: Setting, steps: int, tag: str, env: dict | None = None) -> Run:
    out = RUNS / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd, metrics = command(trainer, s, steps, out)
    code, wall, rss = run_measured(trainer, cmd, out / "log.txt", env={**THREAD_ENV, **(env or {})})
    parsed_steps, peak, extra = parse(trainer, s, metrics)
    extra["command"] = " ".join(str(c).replace(str(REPO) + "/", "") for c in cmd)
    if env:
        extra["env"] = env
    ok = code == 0 and len(parsed_steps) == steps
    run = Run(
        trainer, ok, wall, rss, parsed_steps, peak, extra, "" if ok else tail(out / "log.txt", 15)
    )
    status = (
        f"{run.rate(0):.0f} tok/s all steps, RSS {rss:.2f} GB, {wall:.0f}s"
        if ok
        else f"FAILED (exit {code})"
    )
    print(f"  {tag:<40} {status}", flush=True)
    return run


# ------------------------------------------------------------------------------ suites
def suite_pairs(pairs, steps: int, warmup: int, reps: int) -> list:
    results = []
    for name, ours, anchor in pairs:
        s = SETTINGS[name]
        print(f"[pair] {name}: {ours} vs {anchor} ({s.describe()})", flush=True)
        runs = {ours: [], anchor: []}
        for rep in range(reps):
            order = (ours, anchor) if rep % 2 == 0 else (anchor, ours)
            for trainer in order:
                runs[trainer].append(run_trainer(trainer, s, steps, f"{name}/{trainer}/{rep}"))
        results.append(summarize_pair(name, ours, anchor, runs, warmup))
    return results


def summarize_pair(name, ours, anchor, runs, warmup) -> dict:
    def agg(rs):
        good = [r for r in rs if r.ok]
        if not good:
            return {"ok": False, "error": rs[0].log_tail if rs else ""}
        return {
            "ok": True,
            "tokens_per_second": statistics.median(r.rate(warmup) for r in good),
            "per_run": [round(r.rate(warmup), 1) for r in good],
            "median_step_seconds": statistics.median(r.median_step(warmup) for r in good),
            "peak_memory_gb": max((r.peak_memory_gb or 0) for r in good) or None,
            "peak_rss_gb": max(r.peak_rss_gb for r in good),
            "first_loss": good[0].steps[0]["loss"],
            "last_loss": good[0].steps[-1]["loss"],
            "mean_tokens_per_step": statistics.mean(st["tokens"] for st in good[0].steps),
            "command": good[0].extra.get("command"),
            "blas": good[0].extra.get("blas"),
        }

    a, b = agg(runs[ours]), agg(runs[anchor])
    ratio = a["tokens_per_second"] / b["tokens_per_second"] if a["ok"] and b["ok"] else None
    return {
        "setting": name,
        "ours": ours,
        "anchor": anchor,
        "results": {ours: a, anchor: b},
        "ratio": ratio,
        "runs": {k: [r.to_dict(warmup) for r in v] for k, v in runs.items()},
    }


def suite_blas(steps: int, warmup: int) -> dict:
    """Before/after OpenBLAS on a short training run of our MLX trainer (and mlx_lm's, with its
    own BLAS)."""
    s = SETTINGS["raw-b4"]
    print(f"[blas] {s.describe()}, {steps} steps", flush=True)
    ref = run_trainer("mlxft-mlx", s, steps, "blas/reference", env={"MLXFT_BLAS": "reference"})
    fast = run_trainer("mlxft-mlx", s, steps, "blas/openblas")
    anchor = run_trainer(
        "mlx_lm", s, steps, "blas/mlx_lm-reference", env={"MLXFT_BLAS": "reference"}
    )
    runs = [("reference", ref), ("openblas", fast), ("mlx_lm_reference", anchor)]
    if os.environ.get(
        "OPENBLAS_CORETYPE"
    ):  # the machine forces OpenBLAS's kernels: also run with its own pick
        runs.append(
            (
                "openblas_own_kernels",
                run_trainer("mlxft-mlx", s, steps, "blas/openblas-own-kernels", env=OWN_KERNELS),
            )
        )
    out = {"setting": s.name, "steps": steps, "warmup": warmup}
    for key, run in runs:
        out[key] = {
            "ok": run.ok,
            "tokens_per_second": run.rate(warmup) if run.ok else None,
            "command": run.extra["command"],
            "env": run.extra.get("env"),
        }
    if ref.ok and fast.ok:
        out["speedup"] = fast.rate(warmup) / ref.rate(warmup)
    return out


def suite_compile(names, steps: int, warmup: int) -> list:
    """MLXFT_COMPILE=1 with a cold kernel cache (fresh TMPDIR), then warm, vs the default (eager
    on CPU)."""
    out = []
    for name in names:
        s = SETTINGS[name]
        print(f"[compile] {s.describe()}, {steps} steps", flush=True)
        tmp = RUNS / "compile" / f"tmpdir-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        env = {"MLXFT_COMPILE": "1", "TMPDIR": str(tmp)}
        cold = run_trainer("mlxft-mlx", s, steps, f"compile/{name}/cold", env=env)
        warm = run_trainer("mlxft-mlx", s, steps, f"compile/{name}/warm", env=env)
        eager = run_trainer("mlxft-mlx", s, steps, f"compile/{name}/eager")
        row = {"setting": name, "steps": steps, "warmup": warmup, "command": eager.extra["command"]}
        for key, run in (("compiled_cold", cold), ("compiled_warm", warm), ("eager", eager)):
            row[key] = {
                "ok": run.ok,
                "tokens_per_second": run.rate(warmup) if run.ok else None,
                "all_steps_tokens_per_second": run.rate(0) if run.ok else None,
                "first_step_seconds": run.steps[0]["seconds"] if run.steps else None,
                "wall_seconds": run.wall_seconds,
            }
        out.append(row)
    return out


GLIBC_KEEP = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
ATTRIBUTION = (  # (setting, trainer, label, env): where the gains come from
    ("p512-b4", "mlxft-mlx", "mlxft (MLX), default", {}),
    ("p512-b4", "mlxft-mlx", "mlxft (MLX), allocator untouched", {"MLXFT_MALLOC": "system"}),
    (
        "p512-b4",
        "mlxft-mlx",
        "mlxft (MLX), CPU loss/attention paths off",
        {"MLXFT_CPU_KERNELS": "0"},
    ),
    (
        "p512-b4",
        "mlxft-mlx",
        "mlxft (MLX), both off",
        {"MLXFT_MALLOC": "system", "MLXFT_CPU_KERNELS": "0"},
    ),
    ("p512-b4", "mlx_lm", "mlx_lm lora, as shipped", {}),
    ("p512-b4", "mlx_lm", "mlx_lm lora + our allocator thresholds (glibc env)", GLIBC_KEEP),
    ("p512-b4", "mlxft-torch", "mlxft (torch), default", {}),
    ("p512-b4", "mlxft-torch", "mlxft (torch), allocator untouched", {"MLXFT_MALLOC": "system"}),
    (
        "p512-b4",
        "mlxft-torch",
        "mlxft (torch), torch's own matmuls (MKL)",
        {"MLXFT_CPU_MATMUL": "mkl"},
    ),
    (
        "p512-b4",
        "mlxft-torch",
        "mlxft (torch), both off",
        {"MLXFT_CPU_MATMUL": "mkl", "MLXFT_MALLOC": "system"},
    ),
    ("p512-b4", "peft-trainer", "PEFT + HF Trainer, as shipped", {}),
    (
        "p512-b4",
        "peft-trainer",
        "PEFT + HF Trainer + our allocator thresholds (glibc env)",
        GLIBC_KEEP,
    ),
    # prompt masked: the output head on trained positions only, and on every position
    ("compl-b4", "mlxft-mlx", "mlxft (MLX), default", {}),
    ("compl-b4", "mlxft-mlx", "mlxft (MLX), head on every position", {"MLXFT_HEAD_ROWS": "0"}),
    ("compl-b4", "mlx_lm", "mlx_lm lora, as shipped", {}),
    ("compl-b4", "mlxft-torch", "mlxft (torch), default", {}),
    ("compl-b4", "mlxft-torch", "mlxft (torch), head on every position", {"MLXFT_HEAD_ROWS": "0"}),
    (
        "compl-b4",
        "mlxft-torch",
        "mlxft (torch), head on every position, allocator untouched",
        {"MLXFT_HEAD_ROWS": "0", "MLXFT_MALLOC": "system"},
    ),
    ("compl-b4", "peft-trainer", "PEFT + HF Trainer, as shipped", {}),
)


def suite_attribution(steps: int, warmup: int) -> dict:
    """Each lever of ours switched off in turn, and the anchors given the same allocator
    thresholds (glibc's MALLOC_*_ environment variables): which part of a ratio is the
    trainer's own work and which is the allocator; on prompt-masked rows, what running the
    output head on trained positions only is worth."""
    print(f"[attribution] {steps} steps", flush=True)
    rows = []
    for i, (name, trainer, label, env) in enumerate(ATTRIBUTION):
        s = SETTINGS[name]
        run = run_trainer(trainer, s, steps, f"attribution/{name}/{i}-{trainer}", env=env or None)
        rows.append(
            {
                "setting": name,
                "trainer": trainer,
                "label": label,
                "env": env,
                "ok": run.ok,
                "tokens_per_second": run.rate(warmup) if run.ok else None,
                "peak_memory_gb": run.peak_memory_gb,
                "peak_rss_gb": run.peak_rss_gb,
                "command": run.extra["command"],
            }
        )
    return {"steps": steps, "warmup": warmup, "rows": rows}


def suite_bench(steps: int, warmup: int) -> dict:
    """`mlxft bench` itself (MLX vs torch backend, identical batches) on configs/bench_40m.yaml."""
    print(f"[bench] mlxft bench --config configs/bench_40m.yaml, {steps} steps", flush=True)
    out = RUNS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        *MLXFT,
        "bench",
        "--config",
        "configs/bench_40m.yaml",
        "--steps",
        steps,
        "--warmup",
        warmup,
        "--json",
        out / "bench.json",
    ]
    code, wall, _ = run_measured("bench", cmd, out / "log.txt", env=THREAD_ENV)
    if code != 0:
        return {"error": tail(out / "log.txt", 10)}
    report = json.loads((out / "bench.json").read_text())
    report["command"] = " ".join(str(c).replace(str(REPO) + "/", "") for c in cmd)
    return report


def suite_peak() -> dict:
    print("[peak] sgemm", flush=True)
    out = {}
    runs = [
        ("mlx", ["mlx"], {}),
        ("torch", ["torch"], {}),
        ("mlx_reference", ["mlx", "1024"], {"MLXFT_BLAS": "reference"}),
    ]
    if os.environ.get("OPENBLAS_CORETYPE"):
        runs.append(("mlx_own_kernels", ["mlx"], OWN_KERNELS))
    for key, args, extra in runs:
        env = {k: v for k, v in {**os.environ, **THREAD_ENV, **extra}.items() if v is not None}
        proc = subprocess.run(
            [str(PY), str(HERE / "peak.py"), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
        )
        out[key] = (
            json.loads(proc.stdout.strip().splitlines()[-1])
            if proc.returncode == 0
            else {"error": proc.stderr[-500:]}
        )
    return out


def suite_profile(names, repeats: int) -> dict:
    print("[profile]", flush=True)
    out = {}
    for name in names:
        s = SETTINGS[name]
        for fw in ("mlx", "torch"):
            cmd = [
                PY,
                HERE / "profile_step.py",
                fw,
                "--model",
                MODEL,
                "--data",
                DATA / s.data,
                "--batch",
                str(s.batch),
                "--seq",
                str(s.seq),
                "--repeats",
                str(repeats),
            ]
            proc = subprocess.run(
                [str(c) for c in cmd],
                capture_output=True,
                text=True,
                cwd=REPO,
                env={**os.environ, **THREAD_ENV},
            )
            lines = proc.stdout.strip().splitlines()
            out[f"{name}/{fw}"] = (
                json.loads(lines[-1])
                if proc.returncode == 0 and lines
                else {"error": proc.stderr[-800:]}
            )
            print(f"  {name}/{fw}: {out[f'{name}/{fw}']}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer steps, one repetition, a subset of settings"
    )
    p.add_argument(
        "--only",
        default="peak,pairs,attribution,blas,compile,bench,profile",
        help="comma-separated suites",
    )
    p.add_argument("--steps", type=int, help="steps per run (default: 16, quick 5)")
    p.add_argument(
        "--warmup", type=int, help="leading steps left out of rates (default: 4, quick 2)"
    )
    p.add_argument(
        "--reps", type=int, help="alternating repetitions per pair (default: 2, quick 1)"
    )
    p.add_argument("--pairs", help="only these settings, e.g. raw-b4,p2048-b1")
    p.add_argument(
        "--ours",
        help="only pairs of these trainers of ours, e.g. mlxft-torch (the other pairs' "
        "records in --out are kept)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="pin every BLAS/OpenMP pool to N threads (default: the "
        "libraries' own choice = all cores). 1 keeps figures meaningful on a busy machine: "
        "spinning thread pools collapse when another process holds a core",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results.json",
        help="raw records (merged into if present)",
    )
    p.add_argument(
        "--md", type=Path, default=HERE / "RESULTS.md", help="the tables are written here"
    )
    args = p.parse_args(argv)
    steps = args.steps or (5 if args.quick else 16)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 2)
    suites = args.only.split(",")
    if args.threads:
        n = str(args.threads)
        THREAD_ENV.update(OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
    if not (MODEL / "model.safetensors").exists():
        subprocess.run([PY, str(HERE / "make_bench_model.py")], check=True)
    pairs = QUICK_PAIRS if args.quick else PAIRS
    if args.pairs:
        pairs = [t for t in PAIRS if t[0] in args.pairs.split(",")]
    if args.ours:
        pairs = [t for t in pairs if t[1] in args.ours.split(",")]
    tic = time.time()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = {
        **previous,
        "machine_before": machine(),
        "mode": "quick" if args.quick else "full",
        "steps": steps,
        "warmup": warmup,
        "reps": reps,
        "threads": args.threads or "default (all cores)",
        "model": str(MODEL.relative_to(REPO)),
        "settings": {k: {**vars(v), "describe": v.describe()} for k, v in SETTINGS.items()},
        "lr": LR,
        "rank": RANK,
        "alpha": ALPHA,
    }
    if "peak" in suites:
        results["peak"] = suite_peak()
    if "pairs" in suites:
        fresh = suite_pairs(pairs, steps, warmup, reps)
        key = lambda p: (p["setting"], p["ours"], p["anchor"])  # noqa: E731
        redone = {key(p) for p in fresh}
        results["pairs"] = [p for p in previous.get("pairs", []) if key(p) not in redone] + fresh
        results["pairs_meta"] = {
            "mode": results["mode"],
            "steps": steps,
            "warmup": warmup,
            "reps": reps,
            "threads": results["threads"],
        }
    if "blas" in suites:
        results["blas"] = suite_blas(max(3, steps // 3), 1)
    if "compile" in suites:
        results["compile"] = suite_compile(
            ["raw-b4"] if args.quick else ["raw-b4", "p512-b4"], steps, warmup
        )
    if "attribution" in suites:
        results["attribution"] = suite_attribution(steps, warmup)
    if "bench" in suites:
        results["bench"] = suite_bench(steps, warmup)
    if "profile" in suites:
        results["profile"] = suite_profile(["p512-b4", "p2048-b1"], 2 if args.quick else 5)
    results["machine_after"] = machine()
    results["suites_run"] = {
        **previous.get("suites_run", {}),
        **{k: results["machine_after"]["date"] for k in suites},
    }
    results["elapsed_seconds"] = time.time() - tic
    args.out.write_text(json.dumps(results, indent=1))
    from report import write_results_md

    write_results_md(results, args.md)
    print(f"Wrote {args.out} and {args.md} in {results['elapsed_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
