"""Shared pieces of the benchmark scripts: measured subprocesses, per-step records, machine facts.

Every trainer runs as its own process, started here, and is measured the same way:
- per-step (trained tokens, seconds) pairs come from the trainer's own per-step report
  (our metrics.jsonl; mlx_lm's and the PEFT runner's JSON lines), so warm-up steps can be
  left out of steady-state rates;
- peak RSS comes from the kernel for that one child (`os.wait4`, through a small launcher so
  the caller's own peak is not counted), identical for every trainer.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
PY = sys.executable


@dataclass
class Run:
    """One trainer process: what it reported and how the kernel saw it."""

    name: str
    ok: bool
    wall_seconds: float
    peak_rss_gb: float
    steps: list = field(default_factory=list)  # [{"tokens": int, "seconds": float, "loss": float}]
    peak_memory_gb: float | None = None  # the framework's own accounting, if any
    extra: dict = field(default_factory=dict)
    log_tail: str = ""

    def rate(self, warmup: int) -> float:
        """Trained tokens per second of step time after `warmup` steps."""
        steady = self.steps[warmup:] or self.steps
        seconds = sum(s["seconds"] for s in steady)
        return sum(s["tokens"] for s in steady) / seconds if seconds else 0.0

    def median_step(self, warmup: int) -> float:
        steady = self.steps[warmup:] or self.steps
        return statistics.median(s["seconds"] for s in steady) if steady else 0.0

    def to_dict(self, warmup: int) -> dict:
        out = asdict(self)
        out.update(
            tokens_per_second=self.rate(warmup), median_step_seconds=self.median_step(warmup)
        )
        return out


# Linux starts a child's ru_maxrss at its parent's high-water mark (exec records the old address
# space's peak), so every measured command is started by this small launcher: its few MB, not the
# caller's (a pytest process or a benchmark that loaded models), are the floor.
_LAUNCHER = """
import json, os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump([usage.ru_utime + usage.ru_stime, usage.ru_maxrss], out)
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


@dataclass
class Measured:
    """One command as the kernel saw it: exit status (negative: killed by that signal), wall
    seconds, CPU seconds and peak resident bytes of that command alone."""

    status: int
    seconds: float
    cpu_seconds: float
    peak_bytes: int


def measure(cmd: list, stdout, stderr, env: dict, cwd=None, timeout: float = 3600) -> Measured:
    """Run `cmd` through the launcher in its own session (a timeout kills the whole group)."""
    usage_file = Path(stdout.name).with_name(Path(stdout.name).name + ".usage.json")
    usage_file.unlink(missing_ok=True)
    launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(usage_file)]
    tic = time.perf_counter()
    proc = subprocess.Popen(
        launcher + [str(c) for c in cmd],
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        status = proc.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - tic
    cpu, maxrss = json.loads(usage_file.read_text()) if usage_file.exists() else (0.0, 0)
    usage_file.unlink(missing_ok=True)
    peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux
    return Measured(status, seconds, cpu, peak)


def run_measured(
    name: str, cmd: list, log: Path, env: dict | None = None, timeout: float = 3600
) -> tuple:
    """Run `cmd`, output to `log`; (exit status, wall seconds, peak RSS GB of that child alone).
    `env` adds to this process's environment; a None value removes that variable."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset in this command
    with open(log, "w") as out:
        out.write("$ " + " ".join(map(str, cmd)) + "\n")
        out.flush()
        run = measure(cmd, out, subprocess.STDOUT, full_env, cwd=REPO, timeout=timeout)
    return run.status, run.seconds, run.peak_bytes / 1e9


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_from_reports(records: list, loss_key: str = "train_loss") -> list:
    """Per-step {tokens, seconds, loss} from per-step report lines that carry cumulative
    `trained_tokens` and the step's `tokens_per_second` (our metrics.jsonl; mlx_lm's callback)."""
    steps, before = [], 0
    for r in records:
        if loss_key not in r or not r.get("tokens_per_second"):
            continue
        tokens = r["trained_tokens"] - before
        before = r["trained_tokens"]
        steps.append(
            {"tokens": tokens, "seconds": tokens / r["tokens_per_second"], "loss": r[loss_key]}
        )
    return steps


# ---------------------------------------------------------------------------------- machine
def _cmd(args: list) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or _cmd(["sysctl", "-n", "machdep.cpu.brand_string"]) or "unknown"


def ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict:
    """Library versions, read from package metadata (nothing imported, no BLAS side effects)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "mlx",
        "mlx-lm",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "ngsolve-openblas",
        "numpy",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "ram_gb": round(ram_gb(), 1),
        "platform": platform.platform(),
        "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "versions": versions(),
    }


# ---------------------------------------------------------------------------------- model FLOPs
def train_flops_per_token(model_dir: Path, seq_len: float, adapted_fraction: float = 0.0) -> float:
    """Model FLOPs of one LoRA training token with a frozen base:
    linears (lm_head included) forward 2N + input-gradient 2N = 4N (frozen weights need no
    weight gradient); attention score and value matmuls 4·T·d per layer forward and twice that
    backward, halved for the causal mask (6·L·d·T, the usual convention: kernels that skip the
    masked half, like torch's SDPA, do not do that work).  LoRA's rank-r matmuls are <1% here
    and left out."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d, layers, ffn, vocab = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    heads, kv = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
    )
    head_dim = cfg.get("head_dim") or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * ffn
    linear = layers * per_layer + d * vocab
    return 4 * linear + 6 * layers * heads * head_dim * seq_len


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def load_rows(data: Path, tokenizer, max_len: int, mask_prompt: bool = False) -> tuple:
    """(token ids per row of train.jsonl, untrained leading tokens per row), truncated.

    `text` rows: BOS from the tokenizer, EOS appended, all trained.  `prompt`/`completion`
    rows (--mask-prompt): rendered by the tokenizer's chat template, as mlx_lm and our trainer
    render them; the prompt's tokens (the template's rendering of the user turn) are untrained."""
    rows, masked = [], []
    for line in (data / "train.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "text" in record:
            ids, n = tokenizer(record["text"])["input_ids"] + [tokenizer.eos_token_id], 0
        else:
            turns = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
            ids = tokenizer(
                tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False
            )["input_ids"]
            prompt = tokenizer.apply_chat_template(
                turns[:1], tokenize=False, add_generation_prompt=True
            )
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if mask_prompt else 0
        rows.append(ids[:max_len])
        masked.append(n)
    return rows, masked


def batch_order(rows: list, batch_size: int, seed: int, steps: int) -> list:
    """Row indices of the first `steps` batches, as mlxft.data.epoch_batches makes them:
    length-sorted chunks, their order permuted by (seed, epoch)."""
    order = np.argsort([len(r) for r in rows], kind="stable")
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, epoch = [], 0
    while len(batches) < steps:
        batches += [
            chunks[i] for i in np.random.default_rng((seed, epoch)).permutation(len(chunks))
        ]
        epoch += 1
    return batches[:steps]
