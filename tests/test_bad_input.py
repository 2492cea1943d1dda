"""Every user error in docs/ERRORS.md, through the real CLI: exit status 2, one `Error:` line
naming the key or file:line, no traceback, nothing written to adapter_path.  Plus a bounded,
seeded fuzz over garbled JSONL lines: never a traceback, never a hang.

Each case id is a row of docs/ERRORS.md (a test checks the two stay in step).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mlxft.cli import main
from tests.conftest import REPO, WIKISQL

ERRORS_MD = REPO / "docs" / "ERRORS.md"


@dataclass
class Env:
    """What a case builds on: writable fixtures and a scratch directory."""

    tmp: Path
    model: Path  # stories260K copy
    tiny: Path  # tiny llama (another architecture / tokenizer)
    data: Path  # small wikisql dir
    adapter: Path  # a trained stories adapter with a checkpoint
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "out"

    def file(self, name: str, text, binary: bool = False) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if binary else path.write_text(text)
        return path

    def data_dir(self, name: str, train, valid=None) -> Path:
        folder = self.tmp / name
        folder.mkdir()
        for split, lines in (("train", train), ("valid", valid)):
            if lines is not None:
                raw = lines if isinstance(lines, bytes) else "\n".join(lines) + "\n"
                (folder / f"{split}.jsonl").write_bytes(
                    raw if isinstance(raw, bytes) else raw.encode()
                )
        return folder

    def model_with(self, name: str, content, drop: str | None = None) -> Path:
        """A copy of the stories model with file `name` replaced by `content` (and `drop`
        removed)."""
        folder = self.tmp / "m"
        if not folder.exists():
            shutil.copytree(self.model, folder)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        if drop:
            (folder / drop).unlink()
        return folder

    def adapter_with(self, name: str, change) -> Path:
        """A copy of the trained adapter (checkpoints included) with file `name` changed:
        `change(old bytes) -> new bytes`."""
        folder = self.tmp / "a"
        if not folder.exists():
            shutil.copytree(self.adapter, folder)
        (folder / name).write_bytes(change((folder / name).read_bytes()))
        return folder

    def resume(self, run: Path) -> list:
        """--resume in `run` with the adapter fixture's own data and batch size (so the
        checkpoint's fingerprint matches and loading gets as far as its files)."""
        data = yaml.safe_load((self.adapter / "mlxft_config.yaml").read_text())["data"]
        return [
            "lora",
            "--train",
            "--model",
            self.model,
            "--data",
            data,
            "--adapter-path",
            run,
            "--iters",
            "3",
            "--batch-size",
            "2",
            "--val-batches",
            "1",
            "--resume",
        ]

    def train(self, *extra, data=None, model=None) -> list:
        return [
            "lora",
            "--train",
            "--model",
            model or self.model,
            "--data",
            data or self.data,
            "--adapter-path",
            self.out,
            "--iters",
            "1",
            "--val-batches",
            "1",
            *extra,
        ]


@dataclass
class Case:
    id: str
    args: Callable  # Env -> CLI args
    expect: tuple  # substrings of the one error line
    writes_to: str = "out"  # which directory must stay untouched: out (must not appear) or adapter
    env: Callable | None = None  # Env -> extra environment (a launcher's variables)
    hide: tuple = ()  # modules the case runs without (as if their package were not installed)


# a well-formed safetensors file holding one small tensor: a model whose weights pass the checks
_TINY_SAFETENSORS = __import__("safetensors.numpy").numpy.save(
    {"wte.weight": __import__("numpy").zeros((2, 2), "float32")}
)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _nan_weights(data: bytes) -> bytes:
    from safetensors.numpy import load, save

    return save({k: v * np.float32("nan") for k, v in load(data).items()})


def _undotted_weights(data: bytes) -> bytes:
    from safetensors.numpy import save

    return save({"weight": np.zeros((2, 2), np.float32)})


def _noise(n: int) -> bytes:
    return random.Random(n).randbytes(n)


STORIES_CONFIG = (REPO / "examples" / "models" / "stories260K" / "config.json").read_text()


TEXT = ['{"text": "hello world"}', '{"text": "another line"}']
PAIR = '{"prompt": "Q: hi", "chosen": " yes", "rejected": " no"}'


def parquet_dir(e: Env) -> Path:
    """A local dataset directory (pq/train.parquet) that `load_dataset` reads by path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = e.tmp / "pq"
    folder.mkdir(exist_ok=True)
    rows = [{"text": "hello world"}, {"text": "another line"}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    return folder


def yaml_block(block: dict) -> str:
    return json.dumps({"hf_dataset": block})  # JSON is YAML


CASES = [
    # ---------------------------------------------------------------- config
    Case(
        "config-not-found",
        lambda e: e.train("--config", e.tmp / "nope.yaml"),
        ("nope.yaml: config file not found",),
    ),
    Case(
        "config-invalid-yaml",
        lambda e: e.train("--config", e.file("c.yaml", "batch_size: [1, 2\n")),
        ("c.yaml:2: invalid YAML",),
    ),
    Case(
        "config-not-mapping",
        lambda e: e.train("--config", e.file("c.yaml", "- a\n- b\n")),
        ("c.yaml: a config must be a mapping",),
    ),
    Case(
        "config-unknown-key",
        lambda e: e.train("--config", e.file("c.yaml", "learning_rat: 1e-4\n")),
        ("c.yaml: unknown key 'learning_rat', did you mean 'learning_rate'?",),
    ),
    Case(
        "config-wrong-type",
        lambda e: e.train("--config", e.file("c.yaml", "batch_size: four\n")),
        ("c.yaml: key 'batch_size' must be a whole number, got 'four'",),
    ),
    Case(
        "config-bad-choice",
        lambda e: e.train("--config", e.file("c.yaml", "optimizer: adamx\n")),
        ("c.yaml: optimizer must be one of adamw, adam, sgd, got 'adamx'",),
    ),
    Case(
        "config-lora-unknown-key",
        lambda e: e.train("--config", e.file("c.yaml", "lora_parameters: {rnk: 8}\n")),
        ("unknown key 'lora_parameters.rnk', did you mean 'rank'?",),
    ),
    Case(
        "config-alpha-and-scale",
        lambda e: e.train("--config", e.file("c.yaml", "lora_parameters: {alpha: 16, scale: 2}\n")),
        ("set lora_parameters.alpha or lora_parameters.scale, not both",),
    ),
    Case(
        "config-schedule-name",
        lambda e: e.train("--config", e.file("c.yaml", "lr_schedule: exponential\n")),
        ("lr_schedule.name 'exponential' is not one of constant, linear, cosine",),
    ),
    Case(
        "config-quantize-bits",
        lambda e: e.train("--config", e.file("c.yaml", "quantize: 3\n")),
        ("quantize must be 4 or 8 bits, got 3",),
    ),
    Case(
        "config-not-utf8",
        lambda e: e.train("--config", e.file("c.yaml", b"model: caf\xe9\n", binary=True)),
        ("c.yaml:1: not UTF-8 text; re-save the file as UTF-8",),
    ),
    Case(
        "config-duplicate-key",
        lambda e: e.train("--config", e.file("c.yaml", "batch_size: 2\nbatch_size: 4\n")),
        ("c.yaml:2: invalid YAML: duplicate key 'batch_size' (first set on line 1)",),
    ),
    Case(
        "config-key-not-a-name",
        lambda e: e.train("--config", e.file("c.yaml", "1: 2\n")),
        ("c.yaml: key 1 is not an option name",),
    ),
    Case(
        "config-nested-wrong-type",
        lambda e: e.train(
            "--config", e.file("c.yaml", "lr_schedule: {name: cosine, warmup: ten}\n")
        ),
        ("lr_schedule.warmup must be a whole number of steps >= 0, got 'ten'",),
    ),
    Case(
        "config-optimizer-betas",
        lambda e: e.train(
            "--config", e.file("c.yaml", "optimizer_config: {adamw: {betas: [0.9]}}\n")
        ),
        ("optimizer_config.adamw.betas must be two numbers",),
    ),
    Case(
        "config-optimizer-flat",
        lambda e: e.train("--config", e.file("c.yaml", "optimizer_config: {betas: [0.9, 0.95]}\n")),
        ("optimizer_config is keyed by optimizer name",),
    ),
    Case(
        "rank-not-positive",
        lambda e: e.train("--rank", "0"),
        ("lora_parameters.rank must be a whole number > 0, got 0",),
    ),
    Case(
        "max-seq-length-too-small",
        lambda e: e.train("--max-seq-length", "1"),
        ("--max-seq-length: max_seq_length must be at least 2, got 1",),
    ),
    Case(
        "learning-rate-not-positive",
        lambda e: e.train("--learning-rate", "0"),
        ("--learning-rate: learning_rate must be > 0",),
    ),
    Case(
        "nothing-to-do",
        lambda e: ["lora", "--model", e.model, "--data", e.data, "--adapter-path", e.out],
        ("nothing to do: pass --train and/or --test",),
    ),
    Case(
        "no-model",
        lambda e: ["lora", "--train", "--data", e.data, "--adapter-path", e.out],
        ("no model: pass --model",),
    ),
    Case(
        "no-data",
        lambda e: ["lora", "--train", "--model", e.model, "--adapter-path", e.out],
        ("no data: pass --data",),
    ),
    # ---------------------------------------------------------------- output
    Case(
        "adapter-path-under-a-file",
        lambda e: [
            "lora",
            "--train",
            "--model",
            e.model,
            "--data",
            e.data,
            "--adapter-path",
            e.file("blocker", "x") / "sub",
        ],
        ("adapter_path: ", "cannot be created (", "blocker is a file)"),
    ),
    Case(
        "adapter-path-is-a-file",
        lambda e: [
            "lora",
            "--train",
            "--model",
            e.model,
            "--data",
            e.data,
            "--adapter-path",
            e.file("afile", "x"),
        ],
        (
            "adapter_path: ",
            "afile is a file, not a directory",
        ),
    ),
    # ---------------------------------------------------------------- model
    Case(
        "model-not-found",
        lambda e: e.train(model=e.tmp / "missing-model"),
        ("missing-model: model directory not found",),
    ),
    Case(
        "model-no-config",
        lambda e: e.train(model=e.file("m/README", "x").parent),
        ("m: no config.json",),
    ),
    Case(
        "model-bad-config-json",
        lambda e: e.train(model=e.file("m/config.json", '{\n  "a": 1,,\n}').parent),
        ("m/config.json:2: invalid JSON",),
    ),
    Case(
        "model-no-weights",
        lambda e: e.train(model=e.file("m/config.json", "{}").parent),
        ("m: no *.safetensors weights; the model directory is incomplete",),
    ),
    Case(
        "model-pickle-only",
        lambda e: e.train(
            model=(
                e.file("m/config.json", "{}").parent,
                e.file("m/pytorch_model.bin", b"\x80\x02", binary=True),
            )[0]
        ),
        ("only pickle weights (pytorch_model.bin)", "--allow-pickle"),
    ),
    Case(
        "model-missing-shard",
        lambda e: e.train(
            model=(
                e.file("m/config.json", "{}"),
                e.file("m/model-00001-of-00002.safetensors", b"", binary=True),
                e.file(
                    "m/model.safetensors.index.json",
                    json.dumps(
                        {
                            "weight_map": {
                                "a": "model-00001-of-00002.safetensors",
                                "b": "model-00002-of-00002.safetensors",
                            }
                        }
                    ),
                ),
            )[0].parent
        ),
        (
            "weight shard model-00002-of-00002.safetensors listed in model.safetensors.index.json "
            "is missing",
        ),
    ),
    Case(
        "model-empty-weights",
        lambda e: e.train(model=e.model_with("model.safetensors", b"")),
        ("m/model.safetensors: weight file is empty or truncated (0 bytes)",),
    ),
    Case(
        "model-truncated-weights-torch",
        lambda e: e.train(
            "--backend",
            "torch",
            model=e.model_with(
                "model.safetensors", _half((e.model / "model.safetensors").read_bytes())
            ),
        ),
        ("m/model.safetensors: weight file is truncated (522496 bytes;",),
    ),
    Case(
        "model-random-weights-generate",
        lambda e: [
            "generate",
            "--model",
            e.model_with("model.safetensors", _noise(5000)),
            "--prompt",
            "hi",
        ],
        ("m/model.safetensors: weight file is not in safetensors format",),
    ),
    Case(
        "model-config-not-object-convert",
        lambda e: [
            "convert",
            "--hf-path",
            e.model_with("config.json", "[]"),
            "--mlx-path",
            e.out,
        ],
        ("m/config.json: must be a JSON object of model settings, got list",),
    ),
    Case(
        "model-config-no-model-type",
        lambda e: e.train(model=e.model_with("config.json", "{}")),
        ("m/config.json: no 'model_type'",),
    ),
    Case(
        "model-config-bad-count-torch",
        lambda e: e.train(
            "--backend",
            "torch",
            model=e.model_with(
                "config.json",
                STORIES_CONFIG.replace('"num_hidden_layers": 5', '"num_hidden_layers": "five"'),
            ),
        ),
        ("m/config.json: 'num_hidden_layers' must be a whole number, got 'five'",),
    ),
    Case(
        "model-bad-shard-index",
        lambda e: e.train(model=e.model_with("model.safetensors.index.json", "[]")),
        ("m/model.safetensors.index.json: not a shard index",),
    ),
    Case(
        "model-bad-shard-index-json-generate",
        lambda e: [
            "generate",
            "--model",
            e.model_with("model.safetensors.index.json", "{bad"),
            "--prompt",
            "hi",
        ],
        ("m/model.safetensors.index.json:1: invalid JSON",),
    ),
    Case(
        "model-stray-safetensors",
        lambda e: e.train(
            model=(
                e.model_with("pytorch_model.bin", b"\x80\x02"),
                e.model_with(
                    "adapter_model.safetensors",
                    (e.model / "model.safetensors").read_bytes(),
                    drop="model.safetensors",
                ),
            )[1]
        ),
        (
            "only pickle weights (pytorch_model.bin; adapter_model.safetensors is not a model "
            "weight file)",
            "mlxft convert --hf-path DIR --mlx-path OUT --allow-pickle",
        ),
    ),
    Case(
        "model-hub-offline",
        lambda e: e.train(model="nobody/no-such-model"),
        ("nobody/no-such-model: not in the local Hugging Face cache and HF_HUB_OFFLINE=1",),
    ),
    # ---------------------------------------------------------------- data
    Case(
        "data-not-found", lambda e: e.train(data=e.tmp / "nodata"), ("nodata: data path not found",)
    ),
    Case(
        "data-no-train-file",
        lambda e: e.train(data=e.file("d/valid.jsonl", TEXT[0]).parent),
        ("d: no train.jsonl (or train.json) in this directory",),
    ),
    Case(
        "data-bad-extension",
        lambda e: e.train(data=e.file("d.txt", "a,b\n")),
        ("d.txt: unsupported data file type '.txt'",),
    ),
    Case(
        "data-empty",
        lambda e: e.train(data=e.data_dir("d", [""], TEXT)),
        ("d/train.jsonl: no records",),
    ),
    Case(
        "data-malformed-json-line",
        lambda e: e.train(data=e.data_dir("d", TEXT + ['{"text": "cut'], TEXT)),
        ("d/train.jsonl:3: invalid JSON (Unterminated string",),
    ),
    Case(
        "data-line-not-object",
        lambda e: e.train(data=e.data_dir("d", [TEXT[0], "[1, 2]"], TEXT)),
        ("d/train.jsonl:2: each line must be a JSON object",),
    ),
    Case(
        "data-not-utf8",
        lambda e: e.train(data=e.data_dir("d", b'{"text": "caf\xe9"}\n', TEXT)),
        ("d/train.jsonl:1: not UTF-8 text",),
    ),
    Case(
        "data-lone-surrogate",
        lambda e: e.train(data=e.data_dir("d", [TEXT[0], '{"text": "a\\ud800"}'], TEXT)),
        ("d/train.jsonl:2: invalid text: a lone UTF-16 surrogate escape",),
    ),
    Case(
        "data-no-format",
        lambda e: e.train(data=e.data_dir("d", [TEXT[0], '{"foo": 1}'], TEXT)),
        ("d/train.jsonl:2: record matches no data format (keys: 'foo')",),
    ),
    Case(
        "data-pairs-as-sft",
        lambda e: e.train(
            data=e.data_dir("d", ['{"prompt": "a", "chosen": "b", "rejected": "c"}'], TEXT)
        ),
        ("d/train.jsonl:1: a preference pair", "--train-mode dpo"),
    ),
    Case(
        "data-mixed-formats",
        lambda e: e.train(
            data=e.data_dir("d", [TEXT[0], '{"prompt": "a", "completion": "b"}'], TEXT)
        ),
        ("d/train.jsonl:2: record is in 'completion' format but earlier records are 'text'",),
    ),
    Case(
        "data-wrong-value-type",
        lambda e: e.train(data=e.data_dir("d", [TEXT[0], '{"text": 5}'], TEXT)),
        ("d/train.jsonl:2: 'text' must be a string, got 5",),
    ),
    Case(
        "data-bad-messages",
        lambda e: e.train(data=e.data_dir("d", ['{"messages": "hi"}'], TEXT)),
        ("d/train.jsonl:1: 'messages' must be",),
    ),
    Case(
        "data-missing-template-field",
        lambda e: e.train(
            "--config",
            e.file("c.yaml", "prompt_template: 'Q: {question}'\ncompletion_template: '{answer}'\n"),
            data=e.data_dir("d", ['{"question": "a", "answer": "b"}', '{"answer": "b"}'], TEXT),
        ),
        ("d/train.jsonl:2: record has no field 'question' used by prompt_template",),
    ),
    Case(
        "data-half-template",
        lambda e: e.train("--config", e.file("c.yaml", "prompt_template: 'Q: {q}'\n")),
        ("prompt_template is set but completion_template is not",),
    ),
    Case(
        "data-single-record-file",
        lambda e: e.train(data=e.file("one.jsonl", TEXT[0] + "\n")),
        ("one.jsonl: only 1 record; need at least 2",),
    ),
    Case(
        "data-no-usable-examples",
        lambda e: e.train(
            "--mask-prompt",
            "--max-seq-length",
            "4",
            data=e.data_dir(
                "d",
                ['{"prompt": "a long prompt with many words in it", "completion": "b"}'] * 2,
                TEXT,
            ),
        ),
        ("d/train.jsonl: no usable train examples", "raise max_seq_length"),
    ),
    Case(
        "pref-missing-rejected",
        lambda e: e.train(
            "--train-mode",
            "dpo",
            data=e.data_dir("d", [PAIR, '{"prompt": "Q: a", "chosen": " b"}'], [PAIR]),
        ),
        ("d/train.jsonl:2: preference record has no 'rejected'",),
    ),
    Case(
        "pref-identical-answers",
        lambda e: e.train(
            "--train-mode",
            "dpo",
            data=e.data_dir(
                "d", [PAIR, '{"prompt": "Q: a", "chosen": " b", "rejected": " b"}'], [PAIR]
            ),
        ),
        ("d/train.jsonl:2: 'chosen' and 'rejected' are identical",),
    ),
    Case(
        "pref-prompt-too-long",
        lambda e: e.train(
            "--train-mode",
            "orpo",
            "--max-seq-length",
            "8",
            data=e.data_dir(
                "d",
                [
                    '{"prompt": "a long prompt with many words in it", "chosen": " b", '
                    '"rejected": " c"}'
                ],
                [PAIR],
            ),
        ),
        (
            "d/train.jsonl:1: the prompt is",
            "leaves no room for the 'chosen' answer within max_seq_length=8",
        ),
    ),
    Case(
        "pref-sft-record",
        lambda e: e.train(
            "--train-mode",
            "dpo",
            data=e.data_dir("d", ['{"prompt": "Q: a", "completion": " b"}'], [PAIR]),
        ),
        (
            "d/train.jsonl:1: preference record has no 'chosen' or 'rejected'",
            "set train_mode: sft",
        ),
    ),
    Case(
        "pref-rpo-alpha-orpo",
        lambda e: e.train("--train-mode", "orpo", "--rpo-alpha", "1", data=e.data_dir("d", [PAIR])),
        ("rpo_alpha applies to train_mode dpo only",),
    ),
    Case(
        "data-hub-offline",
        lambda e: e.train(data="nobody/no-such-dataset"),
        (
            "nobody/no-such-dataset: no such local path, and not a dataset in the Hugging Face "
            "datasets cache while HF_HUB_OFFLINE=1",
        ),
    ),
    Case(
        "data-unknown-split",
        lambda e: e.train(
            "--config",
            e.file("c.yaml", yaml_block({"path": str(parquet_dir(e)), "train_split": "nosuch"})),
        ),
        ("pq: unknown split 'nosuch' (Unknown split",),
    ),
    Case(
        "data-missing-feature",
        lambda e: e.train(
            "--config",
            e.file(
                "c.yaml",
                yaml_block(
                    {
                        "path": str(parquet_dir(e)),
                        "train_split": "train",
                        "valid_split": "train",
                        "prompt_feature": "question",
                    }
                ),
            ),
        ),
        ("pq[train]: no column 'question' (hf_dataset.prompt_feature); the columns are text",),
    ),
    Case(
        "data-sharegpt-role",
        lambda e: e.train(
            data=e.data_dir(
                "d",
                [
                    '{"conversations": [{"from": "human", "value": "hi"}, '
                    '{"from": "bot", "value": "yo"}]}'
                ],
                TEXT,
            )
        ),
        (
            "d/train.jsonl:1: ShareGPT role 'bot' (conversations item 1) is not known; use one "
            "of human, user, gpt",
        ),
    ),
    Case(
        "eval-prompt-too-long",
        lambda e: e.train(
            "--config", e.file("c.yaml", json.dumps({"eval_prompts": ["hi", "word " * 600]}))
        ),
        ("eval_prompts[1]: the prompt is ", " tokens, the model's context window is 512"),
    ),
    Case(
        "data-mask-prompt-no-assistant",
        lambda e: e.train(
            "--mask-prompt",
            data=e.data_dir("d", ['{"messages": [{"role": "user", "content": "hi"}]}'] * 2, TEXT),
        ),
        ("d/train.jsonl: no usable train examples: none of the 2 has a token to train on",),
    ),
    Case(
        "generate-temp-nan",
        lambda e: ["generate", "--model", e.model, "--prompt", "hi", "--temp", "nan"],
        ("--temp must be a finite number, got nan",),
    ),
    Case(
        "chat-template-file-missing",
        lambda e: e.train("--config", e.file("c.yaml", "chat_template: none.jinja\n")),
        ("chat_template: file none.jinja not found",),
    ),
    # ---------------------------------------------------------------- adapters
    Case(
        "adapter-not-found",
        lambda e: [
            "lora",
            "--test",
            "--model",
            e.model,
            "--data",
            e.data,
            "--adapter-path",
            e.tmp / "no-adapter",
        ],
        ("no-adapter: adapter directory not found",),
    ),
    Case(
        "adapter-other-model",
        lambda e: e.train("--resume-adapter-file", e.adapter, model=e.tiny),
        ("adapter module", "has shape"),
    ),
    Case(
        "adapter-mlx-lm-format",
        lambda e: e.train(
            "--resume-adapter-file", e.file("mlxlm/adapters.safetensors", b"", binary=True).parent
        ),
        ("mlxlm: this is an mlx-lm adapter; convert it with `mlxft import",),
    ),
    Case(
        "adapter-pickle",
        lambda e: e.train(
            "--resume-adapter-file",
            (
                e.file("pk/adapter_config.json", "{}"),
                e.file("pk/adapter_model.bin", b"", binary=True),
            )[0].parent,
        ),
        ("adapter_model.bin is a pickle",),
    ),
    Case(
        "adapter-truncated-generate",
        lambda e: [
            "generate",
            "--model",
            e.model,
            "--adapter-path",
            e.adapter_with("adapter_model.safetensors", _half),
            "--prompt",
            "hi",
        ],
        ("a/adapter_model.safetensors: adapter weights file is truncated",),
    ),
    Case(
        "adapter-truncated-import",
        lambda e: [
            "import",
            e.adapter_with("adapter_model.safetensors", _half),
            "--save-path",
            e.out,
        ],
        ("a/adapter_model.safetensors: adapter weights file is truncated",),
    ),
    Case(
        "adapter-config-list-fuse",
        lambda e: [
            "fuse",
            "--model",
            e.model,
            "--adapter-path",
            e.adapter_with("adapter_config.json", lambda _: b"[]"),
            "--save-path",
            e.out,
        ],
        ("a/adapter_config.json: must be a JSON object (PEFT's adapter settings), got list",),
    ),
    Case(
        "adapter-tensor-without-dots-export",
        lambda e: [
            "export",
            "--adapter-path",
            e.adapter_with("adapter_model.safetensors", _undotted_weights),
            "--save-path",
            e.out,
        ],
        ("a/adapter_model.safetensors: tensor 'weight' is not a LoRA/DoRA weight",),
    ),
    Case(
        "adapter-nan-weights-generate",
        lambda e: [
            "generate",
            "--model",
            e.model,
            "--adapter-path",
            e.adapter_with("adapter_model.safetensors", _nan_weights),
            "--prompt",
            "hi",
        ],
        ("holds NaN/inf values: the run that saved this adapter diverged",),
    ),
    Case(
        "adapter-no-test-split",
        lambda e: [
            "lora",
            "--test",
            "--model",
            e.model,
            "--data",
            e.data_dir("d", TEXT, TEXT),
            "--adapter-path",
            e.adapter,
        ],
        ("no test.jsonl for --test",),
        writes_to="adapter",
    ),
    # ---------------------------------------------------------------- export (GGUF / Ollama)
    Case(
        "export-adapter-not-found",
        lambda e: [
            "export",
            "--to",
            "gguf",
            "--model",
            e.model,
            "--adapter-path",
            e.tmp / "no-adapter",
            "--save-path",
            e.out,
        ],
        ("no-adapter: adapter directory not found",),
    ),
    Case(
        "export-unsupported-architecture",
        lambda e: [
            "export",
            "--to",
            "gguf",
            "--save-path",
            e.out,
            "--model",
            (
                e.file("m/config.json", '{"model_type": "gpt2"}'),
                e.file("m/model.safetensors", _TINY_SAFETENSORS, binary=True),
            )[0].parent,
        ],
        (
            "architecture 'gpt2' cannot be exported to GGUF yet; "
            "supported: llama, mistral, qwen2, qwen3, phi3",
        ),
    ),
    Case(
        "export-dora-to-gguf-lora",
        lambda e: [
            "export",
            "--to",
            "gguf-lora",
            "--model",
            e.model,
            "--save-path",
            e.out,
            "--adapter-path",
            e.file(
                "dora/adapter_config.json",
                json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4}),
            ).parent,
        ],
        ("a DoRA adapter cannot be a GGUF LoRA", "mlxft export --to gguf --adapter-path"),
    ),
    Case(
        "export-unwritable-destination",
        lambda e: [
            "export",
            "--to",
            "gguf",
            "--model",
            e.model,
            "--save-path",
            e.file("blocker", "x") / "m.gguf",
        ],
        ("save_path: ", "blocker is a file, not a directory"),
    ),
    Case(
        "export-ollama-no-chat-template",
        lambda e: ["export", "--to", "ollama", "--model", e.model, "--save-path", e.out],
        ("the tokenizer has no chat template", "--template FILE"),
    ),
    # ---------------------------------------------------------------- resume
    Case("resume-no-checkpoint", lambda e: e.train("--resume"), ("--resume: no checkpoint in",)),
    Case(
        "resume-from-not-a-checkpoint",
        lambda e: e.train("--resume-from", e.data),
        ("is not an mlxft checkpoint (no trainer_state.json)",),
    ),
    Case(
        "resume-incompatible",
        lambda e: [
            "lora",
            "--train",
            "--model",
            e.model,
            "--data",
            e.data,
            "--adapter-path",
            e.adapter,
            "--iters",
            "3",
            "--resume",
            "--batch-size",
            "3",
        ],
        ("cannot resume from", "batch_size is 3, the checkpoint has 2", "--resume-adapter-file"),
        writes_to="adapter",
    ),
    Case(
        "resume-damaged-checkpoint",
        lambda e: e.train(
            "--resume-from", e.file("ck/step-0000002/trainer_state.json", "{not json").parent
        ),
        ("step-0000002: damaged checkpoint",),
    ),
    Case(
        "resume-damaged-checkpoint-adapter",
        lambda e: e.resume(
            e.adapter_with("checkpoints/step-0000002/adapter_model.safetensors", _half)
        ),
        (
            "step-0000002/adapter_model.safetensors: adapter weights file is truncated",
            "resume from an earlier checkpoint with --resume-from",
        ),
    ),
    Case(
        "resume-damaged-trainer-state",
        lambda e: e.resume(
            e.adapter_with(
                "checkpoints/step-0000002/trainer_state.json",
                lambda b: b.replace(b'"step": 2', b'"step": "two"'),
            )
        ),
        ("step-0000002: damaged checkpoint (trainer_state.json: position.step is 'two'",),
    ),
    Case(
        "resume-damaged-trainer-state-list",
        lambda e: e.train(
            "--resume-from", e.file("ck/step-0000002/trainer_state.json", "[]").parent
        ),
        ("step-0000002: damaged checkpoint (trainer_state.json holds list, not an object)",),
    ),
    Case(
        "resume-damaged-state-tensors",
        lambda e: e.resume(
            e.adapter_with("checkpoints/step-0000002/trainer_state.safetensors", lambda b: b[:40])
        ),
        ("trainer_state.safetensors: checkpoint state file is not in safetensors format",),
    ),
    # ---------------------------------------------------------------- data parallel
    Case(
        "world-batch-not-divisible",
        lambda e: e.train("--batch-size", "3"),
        ("batch_size 3 does not divide evenly over the 2 processes mlx.launch started",),
        env=lambda e: {
            "MLX_RANK": "0",
            "MLX_HOSTFILE": str(e.file("hosts.json", '[["127.0.0.1:1"], ["127.0.0.1:2"]]')),
        },
    ),
    Case(
        "world-wrong-launcher",
        lambda e: e.train(),
        ("started by torchrun with 2 processes, but backend is mlx", "--backend torch"),
        env=lambda e: {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
    ),
    Case(
        "distributed-timeout-not-positive",
        lambda e: e.train("--distributed-timeout", "0"),
        ("distributed_timeout must be > 0 seconds",),
    ),
    # ---------------------------------------------------------------- trackers and plots
    Case(
        "report-to-unknown",
        lambda e: e.train("--report-to", "tensorbaord"),
        (
            "--report-to: report_to 'tensorbaord' is not a tracker; choose from tensorboard, "
            "wandb, mlflow (did you mean 'tensorboard'?)",
        ),
    ),
    Case(
        "report-to-not-installed",
        lambda e: e.train("--config", e.file("c.yaml", "report_to: [wandb]\n")),
        (
            "c.yaml: report_to 'wandb' needs wandb, which is not installed: "
            "pip install 'mlxft[wandb]'",
        ),
        hide=("wandb",),
    ),
    Case(
        "plot-no-metrics",
        lambda e: ["plot", e.data, "--save-path", e.out / "loss.png"],
        (
            "no metrics.jsonl in this directory; pass an adapter_path directory of `mlxft lora` "
            "or its metrics.jsonl",
        ),
    ),
    Case(
        "plot-bad-metrics-line",
        lambda e: [
            "plot",
            e.file(
                "m/metrics.jsonl",
                '{"step": 1, "train_loss": 2}\n{"step": 2, "train_loss"\n{"step": 3}\n',
            ),
            "--save-path",
            e.out / "loss.png",
        ],
        ("m/metrics.jsonl:2: invalid JSON (",),
    ),
    Case(
        "plot-unknown-metric",
        lambda e: ["plot", e.adapter, "--metrics", "train_los", "--save-path", e.out / "loss.png"],
        ("--metrics: no run has 'train_los'; did you mean 'train_loss'?",),
        writes_to="adapter",
    ),
    Case(
        "plot-no-matplotlib",
        lambda e: ["plot", e.adapter, "--save-path", e.out / "loss.png"],
        ("plotting needs matplotlib, which is not installed: pip install 'mlxft[plot]'",),
        writes_to="adapter",
        hide=("matplotlib",),
    ),
    Case(
        "plot-unknown-format",
        lambda e: ["plot", e.adapter, "--save-path", e.out / "loss.jpg"],
        ("--save-path", "unknown picture type '.jpg'; use one of .png, .svg, .pdf, .html"),
        writes_to="adapter",
    ),
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A 3-step stories adapter with a step-2 checkpoint (batch size 2)."""
    from tests.conftest import STORIES

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    data = tmp_path_factory.mktemp("adapter_data")
    lines = (WIKISQL / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[8:10]) + "\n")
    result = CliRunner().invoke(
        main,
        [
            str(a)
            for a in [
                "lora",
                "--train",
                "--model",
                STORIES,
                "--data",
                data,
                "--adapter-path",
                out,
                "--iters",
                "3",
                "--batch-size",
                "2",
                "--save-every",
                "2",
                "--val-batches",
                "1",
            ]
        ],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def env(tmp_path, stories, tiny_llama, wikisql_small, adapter):
    return Env(tmp_path / "case", stories, tiny_llama, wikisql_small, adapter)


def snapshot(folder: Path) -> dict:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def invoke(args, env=None) -> tuple:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result, [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case, env, monkeypatch):
    env.tmp.mkdir()
    for module in case.hide:
        monkeypatch.setitem(sys.modules, module, None)
    args = case.args(env)
    before = snapshot(env.adapter)
    result, lines = invoke(args, case.env(env) if case.env else None)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for part in case.expect:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert not env.out.exists(), "a failed run wrote to adapter_path"
    assert snapshot(env.adapter) == before


def test_every_case_is_documented():
    text = ERRORS_MD.read_text()
    documented = {
        line.split("|")[1].strip().strip("`")
        for line in text.splitlines()
        if line.startswith("| `") and line.count("|") >= 4
    }
    ids = {c.id for c in CASES}
    assert ids - documented == set(), "cases missing from docs/ERRORS.md"
    assert documented - ids == set(), "docs/ERRORS.md rows without a test"


# -------------------------------------------------------------------- fuzz
WEIRD = [
    None,
    1,
    1.5,
    True,
    [],
    {},
    "",
    "x" * 20000,
    "\ud800",
    "a\udfff b",
    "\U0001f600",
    "\x00",
    "\u2028",
    "\ufeff",
    "\x1b[31m",
    "{",
    "{{name}}",
    "<|im_end|>",
    "</s>",
    "\r\n",
]
FIELDS = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
}


def _record(rng: random.Random, fmt: str) -> dict:
    words = lambda: " ".join(
        rng.choice(["select", "the", "table", "où", "名前", "x", "?"]) for _ in range(5)
    )  # noqa
    if fmt == "chat":
        return {
            "messages": [
                {"role": "user", "content": words()},
                {"role": "assistant", "content": words()},
            ]
        }
    return {key: words() for key in FIELDS[fmt]}


def _mutate(rng: random.Random, record: dict, fmt: str) -> str:
    """One defect (or an oddity that is fine) in an otherwise valid record."""
    line = json.dumps(record)
    kind = rng.randrange(8)
    if kind == 0:
        return line[: rng.randrange(1, len(line))]  # cut
    if kind == 1:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(1, 40)))  # noise
    if kind == 2:
        return (
            "[" * rng.choice([10, 5000, 200000])
            if rng.random() < 0.5
            else rng.choice(
                ["NaN", "1e999", "null", "true", '"str"', "{}", "{'text': 'x'}", "\ufeff" + line]
            )
        )
    if kind == 3:
        return line + rng.choice([",", "}", " garbage", "\x00", "\r", "\u2028", "\x0c"])
    if fmt == "chat" and kind in (4, 5):
        messages = rng.choice(
            [
                [],
                [{}],
                "x",
                [{"role": 1, "content": "x"}],
                [{"role": "wizard", "content": "x"}],
                [{"role": "user", "content": rng.choice(WEIRD)}],
                [{"role": "user", "content": "only"}],
                [{"role": "assistant", "content": rng.choice(WEIRD)}],
            ]
        )
        return json.dumps({"messages": messages})
    field_name = rng.choice(FIELDS[fmt] if fmt != "chat" else ("messages",))
    if fmt == "chat":
        record["messages"][1]["content"] = rng.choice(WEIRD)
    else:
        record[field_name] = rng.choice(WEIRD)
    return json.dumps(record)  # lone surrogates come out as \ud800 escapes


def _fuzz_file(rng: random.Random) -> list:
    fmt = rng.choice(list(FIELDS))
    records = [_record(rng, fmt) for _ in range(rng.randrange(2, 6))]
    lines = [json.dumps(r) for r in records]
    if rng.random() < 0.85:
        i = rng.randrange(len(lines))
        lines[i] = _mutate(rng, records[i], fmt)
    return lines


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def test_fuzzed_jsonl_never_tracebacks_or_hangs(stories, tmp_path):
    """80 seeded files, each valid but for one defect, under random mask_prompt / max_seq_length."""
    rng = random.Random(1234)
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {0: 0, 2: 0}
    try:
        for i in range(80):
            folder = tmp_path / f"d{i}"
            folder.mkdir()
            lines = _fuzz_file(rng)
            (folder / "train.jsonl").write_text("\n".join(lines) + "\n", errors="surrogatepass")
            (folder / "valid.jsonl").write_text(
                "\n".join(lines[-1:] if rng.random() < 0.3 else lines[:1]) + "\n",
                errors="surrogatepass",
            )
            flags = rng.choice([[], ["--mask-prompt"]]) + [
                "--max-seq-length",
                str(rng.choice([2, 8, 64, 2048])),
            ]
            signal.setitimer(signal.ITIMER_REAL, 30)
            try:
                result, err_lines = invoke(
                    [
                        "lora",
                        "--dry-run",
                        "--model",
                        stories,
                        "--data",
                        folder,
                        "--adapter-path",
                        tmp_path / "out",
                        *flags,
                    ]
                )
            except Hang:
                pytest.fail(f"case {i} hung: {lines!r:.300}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert result.exit_code in (0, 2), (
                f"case {i} {flags} {lines!r:.300}: {result.exception!r}"
            )
            assert "Traceback" not in result.output
            if result.exit_code == 2:
                errors = [line for line in err_lines if line.startswith("Error: ")]
                assert len(errors) == 1, f"case {i}: {result.stderr!r:.500}"
            outcomes[result.exit_code] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "out").exists()
    assert min(outcomes.values()) >= 10, outcomes  # the sweep hit both accepted and rejected files


# -------------------------------------------------------------------- safe loading
def test_safe_loading_defaults_and_revision_pin(wikisql_small, tmp_path, monkeypatch):
    """trust_remote_code is off unless asked; --revision reaches the hub download; pickle is
    refused."""
    from mlxft import hub as models
    from mlxft.config import build_config
    from mlxft.errors import UserError

    assert build_config(overrides={}).trust_remote_code is False
    seen = {}

    def fake_download(repo_id, revision):
        seen.update(repo=repo_id, revision=revision)
        raise UserError(f"{repo_id}: stop here")

    monkeypatch.setattr(models, "_download", fake_download)
    result, lines = invoke(
        [
            "lora",
            "--train",
            "--model",
            "org/model",
            "--revision",
            "0123abc",
            "--data",
            wikisql_small,
            "--adapter-path",
            tmp_path / "out",
        ]
    )
    assert result.exit_code == 2 and seen == {"repo": "org/model", "revision": "0123abc"}
    assert lines == ["Error: org/model: stop here"]
    assert not (tmp_path / "out").exists()
