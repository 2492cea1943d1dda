"""One huge record: wall time and peak RSS of `mlxft lora` on a single 50 MB text record.

Records are cut to a character budget before tokenizing (mlxft/data/tokenize.py), so the
record's size should not matter; this measures the whole command in a fresh process (model
load, data, steps, adapter save) with the child's peak resident memory from getrusage.

    python benchmarks/long_record.py                 # 50 MB, --max-seq-length 128, 5 steps
    python benchmarks/long_record.py --mb 200 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "table", "select", "where", "count", "of", "players", "Lily", "名前", "où", "?"]


def write_data(folder: Path, megabytes: int) -> None:
    """train.jsonl: one {"text"} record of `megabytes` MB (UTF-8, some non-ASCII words)."""
    rng = random.Random(0)
    size = megabytes * 2**20
    text = " ".join(rng.choice(WORDS) for _ in range(size // 4))
    text = text.encode()[: size - 20].decode(errors="ignore")
    (folder / "train.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    (folder / "valid.jsonl").write_text(json.dumps({"text": " ".join(WORDS)}) + "\n")


def run_measured(command: list, env: dict, logs: Path) -> tuple:
    """(exit status, wall s, CPU s, peak RSS bytes) of `command` alone (wait4: this child's
    own resource usage, not every child's so far)."""
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        tic = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - tic
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        write_data(data, args.mb)
        size = (data / "train.jsonl").stat().st_size
        command = [
            sys.executable, "-m", "mlxft", "lora", "--train",
            "--model", str(REPO / "examples" / "models" / "stories260K"),
            "--data", str(data), "--adapter-path", str(Path(tmp) / "out"),
            "--max-seq-length", str(args.max_seq_length), "--batch-size", "1",
            "--iters", str(args.steps), "--val-batches", "1",
        ]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        status, seconds, cpu, peak = run_measured(command, env, Path(tmp))
        if status:
            sys.exit((Path(tmp) / "stderr").read_text())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"one {size / 2**20:.1f} MB record, --max-seq-length {args.max_seq_length}, "
        f"{args.steps} steps: {seconds:.1f} s wall, {cpu:.1f} s CPU, peak RSS "
        f"{peak / 1e9:.2f} GB (load average {load}, {os.cpu_count()} CPUs)"
    )
    print(" ".join(command[1:]))


if __name__ == "__main__":
    main()
