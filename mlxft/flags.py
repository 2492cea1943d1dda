"""Every environment switch mlxft reads, each read here and nowhere else.

They exist for A/B measurements and for ruling a fast path out when debugging; the defaults
are what every run should use.  Each function reads the environment when called (not at import),
so a test or a benchmark can set a switch for one run.

| variable | values | effect |
| --- | --- | --- |
| `MLXFT_BLAS` | `reference` | keep the MLX wheel's reference BLAS on Linux (no OpenBLAS) |
| `MLXFT_MALLOC` | `system` | leave glibc's allocator thresholds alone during CPU training |
| `MLXFT_CPU_KERNELS` | `0` | MLX on the CPU: no chunked head loss, no power-exp attention |
| `MLXFT_COMPILE` | `0` / `1` | MLX: force eager or compiled steps (default: compiled on a GPU) |
| `MLXFT_HEAD_ROWS` | `0` | run the output head on every position, not only trained ones |
| `MLXFT_CPU_MATMUL` | `mkl` / `onednn` | torch on the CPU: force the library for frozen matmuls |
| `HF_HUB_OFFLINE` | `1` | Hugging Face's own switch: use the local cache, never the network |
| `WANDB_MODE` | `online` / `offline` | W&B's own switch; unset: `report_to: wandb` is offline |
| `WANDB_DIR` | a directory | W&B's own: where its run folders go (default: adapter_path) |
| `MLFLOW_TRACKING_URI` | a URI | MLflow's own: its store (default: sqlite in adapter_path) |

Launchers describe a data-parallel world in their own variables; mlxft only reads them
(`launcher_env`, interpreted by `mlxft.training.world`):

| variable | set by | meaning |
| --- | --- | --- |
| `MLX_RANK` | `mlx.launch` | this process's rank (ring, JACCL, NCCL) |
| `MLX_HOSTFILE` | `mlx.launch --backend ring` | a JSON file: one list of `ip:port` per rank |
| `MLX_IBV_DEVICES` | `mlx.launch --backend jaccl` | a JSON file: one row of RDMA devices per rank |
| `MLX_WORLD_SIZE` | `mlx.launch --backend nccl` | the number of ranks |
| `OMPI_COMM_WORLD_RANK`, `_SIZE` | `mpirun` (`mlx.launch --backend mpi`) | rank, size |
| `RANK`, `WORLD_SIZE`, `LOCAL_RANK` | `torchrun` | rank, size, rank on this machine |
"""

from __future__ import annotations

import os

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def _value(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def blas_reference() -> bool:
    """MLXFT_BLAS=reference: do not load OpenBLAS behind MLX."""
    return _value("MLXFT_BLAS") in ("reference", "off", "0", "none")


def malloc_system() -> bool:
    """MLXFT_MALLOC=system: keep glibc's default mmap/trim thresholds."""
    return _value("MLXFT_MALLOC") == "system"


def cpu_kernels() -> bool:
    """MLXFT_CPU_KERNELS (default on): MLX's CPU loss-head and attention paths."""
    return _value("MLXFT_CPU_KERNELS") not in _OFF


def compile_steps() -> bool | None:
    """MLXFT_COMPILE: True/False when set, None to let the device decide."""
    value = _value("MLXFT_COMPILE")
    return None if not value else value not in _OFF


def head_rows() -> bool:
    """MLXFT_HEAD_ROWS (default on): the output head runs on trained positions only."""
    return _value("MLXFT_HEAD_ROWS") not in _OFF


def cpu_matmul() -> str | None:
    """MLXFT_CPU_MATMUL: 'mkl' or 'onednn' when forced, None to measure and pick."""
    value = _value("MLXFT_CPU_MATMUL")
    return value if value in ("mkl", "onednn") else None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE: huggingface_hub's switch, read the same way for our own messages."""
    return _value("HF_HUB_OFFLINE") in _ON


def wandb_mode() -> str | None:
    """WANDB_MODE as set (W&B reads it itself); None when unset, so mlxft picks offline."""
    return os.environ.get("WANDB_MODE") or None


def wandb_dir() -> str | None:
    """WANDB_DIR as set (W&B reads it itself); None when unset, so runs go to adapter_path."""
    return os.environ.get("WANDB_DIR") or None


def mlflow_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI: the user's MLflow store, or None for our sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


# The launchers' variables, in the order `mlxft.training.world` consults them.
LAUNCHER_VARIABLES = (
    "MLX_RANK",
    "MLX_HOSTFILE",
    "MLX_IBV_DEVICES",
    "MLX_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
)


def launcher_env() -> dict:
    """{variable: value} of the launcher variables that are set (empty for a plain run)."""
    return {k: os.environ[k] for k in LAUNCHER_VARIABLES if k in os.environ}


def launch_rank() -> int:
    """This process's rank as its launcher set it (0 in a plain run); for message prefixes,
    before the world is checked (`mlxft.training.world.detect` checks it)."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0
