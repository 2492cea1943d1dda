"""Config schema: YAML + flags, mlx-lm names, validation messages."""

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.config import build_config, total_iters
from mlxft.errors import UserError


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_values_flags_override_and_float_parsing(tmp_path):
    cfg = build_config(
        write(tmp_path, "learning_rate: 1e-5\nbatch_size: 8\niters: 50\n"), {"batch_size": 2}
    )
    assert cfg.learning_rate == pytest.approx(1e-5)  # YAML 1.1 would read a string
    assert cfg.batch_size == 2 and cfg.iters == 50


def test_mlx_lm_lora_parameters_scale_and_alpha(tmp_path):
    cfg = build_config(write(tmp_path, "lora_parameters: {rank: 8, scale: 20.0, dropout: 0.1}\n"))
    assert (cfg.lora_rank, cfg.lora_scale, cfg.lora_alpha, cfg.lora_dropout) == (
        8,
        20.0,
        160.0,
        0.1,
    )
    cfg = build_config(write(tmp_path, "lora_parameters: {rank: 16, alpha: 32}\n"))
    assert cfg.lora_scale == 2.0
    # --alpha on the command line replaces a YAML scale
    cfg = build_config(
        write(tmp_path, "lora_parameters: {rank: 8, scale: 20.0}\n"), None, {"alpha": 8.0}
    )
    assert cfg.lora_scale == 1.0


def test_schedule_aliases_and_warmup(tmp_path):
    cfg = build_config(write(tmp_path, "lr_schedule: {name: cosine_decay, warmup: 10}\n"))
    assert cfg.lr_schedule["name"] == "cosine" and cfg.lr_schedule["warmup"] == 10
    assert build_config(None, {"lr_schedule": "linear"}).lr_schedule["name"] == "linear"


def test_paths_expand_home_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXFT_TEST_DIR", str(tmp_path))
    cfg = build_config(write(tmp_path, "adapter_path: $MLXFT_TEST_DIR/out\ndata: ~/data\n"))
    assert cfg.adapter_path == f"{tmp_path}/out"
    assert not cfg.data.startswith("~")


def test_epochs_to_iters():
    cfg = build_config(None, {"epochs": 3, "grad_accumulation_steps": 2})
    assert total_iters(cfg, batches_per_epoch=10) == 15
    assert total_iters(build_config(None, {}), 10) == 1000


@pytest.mark.parametrize(
    "text, needle",
    [
        ("learning_rat: 0.1\n", "unknown key 'learning_rat', did you mean 'learning_rate'?"),
        ("batch_size: four\n", "key 'batch_size' must be a whole number, got 'four'"),
        ("lora_parameters: {rank: 0}\n", "lora_parameters.rank must be a whole number > 0"),
        ("lora_parameters: {rnk: 8}\n", "unknown key 'lora_parameters.rnk', did you mean 'rank'?"),
        ("max_seq_length: 1\n", "max_seq_length must be at least 2"),
        (
            "lr_schedule: exponential\n",
            "lr_schedule.name 'exponential' is not one of constant, linear, cosine",
        ),
        ("optimizer: lion\n", "optimizer must be one of adamw, adam, sgd"),
        ("train: yes please\n", "key 'train' must be true or false"),
        ("batch_size: [1\n", "invalid YAML"),
        ("- a\n- b\n", "a config must be a mapping"),
    ],
)
def test_bad_config_messages(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        build_config(path)
    assert needle in str(err.value)
    assert str(err.value).startswith(path)  # names the file


def test_yaml_error_names_line(tmp_path):
    path = write(tmp_path, "iters: 10\nbatch_size: [1\n")
    with pytest.raises(UserError, match=r"cfg.yaml:\d+: invalid YAML"):
        build_config(path)


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, "lerning_rate: 0.1\n")
    result = CliRunner().invoke(main, ["lora", "--config", path, "--train"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert (
        len(lines) == 1
        and lines[0].startswith("Error: ")
        and "did you mean 'learning_rate'" in lines[0]
    )
    assert "Traceback" not in result.output


def test_cli_flag_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["lora", "--train", "--model", "x", "--data", "y", "--rank", "0"])
    assert result.exit_code == 2 and "rank must be a whole number > 0" in result.output
    result = runner.invoke(main, ["lora", "--model", "x"])
    assert result.exit_code == 2 and "nothing to do" in result.output


def test_every_key_is_type_checked(tmp_path):
    """Each field's annotation maps to a check (a new spelling such as `int | None` must not
    silently drop one)."""
    from mlxft import config

    checked = config._BOOL_KEYS | config._INT_KEYS | config._FLOAT_KEYS | config._STR_KEYS
    assert set(config.FIELDS) - checked == {
        "lr_schedule",
        "lora_parameters",
        "optimizer_config",
        "hf_dataset",  # checked by _normalize_hf_dataset
        "eval_prompts",  # checked by _normalize_prompts
        "report_to",  # checked by _normalize_report_to
    }
    for key, bad, expected in (
        ("iters", "ten", "a whole number"),
        ("grad_clip", "x", "a number"),
        ("device", 3, "a string"),
        ("resume", "maybe", "true or false"),
    ):
        with pytest.raises(UserError, match=f"key '{key}' must be {expected}"):
            build_config(write(tmp_path, f"{key}: {bad}\n"))
