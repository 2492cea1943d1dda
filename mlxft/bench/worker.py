"""One backend's share of `mlxft bench`, run in a fresh process:

    python -m mlxft.bench.worker SPEC.json OUT.json

A fresh process per backend keeps one framework's allocator caches, threads and peak RSS out of
the other's figures.  The work is the real trainer's: `mlxft.training.session.Session` loads the
model,
data and adapters; the steps are the trainer's own (`Session.steps`: its batch stream, the
schedule's learning rate, the backend's `train_step`), so both backends see identical
batches from identical LoRA weights.  Validation and file writing are left out: only steps
are timed.

Under `mlx.launch` or `torchrun` (`mlxft bench --world-size N`) every rank runs this worker on
its share of each batch; rank 0 writes the result: its step times, the world's token counts,
and the seconds its steps spent in the all-reduce.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import mlxft  # noqa: F401  (loads OpenBLAS before anything imports mlx.core)
from mlxft.errors import UserError


def peak_rss_gb() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def _versions(backend: str) -> dict:
    out = {"python": platform.python_version(), "mlxft": mlxft.__version__}
    if backend == "mlx":
        import mlx.core as mx
        import mlx_lm

        out.update(mlx=mx.__version__, mlx_lm=mlx_lm.__version__)
    else:
        import torch
        import transformers

        out.update(
            torch=torch.__version__,
            transformers=transformers.__version__,
            torch_threads=torch.get_num_threads(),
        )
    return out


def run(spec: dict) -> dict:
    """Load through `Session`, then time `steps` optimizer steps of `spec['backend']`."""
    from mlxft.config import build_config
    from mlxft.training.checkpoint import Position
    from mlxft.training.session import Session
    from mlxft.training.world import detect

    overrides = dict(spec.get("overrides") or {})
    with tempfile.TemporaryDirectory(prefix="mlxft-bench-") as scratch:
        overrides.update(
            backend=spec["backend"],
            train=True,
            test=False,
            iters=spec["steps"],
            adapter_path=str(Path(scratch) / "adapter"),
            resume_adapter_file=None,
        )
        cfg = build_config(spec.get("config"), overrides)
        world = detect(cfg)  # under mlx.launch / torchrun: this rank's place
        tic = time.perf_counter()
        session = Session(cfg, reporter_quiet=True, world=world)
        load_seconds = time.perf_counter() - tic
        backend = session.backend
        backend.setup_training(cfg)
        backend.reset_peak_memory()
        steps = {"seconds": [], "comm_seconds": [], "loss": [], "tokens": [], "positions": []}
        for step in session.steps(Position(), cfg.iters):
            steps["seconds"].append(step.seconds)
            steps["comm_seconds"].append(step.comm_seconds)
            steps["loss"].append(step.loss)
            steps["tokens"].append(int(step.tokens))
            steps["positions"].append(int(step.positions))
        trainable, total = backend.parameter_counts()
        result = {
            "backend": backend.name,
            "device": backend.device,
            "dtype": backend.dtype,
            "load_seconds": load_seconds,
            "peak_memory_gb": backend.peak_memory_gb(),
            "peak_rss_gb": peak_rss_gb(),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "num_blocks": backend.num_blocks(),
            "processes": world.size,
            "is_main": world.is_main,
            "versions": _versions(backend.name),
            **steps,
        }
        if backend.name == "mlx" and backend.device == "cpu":
            from mlxft.cpu import blas

            result["blas"] = blas.status()
        if not all(math.isfinite(x) for x in steps["loss"]):
            result["warning"] = "non-finite loss"
        return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = run(spec)
        code = 0
    except UserError as err:
        result, code = {"error": str(err)}, 2
    except Exception as err:  # a crash in one backend must still leave a readable record
        traceback.print_exc()
        result, code = {"error": f"{type(err).__name__}: {err}"}, 1
    if result.get("is_main", True):  # in a data-parallel run rank 0 reports (sums are global)
        out_path.write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
