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
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import measure  # noqa: E402

WORDS = ["the", "table", "select", "where", "count", "of", "players", "Lily", "名前", "où", "?"]


def write_data(folder: Path, megabytes: int) -> None:
    """train.jsonl: one {"text"} record of `megabytes` MB (UTF-8, some non-ASCII words)."""
    rng = random.Random(0)
    size = megabytes * 2**20
    text = " ".join(rng.choice(WORDS) for _ in range(size // 4))
    text = text.encode()[: size - 20].decode(errors="ignore")
    (folder / "train.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    (folder / "valid.jsonl").write_text(json.dumps({"text": " ".join(WORDS)}) + "\n")


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
        with open(Path(tmp) / "stdout", "w") as out, open(Path(tmp) / "stderr", "w") as err:
            run = measure(command, out, err, env)
        if run.status:
            sys.exit((Path(tmp) / "stderr").read_text())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"one {size / 2**20:.1f} MB record, --max-seq-length {args.max_seq_length}, "
        f"{args.steps} steps: {run.seconds:.1f} s wall, {run.cpu_seconds:.1f} s CPU, peak RSS "
        f"{run.peak_bytes / 1e9:.2f} GB (load average {load}, {os.cpu_count()} CPUs)"
    )
    print(" ".join(command[1:]))


if __name__ == "__main__":
    main()
