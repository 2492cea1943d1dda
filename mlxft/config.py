"""One training config for both backends: YAML file + CLI flags, validated up front.

Key names follow mlx-lm's `lora` YAML where one exists, so an mlx-lm config runs here
unchanged (its `scale` included).  Every problem is a `UserError` naming the file, the key
and what to write instead; unknown keys get the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlxft.errors import UserError

CONFIG_FILE = "mlxft_config.yaml"  # a run's resolved config, beside its adapter and in checkpoints
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd")
FINE_TUNE_TYPES = ("lora", "dora", "full")
TRAIN_MODES = ("sft", "dpo", "orpo")  # mlx-lm-lora's --train-mode names
BACKENDS = ("mlx", "torch")
DTYPES = ("auto", "float32", "bfloat16", "float16")

LORA_KEYS = ("rank", "alpha", "scale", "dropout", "keys")
# What each optimizer accepts in optimizer_config (the options both backends implement alike).
OPTIMIZER_OPTIONS = {
    "adamw": ("betas", "eps", "bias_correction"),
    "adam": ("betas", "eps", "bias_correction"),
    "sgd": ("momentum", "dampening", "nesterov"),
}
SCHEDULE_KEYS = ("name", "warmup", "warmup_ratio", "min_lr_ratio", "warmup_init")
# mlx-lm writes e.g. `name: cosine_decay`; accept its names.
_SCHEDULE_ALIASES = {"cosine_decay": "cosine", "linear_schedule": "linear", "none": "constant"}


@dataclass
class Config:
    """Everything a run needs, from YAML and flags; `build_config` fills and checks it."""

    # --- what to train, on what
    model: str | None = None
    """Model directory or Hugging Face hub id."""
    data: str | None = None
    """Directory with train/valid[/test] .jsonl/.json/.parquet/.csv, one such file (split by
    valid_split), a `save_to_disk` directory, or a hub dataset id (org/name)."""
    train: bool = False
    """Fine-tune."""
    test: bool = False
    """Report loss and perplexity on the test split."""
    backend: str = "mlx"
    """Tensor backend: mlx, or torch (the same run on PyTorch)."""
    device: str | None = None
    """torch only: mps | cuda[:N] | cpu (default: the best available)."""
    dtype: str = "auto"
    """auto (the backend's default) | float32 | bfloat16 | float16."""
    fine_tune_type: str = "lora"
    """lora | dora | full."""
    trust_remote_code: bool = False
    """Allow the model's or tokenizer's own code to run."""
    revision: str | None = None
    """Hub model: the branch, tag or commit to download."""
    quantize: int | None = None
    """QLoRA (MLX only): quantize the base to 4 or 8 bits on load."""
    q_group_size: int = 64
    """QLoRA quantization group size (32, 64, 128)."""
    # --- data
    max_seq_length: int = 2048
    """Longer examples are truncated (and counted in the header)."""
    mask_prompt: bool = False
    """Train on completions / assistant turns only."""
    valid_split: float = 0.1
    """Share of a single data file held out for validation."""
    prompt_template: str | None = None
    """Render other record shapes: prompt text with {field} placeholders."""
    completion_template: str | None = None
    """The trained part of such records, with {field} placeholders."""
    chat_template: str | None = None
    """A jinja chat template (text or file) instead of the tokenizer's."""
    use_chat_template: str = "auto"
    """prompt/completion records: auto (when the tokenizer has one) | true | false."""
    hf_dataset: Any | None = None
    """mlx-lm's block {path, name, config, train_split, valid_split, test_split, text_feature,
    prompt_feature, completion_feature, chat_feature}, or a list of them (concatenated)."""
    # --- schedule of work
    iters: int | None = None
    """Optimizer steps (default: from epochs, else 1000)."""
    epochs: int | None = None
    """Epochs, when iters is not set."""
    batch_size: int = 4
    """Sequences per batch."""
    grad_accumulation_steps: int = 1
    """Batches summed into one optimizer step."""
    grad_checkpoint: bool = False
    """Recompute block activations in the backward pass to save memory."""
    # --- optimisation
    learning_rate: float = 1e-5
    """Peak learning rate."""
    lr_schedule: Any = "constant"
    """constant | linear | cosine, or {name, warmup, warmup_ratio, min_lr_ratio, warmup_init}."""
    optimizer: str = "adamw"
    """adamw | adam | sgd (Adam with bias correction, as torch)."""
    weight_decay: float = 0.0
    """Decoupled for adamw, coupled for sgd."""
    optimizer_config: dict = field(default_factory=dict)
    """Per-optimizer options, e.g. {adamw: {betas: [0.9, 0.95], eps: 1e-8}}."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value."""
    # --- adapters
    num_layers: int = 16
    """Adapt (or, for full, train) the last N blocks; -1: all."""
    lora_parameters: dict = field(default_factory=dict)
    """{rank, alpha or scale, dropout, keys}; see the README's table."""
    # --- reporting, evaluation, files
    steps_per_report: int = 10
    """Steps between training reports."""
    steps_per_eval: int = 200
    """Steps between validations (also at step 0 and at the end)."""
    val_batches: int = 25
    """Validation batches (-1: all), spread over the length range."""
    test_batches: int = 500
    """Test batches (-1: all)."""
    eval_every_epoch: bool = False
    """Also validate at the end of each epoch."""
    eval_prompts: Any | None = None
    """Prompts generated greedily at each validation: a list, or a .txt/.jsonl/.json file."""
    eval_max_tokens: int = 64
    """Most tokens generated per eval prompt."""
    early_stopping_patience: int | None = None
    """Stop after N validations without a val-loss improvement (unset: never stop early)."""
    early_stopping_min_delta: float = 0.0
    """Smallest val-loss decrease that counts as an improvement."""
    save_best: bool = False
    """Keep the lowest-val-loss adapter in adapter_path/best/."""
    save_every: int = 100
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept."""
    adapter_path: str = "adapters"
    """Output directory: adapter, config, metrics.jsonl, checkpoints."""
    resume_adapter_file: str | None = None
    """Start a NEW run from an existing adapter's weights."""
    resume: bool = False
    """Continue the run in adapter_path from its latest checkpoint."""
    resume_from: str | None = None
    """Continue from this checkpoint directory."""
    seed: int = 0
    """Seed for adapter init, batch order and dropout."""
    report_to: Any | None = field(default_factory=list)
    """Experiment trackers that get every metrics.jsonl row: tensorboard, wandb, mlflow (a list
    or a comma list; `none` or empty: none)."""
    run_name: str | None = None
    """The run's name in the trackers (default: adapter_path's directory name)."""
    project: str | None = None
    """W&B project and MLflow experiment (default mlxft)."""
    # --- preference tuning (mlxft.training.preference; TRL's names)
    train_mode: str = "sft"
    """sft | dpo | orpo (dpo and orpo read {"prompt", "chosen", "rejected"} records)."""
    beta: float = 0.1
    """DPO: strength of the pull toward the reference; ORPO: weight of the odds-ratio term."""
    label_smoothing: float = 0.0
    """DPO: assumed share of flipped preference labels (conservative DPO), in [0, 0.5)."""
    rpo_alpha: float | None = None
    """DPO: add rpo_alpha x the mean NLL of the chosen answers (RPO; TRL's loss_type [sigmoid,
    sft] with loss_weights [1, rpo_alpha]), so the chosen answers' own tokens are trained, not
    only their margin over the rejected ones (unset: plain DPO)."""
    max_prompt_length: int | None = None
    """Preference prompts keep their last N tokens (unset: the whole prompt)."""
    precompute_ref_log_probs: bool = False
    """DPO: reference log-probs in one pass before step 1, kept in every checkpoint."""
    # --- data parallelism (mlx.launch / torchrun; mlxft.training.world)
    distributed_timeout: float = 600.0
    """Seconds a rank waits in a collective for the others before it stops with an error."""

    # --- derived views (backend code reads these, never the raw dicts)
    @property
    def lora_rank(self) -> int:
        return int(self.lora_parameters["rank"])

    @property
    def lora_scale(self) -> float:
        return float(self.lora_parameters["scale"])

    @property
    def lora_alpha(self) -> float:
        return self.lora_scale * self.lora_rank

    @property
    def lora_dropout(self) -> float:
        return float(self.lora_parameters["dropout"])

    @property
    def lora_keys(self) -> list | None:
        return self.lora_parameters.get("keys")

    @property
    def optimizer_options(self) -> dict:
        """Keyword arguments for the chosen optimizer, checked (betas a tuple, bias
        correction implied: both backends always bias-correct)."""
        options = dict(self.optimizer_config.get(self.optimizer) or {})
        options.pop("bias_correction", None)
        if "betas" in options:
            options["betas"] = tuple(options["betas"])
        return options

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_PATH_KEYS = (
    "model",
    "data",
    "adapter_path",
    "resume_adapter_file",
    "resume_from",
    "chat_template",
)


def _annotation(f: dataclasses.Field) -> tuple:
    """(base type name, whether None is allowed) of a field, whichever way it is spelled
    (`Optional[int]`, `int | None`)."""
    text = str(f.type).replace(" ", "")
    optional = text.startswith("Optional[") or "|None" in text or text.startswith("None|")
    base = (
        text.removeprefix("Optional[").removesuffix("]") if text.startswith("Optional[") else text
    )
    return base.replace("|None", "").replace("None|", ""), optional


_KINDS = {n: _annotation(f) for n, f in FIELDS.items()}
_BOOL_KEYS = {n for n, (t, _) in _KINDS.items() if t == "bool"}
_INT_KEYS = {n for n, (t, _) in _KINDS.items() if t == "int"}
_FLOAT_KEYS = {n for n, (t, _) in _KINDS.items() if t == "float"}
_STR_KEYS = {n for n, (t, _) in _KINDS.items() if t == "str"}


class _Loader(yaml.SafeLoader):
    """PyYAML reads `1e-5` as a string (YAML 1.1); read it as a float, as mlx-lm does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    """A YAML mapping that refuses a key given twice (PyYAML keeps the last one silently, so a
    pasted-over setting would be ignored without a word)."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: PyYAML's own check reports it
            continue
        if first != key_node.start_mark.line + 1:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key '{key}' (first set on line {first}); keep one",
                key_node.start_mark,
            )
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _closest(key, options) -> str:
    key = str(key)
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else "valid keys: " + ", ".join(sorted(options))


def packaged_recipes() -> dict:
    """{name: (path, one-line summary)} of the recipes installed with mlxft (`mlxft.recipes`),
    the summary being the first comment line of each YAML."""
    from importlib.resources import files

    found = {}
    for entry in sorted(files("mlxft.recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            summary = first.lstrip("#").strip() if first.startswith("#") else ""
            found[entry.name[: -len(".yaml")]] = (Path(str(entry)), summary)
    return found


def resolve_config(value: str | Path) -> Path:
    """A config path: an existing file wins; a bare name (`alpaca_chat` or `alpaca_chat.yaml`)
    is a packaged recipe, so recipes work from an installed wheel as well as from a clone."""
    path = Path(os.path.expanduser(str(value)))
    if path.is_file():
        return path
    name = str(value)
    if "/" not in name and os.sep not in name:
        recipe = packaged_recipes().get(name[: -len(".yaml")] if name.endswith(".yaml") else name)
        if recipe:
            return recipe[0]
    names = ", ".join(packaged_recipes())
    raise UserError(f"{path}: config file not found (nor a recipe name; recipes: {names})")


def read_yaml(path: str | Path) -> dict:
    path = resolve_config(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; re-save the file as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise UserError(f"{path}:{line}: invalid YAML: {err.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def _check_type(key: str, value: Any, where: str) -> Any:
    def bad(expected: str):
        return UserError(f"{where}: key '{key}' must be {expected}, got {value!r}")

    if value is None:
        if _KINDS[key][1] or key in ("lr_schedule",):
            return None
        raise bad("set (not empty)")
    if key in _BOOL_KEYS:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise bad("true or false")
    elif key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("a whole number")
    elif key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    elif key in _STR_KEYS:
        if isinstance(value, (int, float)) and key in ("revision",):
            return str(value)
        if not isinstance(value, str):
            raise bad("a string")
    elif key in ("lora_parameters", "optimizer_config"):
        if not isinstance(value, dict):
            raise bad("a mapping")
    return value


def _normalize_schedule(value: Any, where: str) -> dict:
    if value is None:
        value = "constant"
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise UserError(
            f"{where}: key 'lr_schedule' must be one of {', '.join(SCHEDULES)} or a mapping"
        )
    for key in value:
        if key not in SCHEDULE_KEYS and key != "arguments":
            raise UserError(
                f"{where}: unknown key 'lr_schedule.{key}', {_closest(key, SCHEDULE_KEYS)}"
            )
    name = str(value.get("name", "constant"))
    name = _SCHEDULE_ALIASES.get(name, name)
    if name not in SCHEDULES:
        raise UserError(f"{where}: lr_schedule.name '{name}' is not one of {', '.join(SCHEDULES)}")
    warmup = value.get("warmup") or 0
    if isinstance(warmup, float) and warmup.is_integer():
        warmup = int(warmup)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(
            f"{where}: lr_schedule.warmup must be a whole number of steps >= 0, got {warmup!r}"
        )
    return {
        "name": name,
        "warmup": warmup,
        "warmup_ratio": _number(
            value.get("warmup_ratio") or 0.0, where, "lr_schedule.warmup_ratio", 0.0, 1.0
        ),
        "min_lr_ratio": _number(
            value.get("min_lr_ratio") or 0.0, where, "lr_schedule.min_lr_ratio", 0.0, 1.0 + 1e-9
        ),
        "warmup_init": _number(
            value.get("warmup_init") or 0.0, where, "lr_schedule.warmup_init", 0.0
        ),
    }


def _normalize_lora(value: dict, where: str) -> dict:
    for key in value:
        if key not in LORA_KEYS:
            raise UserError(
                f"{where}: unknown key 'lora_parameters.{key}', {_closest(key, LORA_KEYS)}"
            )
    rank = value.get("rank", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"{where}: lora_parameters.rank must be a whole number > 0, got {rank!r}")
    if value.get("alpha") is not None and value.get("scale") is not None:
        raise UserError(
            f"{where}: set lora_parameters.alpha or lora_parameters.scale, not both (scale = alpha "
            f"/ rank)"
        )
    if value.get("scale") is not None:
        scale = value["scale"]
    else:
        scale = (value["alpha"] if value.get("alpha") is not None else 2 * rank) / rank
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise UserError(f"{where}: lora_parameters.alpha/scale must be a number")
    dropout = value.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(
            f"{where}: lora_parameters.dropout must be a number in [0, 1), got {dropout!r}"
        )
    keys = value.get("keys")
    if keys is not None:
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise UserError(
                f"{where}: lora_parameters.keys must be a list of module names, e.g. [q_proj, "
                f"v_proj]"
            )
    return {
        "rank": rank,
        "scale": float(scale),
        "alpha": float(scale) * rank,
        "dropout": float(dropout),
        "keys": keys,
    }


def _number(value, where: str, key: str, low: float, high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        bounds = f"in [{low:g}, {high:g})" if high != float("inf") else f">= {low:g}"
        raise UserError(f"{where}: {key} must be a number {bounds}, got {value!r}")
    return float(value)


def _normalize_optimizer(value: dict, where: str) -> dict:
    """Check every option of every optimizer block (types included), so a typo fails before
    any model loads, the same way on both backends."""
    out = {}
    every_option = {o for options in OPTIMIZER_OPTIONS.values() for o in options}
    for name, options in (value or {}).items():
        if name in every_option:
            raise UserError(
                f"{where}: optimizer_config is keyed by optimizer name: write "
                f"optimizer_config: {{adamw: {{{name}: ...}}}} (as mlx-lm), not a flat "
                f"'optimizer_config.{name}'"
            )
        if name not in OPTIMIZER_OPTIONS:
            raise UserError(
                f"{where}: unknown optimizer 'optimizer_config.{name}', "
                f"{_closest(name, OPTIMIZER_OPTIONS)}"
            )
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise UserError(f"{where}: optimizer_config.{name} must be a mapping of options")
        checked = {}
        for key, v in options.items():
            path = f"optimizer_config.{name}.{key}"
            if key not in OPTIMIZER_OPTIONS[name]:
                raise UserError(
                    f"{where}: {path}: not an option of {name} "
                    f"(options: {', '.join(OPTIMIZER_OPTIONS[name])})"
                )
            if key == "betas":
                if not isinstance(v, (list, tuple)) or len(v) != 2:
                    raise UserError(f"{where}: {path} must be two numbers, e.g. [0.9, 0.999]")
                checked[key] = [_number(b, where, path, 0.0, 1.0) for b in v]
            elif key in ("eps", "momentum", "dampening"):
                checked[key] = _number(v, where, path, 0.0)
            elif key == "nesterov":
                if not isinstance(v, bool):
                    raise UserError(f"{where}: {path} must be true or false")
                checked[key] = v
            elif v is not True:  # bias_correction
                raise UserError(
                    f"{where}: {path}: both backends always bias-correct (as torch); remove the key"
                )
        out[name] = checked
    return out


HF_DATASET_KEYS = (
    "path",
    "name",
    "config",
    "train_split",
    "valid_split",
    "test_split",
    "text_feature",
    "prompt_feature",
    "completion_feature",
    "chat_feature",
)


def _normalize_hf_dataset(value: Any, where: str) -> Any:
    """mlx-lm's `hf_dataset`: one mapping or a list of them, each with a `path` (hub id or local);
    split and feature names are strings, `config` the extra keyword arguments of load_dataset."""
    if value is None:
        return None
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise UserError(
            f"{where}: hf_dataset is an empty list; give a mapping like {{path: org/name}}"
        )
    for i, entry in enumerate(entries):
        at = "hf_dataset" + (f"[{i}]" if isinstance(value, list) else "")
        if not isinstance(entry, dict):
            raise UserError(
                f"{where}: {at} must be a mapping like {{path: org/name, train_split: train}}"
            )
        for key in entry:
            if key not in HF_DATASET_KEYS:
                raise UserError(
                    f"{where}: unknown key '{at}.{key}', {_closest(key, HF_DATASET_KEYS)}"
                )
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise UserError(f"{where}: {at}.path must be a dataset id (org/name) or a local path")
        for key in HF_DATASET_KEYS[1:]:
            if key != "config" and entry.get(key) is not None and not isinstance(entry[key], str):
                raise UserError(f"{where}: {at}.{key} must be a string, got {entry[key]!r}")
        if entry.get("config") is not None and not isinstance(entry["config"], dict):
            raise UserError(f"{where}: {at}.config must be a mapping of load_dataset arguments")
    return value


def _normalize_prompts(value: Any, where: str) -> Any:
    """eval_prompts: a list of strings, or the path of a file with them (read when training
    starts, after the tokenizer is loaded)."""
    if value is None or isinstance(value, str):
        return _expand(value)
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise UserError(
            f"{where}: eval_prompts must be a list of non-empty strings, or a file path "
            "(.txt: one prompt per line, .jsonl/.json: records with a prompt)"
        )
    return value


def _normalize_report_to(value: Any, where: str) -> list:
    """`wandb`, `tensorboard,mlflow`, a list of names, or `none` -> a list of tracker names."""
    from mlxft.training.trackers import NAMES

    items = value if isinstance(value, (list, tuple)) else [value] if value is not None else []
    names = []
    for item in items:
        if not isinstance(item, str):
            raise UserError(
                f"{where}: report_to must be tracker names ({', '.join(NAMES)}), got {item!r}"
            )
        names += [n.strip().lower() for n in item.split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in NAMES:
            hint = difflib.get_close_matches(name, NAMES, n=1, cutoff=0.5)
            raise UserError(
                f"{where}: report_to '{name}' is not a tracker; choose from {', '.join(NAMES)}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
    return list(dict.fromkeys(names))


def _expand(path: str | None) -> str | None:
    if path is None or "{{" in path or "{%" in path:  # an inline jinja template, not a path
        return None if path is None else path
    return os.path.expanduser(os.path.expandvars(path))


def build_config(
    config_file: str | None = None,
    overrides: dict | None = None,
    lora_overrides: dict | None = None,
) -> Config:
    """YAML values, then CLI overrides (a flag beats its key), then validation.
    `lora_overrides` (--rank/--alpha/--dropout/--lora-keys) merge into `lora_parameters`."""
    raw: dict = {}
    sources: dict = {}
    if config_file:
        where = str(config_file)
        for key, value in read_yaml(config_file).items():
            raw[key] = value
            sources[key] = where
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
            sources[key] = f"--{key.replace('_', '-')}"
    if lora_overrides:
        merged = dict(raw.get("lora_parameters") or {})
        if "alpha" in lora_overrides:
            merged.pop("scale", None)
        merged.update(lora_overrides)
        raw["lora_parameters"] = merged
        sources.setdefault("lora_parameters", "command line")
    values = {}
    for key, value in raw.items():
        where = sources[key]
        if not isinstance(key, str):
            raise UserError(
                f"{where}: key {key!r} is not an option name; keys are names like learning_rate"
            )
        if key not in FIELDS:
            raise UserError(f"{where}: unknown key '{key}', {_closest(key, FIELDS)}")
        values[key] = _check_type(key, value, where)
    cfg = Config(**values)
    where_of = lambda key: sources.get(key, config_file or "mlxft lora")  # noqa: E731
    cfg.lr_schedule = _normalize_schedule(cfg.lr_schedule, where_of("lr_schedule"))
    cfg.lora_parameters = _normalize_lora(cfg.lora_parameters or {}, where_of("lora_parameters"))
    cfg.optimizer_config = _normalize_optimizer(cfg.optimizer_config, where_of("optimizer_config"))
    cfg.hf_dataset = _normalize_hf_dataset(cfg.hf_dataset, where_of("hf_dataset"))
    cfg.eval_prompts = _normalize_prompts(cfg.eval_prompts, where_of("eval_prompts"))
    cfg.report_to = _normalize_report_to(cfg.report_to, where_of("report_to"))
    for key in _PATH_KEYS:
        setattr(cfg, key, _expand(getattr(cfg, key)))
    _validate(cfg, where_of)
    unused = sorted(set(cfg.optimizer_config) - {cfg.optimizer})
    if unused:
        warnings.warn(
            f"{where_of('optimizer_config')}: optimizer_config.{unused[0]} is not used: the "
            f"optimizer is {cfg.optimizer} (its options go under optimizer_config.{cfg.optimizer})",
            UserWarning,
            stacklevel=2,
        )
    return cfg


def _validate_preference(cfg: Config, need) -> None:
    need(
        cfg.train_mode in TRAIN_MODES,
        "train_mode",
        f"train_mode must be one of {', '.join(TRAIN_MODES)}, got '{cfg.train_mode}'",
    )
    need(cfg.beta > 0, "beta", f"beta must be > 0, got {cfg.beta}")
    need(
        0 <= cfg.label_smoothing < 0.5,
        "label_smoothing",
        f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}",
    )
    need(
        cfg.label_smoothing == 0 or cfg.train_mode == "dpo",
        "label_smoothing",
        "label_smoothing applies to train_mode dpo only; remove it or set train_mode: dpo",
    )
    need(
        cfg.rpo_alpha is None or cfg.rpo_alpha > 0,
        "rpo_alpha",
        f"rpo_alpha must be > 0 (or unset for plain DPO), got {cfg.rpo_alpha}",
    )
    need(
        cfg.rpo_alpha is None or cfg.train_mode == "dpo",
        "rpo_alpha",
        "rpo_alpha applies to train_mode dpo only (ORPO's objective has its NLL term already)",
    )
    need(
        not cfg.precompute_ref_log_probs or cfg.train_mode == "dpo",
        "precompute_ref_log_probs",
        "precompute_ref_log_probs applies to train_mode dpo only (ORPO has no reference model)",
    )
    need(
        cfg.max_prompt_length is None or 1 <= cfg.max_prompt_length < cfg.max_seq_length,
        "max_prompt_length",
        f"max_prompt_length must be at least 1 and below max_seq_length ({cfg.max_seq_length}), "
        f"got {cfg.max_prompt_length}",
    )


def _validate(cfg: Config, where_of) -> None:
    def need(ok: bool, key: str, message: str):
        if not ok:
            raise UserError(f"{where_of(key)}: {message}")

    need(
        cfg.backend in BACKENDS,
        "backend",
        f"backend must be one of {', '.join(BACKENDS)}, got '{cfg.backend}'",
    )
    need(
        cfg.fine_tune_type in FINE_TUNE_TYPES,
        "fine_tune_type",
        f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got '{cfg.fine_tune_type}'",
    )
    need(
        cfg.optimizer in OPTIMIZERS,
        "optimizer",
        f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{cfg.optimizer}'",
    )
    need(
        cfg.dtype in DTYPES, "dtype", f"dtype must be one of {', '.join(DTYPES)}, got '{cfg.dtype}'"
    )
    need(
        cfg.max_seq_length >= 2,
        "max_seq_length",
        f"max_seq_length must be at least 2, got {cfg.max_seq_length}",
    )
    need(cfg.batch_size >= 1, "batch_size", f"batch_size must be at least 1, got {cfg.batch_size}")
    need(
        cfg.grad_accumulation_steps >= 1,
        "grad_accumulation_steps",
        "grad_accumulation_steps must be at least 1",
    )
    need(
        cfg.learning_rate > 0,
        "learning_rate",
        f"learning_rate must be > 0, got {cfg.learning_rate}",
    )
    need(cfg.weight_decay >= 0, "weight_decay", "weight_decay must be >= 0")
    need(cfg.iters is None or cfg.iters >= 1, "iters", "iters must be at least 1")
    need(cfg.epochs is None or cfg.epochs >= 1, "epochs", "epochs must be at least 1")
    need(
        cfg.num_layers == -1 or cfg.num_layers >= 1,
        "num_layers",
        "num_layers must be -1 (all) or at least 1",
    )
    need(0 < cfg.valid_split < 1, "valid_split", "valid_split must be between 0 and 1")
    need(cfg.steps_per_report >= 1, "steps_per_report", "steps_per_report must be at least 1")
    need(cfg.steps_per_eval >= 1, "steps_per_eval", "steps_per_eval must be at least 1")
    need(cfg.save_every >= 1, "save_every", "save_every must be at least 1")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "keep_checkpoints must be at least 1")
    need(
        cfg.grad_clip is None or cfg.grad_clip > 0, "grad_clip", "grad_clip must be > 0 (or unset)"
    )
    need(
        cfg.distributed_timeout > 0,
        "distributed_timeout",
        f"distributed_timeout must be > 0 seconds, got {cfg.distributed_timeout}",
    )
    need(
        cfg.quantize in (None, 4, 8),
        "quantize",
        f"quantize must be 4 or 8 bits, got {cfg.quantize}",
    )
    need(
        cfg.use_chat_template in ("auto", "true", "false"),
        "use_chat_template",
        "use_chat_template must be auto, true or false",
    )
    need(
        cfg.val_batches == -1 or cfg.val_batches >= 1,
        "val_batches",
        "val_batches must be -1 (all) or at least 1",
    )
    need(
        cfg.test_batches == -1 or cfg.test_batches >= 1,
        "test_batches",
        "test_batches must be -1 (all) or at least 1",
    )
    need(cfg.eval_max_tokens >= 1, "eval_max_tokens", "eval_max_tokens must be at least 1")
    if cfg.train:  # a missing tracker package is found now, before any model loads
        from mlxft.training.trackers import missing

        for name in cfg.report_to:
            problem = missing(name)
            need(problem is None, "report_to", problem or "")
    _validate_preference(cfg, need)
    need(
        cfg.early_stopping_patience is None or cfg.early_stopping_patience >= 1,
        "early_stopping_patience",
        "early_stopping_patience must be at least 1 evaluation (or unset to never stop early)",
    )
    need(
        cfg.early_stopping_min_delta >= 0,
        "early_stopping_min_delta",
        "early_stopping_min_delta must be >= 0",
    )
    # what a backend cannot do, decided here so a run fails before it touches any file
    need(
        cfg.backend == "mlx" or cfg.quantize is None,
        "quantize",
        "quantize (QLoRA) is only supported by the MLX backend; drop --quantize or use --backend "
        "mlx",
    )
    # mx.checkpoint re-draws dropout masks when it recomputes a block, so the gradients would
    # belong to other masks than the loss
    need(
        not (
            cfg.backend == "mlx"
            and cfg.grad_checkpoint
            and cfg.fine_tune_type != "full"
            and cfg.lora_dropout > 0
        ),
        "grad_checkpoint",
        "grad_checkpoint with lora_parameters.dropout > 0 gives wrong gradients on the MLX backend "
        "(the recomputation draws new dropout masks); set dropout: 0.0, turn grad_checkpoint off, "
        "or use --backend torch",
    )
    if cfg.train or cfg.test:
        need(
            cfg.model is not None,
            "model",
            "no model: pass --model PATH_OR_HUB_ID or set 'model' in the config",
        )
        need(
            cfg.data is not None or cfg.hf_dataset is not None,
            "data",
            "no data: pass --data DIR_OR_FILE or set 'data' in the config",
        )


def total_iters(cfg: Config, batches_per_epoch: int) -> int:
    """`iters` wins; else `epochs` × optimizer steps per epoch; else 1000 (mlx-lm's default)."""
    if cfg.iters is not None:
        return cfg.iters
    if cfg.epochs is not None:
        return max(1, cfg.epochs * batches_per_epoch // cfg.grad_accumulation_steps)
    return 1000


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config, as YAML that `--config` reads back (written atomically)."""
    from mlxft.fileio import write_text

    data = cfg.to_dict()
    # alpha is derived (scale * rank); writing both would make the file refuse to load
    data["lora_parameters"] = {
        k: v for k, v in (data.get("lora_parameters") or {}).items() if k != "alpha"
    }
    write_text(path, yaml.safe_dump(data, sort_keys=False))
