import os
import shutil
import tempfile
from pathlib import Path

import pytest

try:  # torch binds its own BLAS entry points before OpenBLAS joins the process (see below)
    import torch

    torch.bmm(torch.ones(2, 3, 3), torch.ones(2, 3, 3))
    torch.ones(3, 3) @ torch.ones(3, 3)
except ImportError:
    pass

# The tests mix MLX and torch in one process, which mlxft itself never does: it loads OpenBLAS
# process-wide for MLX only in processes that import MLX (mlxft/cpu/blas.py), and OpenBLAS's
# cblas_sgemm_batch then takes over torch's batched matmuls and can crash.  Calling torch's
# matmuls once first binds them to torch's own BLAS for the rest of the session.
import mlxft  # noqa: E402, F401  (loads OpenBLAS before any test imports mlx.core)
from tests.tiny_models import FAMILIES, build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` caches what it reads (Parquet, CSV, hub ids): keep the tests' copies out of ~/.cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mlxft-test-datasets-"))

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread: two OpenMP threads spin against each other on a busy two-core
    runner (measured 30x slower).  `pytest.mark.usefixtures("one_torch_thread")` to use it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_wikisql(out: Path, train: int, valid: int) -> Path:
    """train/valid.jsonl with the first rows of the shipped WikiSQL sample."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        lines = (WIKISQL / f"{name}.jsonl").read_text().splitlines()[:rows]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out
