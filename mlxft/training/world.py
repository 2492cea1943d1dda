"""The processes one training run spans, as its launcher describes them.  No tensor code.

A data-parallel run is started by the tensor engine's own launcher, one process per rank:
`mlx.launch` for the MLX backend (ring over TCP, JACCL over Thunderbolt RDMA, NCCL, MPI) and
`torchrun` for the torch backend (gloo on the CPU, NCCL on CUDA).  `detect` reads the world
from the launcher's variables once (`mlxft.flags.launcher_env`); a plain process is `World()`,
rank 0 of 1, and imports nothing distributed.  The backend connects the ranks and runs every
collective (tensor code, behind `mlxft.backend.Backend`); what is the same for both lives here:
who the ranks are, which rows each one trains on, bounded waits (`mlxft.training.watchdog`) and
the check that every rank starts from the same place.

Global and per rank:
- `batch_size` is the global batch: every step each rank trains on its contiguous share of the
  same length-sorted batch (`mlxft.data.batching.share`), so it must divide by the world size;
  DPO/ORPO shares pairs, a pair's chosen and rejected rows together
  (`mlxft.data.preference.share_pairs`);
- the backend sums gradients, token losses and trained-token counts over the ranks and divides
  by the global count, so the loss and the update are the single-process run's (to rounding);
- the data position, the step and the schedule are global (a checkpoint resumes on another
  world size with the same global batch); dropout draws are per rank (`dropout_seed`);
- rank 0 alone prints, writes metrics.jsonl, checkpoints and the adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft import flags
from mlxft.data.batching import share
from mlxft.data.preference import PairBatch, share_pairs
from mlxft.errors import UserError, engine_message

DEFAULT_TIMEOUT = 600.0  # seconds; Config.distributed_timeout's default


@dataclass
class World:
    """This process's place among the ranks of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank among the processes on this machine (which GPU to use)
    launcher: str | None = None  # 'mlx.launch' or 'torchrun'
    transport: str | None = None  # mx.distributed's backend: ring, jaccl, nccl or mpi
    timeout: float = DEFAULT_TIMEOUT
    watchdog: object = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def describe(self, backend: str, batch_size: int) -> str:
        """The run header's line on the world."""
        via = f"{self.launcher}, {self.transport}" if self.transport else self.launcher
        return (
            f"World: {self.size} processes ({via}), backend {backend}; batch_size {batch_size} is "
            f"global: {batch_size // self.size} rows per process per step; rank 0 writes the files"
        )

    def share(self, batch):
        """This rank's rows of a global batch (the batch itself in one process); of a pair
        batch, its pairs, each with its chosen and rejected row."""
        if isinstance(batch, PairBatch):
            return share_pairs(batch, self.rank, self.size)
        return share(batch, self.rank, self.size)

    def guard(self, what: str):
        """A bounded wait for a collective (nothing in one process)."""
        return self.watchdog.guard(what) if self.watchdog else contextlib.nullcontext()

    @contextlib.contextmanager
    def collective(self, what: str):
        """One collective of either backend: inside the watchdog's bound, and a peer lost
        during it (the engine raises RuntimeError) is one line with the way to continue."""
        with self.guard(what):
            try:
                yield
            except RuntimeError as err:
                raise UserError(
                    f"lost another rank during {what} ({engine_message(err)}): "
                    "it died or was stopped (see its error); continue with --resume from the "
                    "last checkpoint"
                ) from None

    def at(self, where: str) -> None:
        """Where the run is (`step 7`), for the watchdog's message."""
        if self.watchdog:
            self.watchdog.where = where

    def dropout_seed(self, seed: int) -> int:
        """Rank 0 keeps the run's seed (one process draws as before); every other rank gets its
        own stream, so the ranks' dropout masks are independent draws."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1, np.uint32)[0])


# --------------------------------------------------------------------------- detection
def detect(cfg) -> World:
    """The world the launcher started this process in (`read_world`), with its watchdog
    running when there is more than one rank.  Called once, before any data or model loads."""
    world = read_world(cfg, flags.launcher_env())
    if world.distributed:
        from mlxft.training.watchdog import Watchdog

        hint = (
            "mlx's ring backend can hang in all_sum: ml-explore/mlx#4475"
            if world.transport == "ring"
            else ""
        )
        world.watchdog = Watchdog(world.timeout, hint).start()
    return world


def read_world(cfg, env: dict) -> World:
    """The world described by the launcher variables `env`, checked against `cfg`: the
    launcher must be the backend's own, and batch_size must divide by the world size."""
    mlx, torch = _mlx_world(env), _torch_world(env)
    ours, other = (mlx, torch) if cfg.backend == "mlx" else (torch, mlx)
    if ours is None and other is not None and other.size > 1:
        need = "mlx.launch" if cfg.backend == "mlx" else "torchrun"
        switch = "torch" if cfg.backend == "mlx" else "mlx"
        raise UserError(
            f"started by {other.launcher} with {other.size} processes, but backend is "
            f"{cfg.backend}: start backend {cfg.backend} with {need}, or pass --backend {switch}",
            every_rank=True,
        )
    if ours is None:
        return World(timeout=cfg.distributed_timeout)
    ours.timeout = cfg.distributed_timeout
    if ours.size > 1 and cfg.batch_size % ours.size:
        raise UserError(
            f"batch_size {cfg.batch_size} does not divide evenly over the {ours.size} processes "
            f"{ours.launcher} started: use a multiple of {ours.size} (batch_size is the global "
            f"batch; each process trains on batch_size / {ours.size} rows per step)",
            every_rank=True,
        )
    return ours


def _int(env: dict, name: str) -> int:
    try:
        value = int(env[name])
    except ValueError:
        raise UserError(
            f"{name}={env[name]!r}: the launcher's rank variable must be a whole number"
        ) from None
    if value < 0:
        raise UserError(f"{name}={value}: the launcher's rank variable must be >= 0")
    return value


def _ranks_in(env: dict, name: str) -> int:
    """Ranks listed in a JSON file mlx.launch wrote (one entry per rank; empty: one host)."""
    path = Path(env[name])
    try:
        text = path.read_text().strip()
        return len(json.loads(text)) if text else 1
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{name}={path}: cannot read mlx.launch's host list ({err})") from None


def _checked(world: World, rank_var: str) -> World:
    if world.rank >= world.size:
        raise UserError(
            f"{rank_var}={world.rank} but the launcher started {world.size} processes; start the "
            f"run with {world.launcher} rather than setting its variables by hand"
        )
    return world


def _mlx_world(env: dict) -> World | None:
    """mlx.launch: MLX_RANK plus the transport's own description of the ranks; mpirun: OMPI_*."""
    if "MLX_RANK" in env:
        rank = _int(env, "MLX_RANK")
        if "MLX_WORLD_SIZE" in env:
            size, transport = _int(env, "MLX_WORLD_SIZE"), "nccl"
        elif "MLX_IBV_DEVICES" in env:
            size, transport = _ranks_in(env, "MLX_IBV_DEVICES"), "jaccl"
        elif "MLX_HOSTFILE" in env:
            size, transport = _ranks_in(env, "MLX_HOSTFILE"), "ring"
        else:
            return None
        return _checked(World(rank, size, rank, "mlx.launch", transport), "MLX_RANK")
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        return _checked(World(rank, size, rank, "mpirun", "mpi"), "OMPI_COMM_WORLD_RANK")
    return None


def _torch_world(env: dict) -> World | None:
    """torchrun (and torch.distributed.launch): RANK, WORLD_SIZE, LOCAL_RANK."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    return _checked(World(rank, size, local, "torchrun"), "RANK")


# --------------------------------------------------------------------------- agreement
def fingerprint_number(fingerprint: dict) -> int:
    """A checkpoint fingerprint (model, data, settings) as one comparable integer."""
    text = json.dumps(fingerprint, sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:7], "little")


def check_same_start(world: World, backend, position, fingerprint: dict) -> None:
    """Every rank must train on the same data and model from the same step, or the all-reduce
    would sum gradients of different batches without a word.  One small all-gather."""
    if not world.distributed:
        return
    mine = np.array(
        [
            position.step,
            position.epoch,
            position.index,
            position.trained_tokens,
            fingerprint_number(fingerprint),
        ],
        dtype=np.int64,
    )
    rows = backend.all_gather(mine)
    for rank, row in enumerate(rows):
        if row[4] != rows[0][4]:
            raise UserError(
                f"rank {rank} does not train what rank 0 trains (model files, data or settings "
                "differ): every host needs the same model, data and config",
                every_rank=True,
            )
        if tuple(row[:4]) != tuple(rows[0][:4]):
            raise UserError(
                f"rank {rank} starts at step {row[0]} but rank 0 at step {rows[0][0]}: every "
                "host needs the same checkpoint (a shared or copied adapter_path) to resume",
                every_rank=True,
            )


# --------------------------------------------------------------------------- per-rank state
def gather_states(world: World, backend, state: dict) -> list:
    """Every rank's `state` ({name: numpy array}, the same names and shapes on every rank, e.g.
    RNG states) as a list indexed by rank; one all-gather of their bytes."""
    if not world.distributed:
        return [state]
    names = sorted(state)
    arrays = [np.ascontiguousarray(state[k]) for k in names]
    blob = np.frombuffer(b"".join(a.tobytes() for a in arrays), dtype=np.uint8)
    rows = backend.all_gather(blob)
    out = []
    for row in rows:
        row, parts, offset = np.asarray(row, np.uint8).tobytes(), {}, 0
        for name, a in zip(names, arrays):
            parts[name] = np.frombuffer(row[offset : offset + a.nbytes], a.dtype).reshape(a.shape)
            offset += a.nbytes
        out.append(parts)
    return out


# --------------------------------------------------------------------------- launching
LAUNCHERS = {"mlx": "mlx.launch", "torch": "torchrun"}


def free_port() -> int:
    """A TCP port nobody listens on now (the launchers' rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(backend: str, processes: int, command: list) -> list:
    """`command` started as `processes` local ranks by `backend`'s own launcher (the one next
    to this Python, else on PATH): what `mlxft bench --world-size` and the tests run."""
    import shutil
    import sys

    name = LAUNCHERS[backend]
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise UserError(f"{name} is not installed: it comes with the {backend} package")
    if backend == "mlx":  # ring over loopback; one port per rank from a free one
        port = str(free_port())
        return [found, "-n", str(processes), "--backend", "ring", "-p", port, "--", *command]
    return [found, "--standalone", "--nproc-per-node", str(processes), "--no-python", *command]
