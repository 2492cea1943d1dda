"""Every user error in docs/ERRORS.md, through the real CLI: exit status 2, one `Error:` line
naming the key or file:line, no traceback, nothing written to adapter_path.  Plus a bounded,
seeded fuzz over garbled JSONL lines: never a traceback, never a hang.

Each case id is a row of docs/ERRORS.md (a test checks the two stay in step).
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
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


TEXT = ['{"text": "hello world"}', '{"text": "another line"}']
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
        lambda e: e.train(data=e.file("d.csv", "a,b\n")),
        ("d.csv: unsupported data file type '.csv'",),
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
def test_bad_input_is_one_clear_line(case, env):
    env.tmp.mkdir()
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
