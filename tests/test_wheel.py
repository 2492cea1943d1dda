"""`pip install mlxft` as a user gets it: the sdist and wheel built with `python -m build`, the
wheel installed into a fresh virtual environment outside the repository, and mlxft run there
(dependencies come from this environment's site-packages; nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run(args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple:
    """(sdist, wheel, build log) built from a copy of the files git knows (as in a clone)."""
    pytest.importorskip("build")
    root = tmp_path_factory.mktemp("dist")
    src = root / "src"
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, capture_output=True, text=True).stdout
    for name in files.split():
        if (REPO / name).is_file() and not name.startswith(("tests/", "benchmarks/", "examples/")):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    out = root / "out"
    log = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=root)
    return next(out.glob("*.tar.gz")), next(out.glob("*.whl")), log.stdout + log.stderr


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; this environment's packages reachable by a path
    line (its own .pth files, e.g. the editable install's finder, are not executed)."""
    root = tmp_path_factory.mktemp("user")
    env_dir = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=root)
    python = env_dir / "bin" / "python"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            dist[1],
        ],
        cwd=root,
    )
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_wheel_holds_one_import_package_and_the_recipes(dist):
    names = zipfile.ZipFile(dist[1]).namelist()
    assert {n.split("/")[0] for n in names} == {"mlxft", "mlxft-0.1.0.dist-info"}
    for module in (
        "mlxft/convert/hf_to_mlx.py",
        "mlxft/torch_backend/backend.py",
        "mlxft/recipes/demo.yaml",
        "mlxft/recipes/alpaca_chat.yaml",
    ):
        assert module in names
    assert "license" not in dist[2].lower() or "deprecat" not in dist[2].lower(), dist[2]


def test_metadata_passes_twine_check(dist):
    pytest.importorskip("twine")
    out = run([sys.executable, "-m", "twine", "check", "--strict", *dist[:2]], cwd=dist[0].parent)
    assert out.stdout.count("PASSED") == 2, out.stdout


def test_installed_wheel_runs_outside_the_repo(venv, tiny_llama, wikisql_small, tmp_path):
    bin_dir, env = venv / "bin", user_env()
    where = run([bin_dir / "python", "-c", "import mlxft; print(mlxft.__file__)"], tmp_path, env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's, not the repo's
    assert "mlx " in run([bin_dir / "mlxft", "info"], tmp_path, env).stdout
    assert "demo" in run([bin_dir / "python", "-m", "mlxft", "recipes"], tmp_path, env).stdout
    assert "lora" in run([bin_dir / "python", "-m", "mlxft.cli", "--help"], tmp_path, env).stdout
    out = tmp_path / "adapter"
    train = run(
        [
            bin_dir / "mlxft",
            "lora",
            "--config",
            "demo",
            "--model",
            tiny_llama,
            "--data",
            wikisql_small,
            "--iters",
            "5",
            "--adapter-path",
            out,
            "--max-seq-length",
            "64",
            "--val-batches",
            "1",
        ],
        tmp_path,
        env,
    )
    assert "Iter 5" in train.stdout and (out / "adapter_model.safetensors").is_file()
    gen = run(
        [
            bin_dir / "mlxft",
            "generate",
            "--model",
            tiny_llama,
            "--adapter-path",
            out,
            "--prompt",
            "table:",
            "--max-tokens",
            "5",
            "--quiet",
        ],
        tmp_path,
        env,
    )
    assert gen.stdout.strip() != ""
