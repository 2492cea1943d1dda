import os
import shutil
from pathlib import Path

import pytest

import mlxft  # noqa: F401  (loads OpenBLAS before any test imports mlx.core)
from tests.tiny_models import FAMILIES, build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "examples" / "models" / "stories260K"
WIKISQL = REPO / "examples" / "data" / "wikisql"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: path} of tiny random HF models (llama, qwen2, mistral, phi3)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_model(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture
def stories(tmp_path):
    """A writable copy of the shipped stories260K model."""
    dst = tmp_path / "stories260K"
    shutil.copytree(STORIES, dst)
    return dst


@pytest.fixture
def wikisql_small(tmp_path):
    """train/valid/test jsonl with a few WikiSQL rows."""
    out = tmp_path / "wikisql"
    out.mkdir()
    train = (WIKISQL / "train.jsonl").read_text().splitlines()
    valid = (WIKISQL / "valid.jsonl").read_text().splitlines()
    (out / "train.jsonl").write_text("\n".join(train[:64]) + "\n")
    (out / "valid.jsonl").write_text("\n".join(valid[:16]) + "\n")
    (out / "test.jsonl").write_text("\n".join(valid[16:32]) + "\n")
    return out
