"""The MLX side of data parallelism: `mx.distributed` under the world's bounded waits.

`mlx.launch` starts the ranks and describes them in the environment (`mlxft.training.world`);
`mx.distributed.init` connects them over the transport it names (ring, JACCL, NCCL, MPI).
Each optimizer step makes one all-reduce (more only for full fine-tunes above `CHUNK`
elements): every gradient, flattened into one float32 buffer, with the step's loss sum, token
count and stop vote appended, so the ranks agree on all four in one collective.  Fewer calls
mean less latency and fewer chances to meet ml-explore/mlx#4475, a ring `all_sum` that never
returns; `World.guard` bounds each call in any case.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.errors import UserError, engine_message

CHUNK = 1 << 26  # float32 elements per all_sum call (256 MB): bounds the extra buffer's memory


class Collectives:
    """The connected group of an `mlx.launch` world, and the seconds spent in it."""

    def __init__(self, world):
        self.world = world
        self.seconds = 0.0
        # the GPU stream variant of the ring all_sum is the one that crashes (mlx#4475); NCCL
        # needs the GPU's
        self.stream = None if world.transport == "nccl" else mx.cpu
        with world.guard("connecting to the other ranks"):
            try:
                self.group = mx.distributed.init(strict=True, backend=world.transport)
            except (RuntimeError, ValueError) as err:
                raise UserError(
                    f"mx.distributed cannot start its {world.transport} backend "
                    f"({engine_message(err)}); start the run with mlx.launch"
                ) from None
        if (self.group.rank(), self.group.size()) != (world.rank, world.size):
            raise UserError(
                f"mx.distributed sees rank {self.group.rank()} of {self.group.size()} but "
                f"{world.launcher} started {world.label}: start the run with mlx.launch",
                every_rank=True,
            )

    def _run(self, what: str, make) -> mx.array:
        """One collective, evaluated inside the watchdog's bound; a lost peer is one line."""
        tic = time.perf_counter()
        with self.world.collective(what):
            out = make()
            mx.eval(out)
        self.seconds += time.perf_counter() - tic
        return out

    def _all_sum(self, what: str, x: mx.array) -> mx.array:
        return self._run(
            what, lambda: mx.distributed.all_sum(x, group=self.group, stream=self.stream)
        )

    def step(self, grads, total, count, stop: bool) -> tuple:
        """(grads, loss sum, token count, stop) summed over the ranks, in one all-reduce."""
        scalars = mx.stack(
            [total.astype(mx.float32), count.astype(mx.float32), mx.array(float(stop))]
        )
        grads, summed = self.reduce(grads, scalars)
        total, count, votes = summed[0], summed[1], summed[2]
        return grads, total, count, bool(votes.item() > 0)

    def reduce(self, grads, scalars: mx.array) -> tuple:
        """(grads, scalars) summed over the ranks in one all-reduce: every gradient flattened
        into one float32 buffer with the step's scalars (sums, counts, the stop vote) after."""
        flat = tree_flatten(grads)
        tail = scalars.astype(mx.float32).reshape(-1)
        buffer = mx.concatenate([g.reshape(-1).astype(mx.float32) for _, g in flat] + [tail])
        mx.eval(buffer)  # the local work first: the watchdog bounds the collective alone
        n = buffer.size
        parts = [
            self._all_sum("the gradient all-reduce", buffer[i : i + CHUNK])
            for i in range(0, n, CHUNK)
        ]
        summed = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        out, offset = [], 0
        for key, g in flat:
            out.append((key, summed[offset : offset + g.size].reshape(g.shape).astype(g.dtype)))
            offset += g.size
        return tree_unflatten(out), summed[offset:]

    def all_gather(self, values: np.ndarray) -> np.ndarray:
        """Every rank's `values` stacked (size, ...), moved as bytes (every transport sums and
        gathers uint8; not every one has float64)."""
        values = np.ascontiguousarray(values)
        raw = mx.array(values.reshape(-1).view(np.uint8))[None]
        out = self._run(
            "an all-gather",
            lambda: mx.distributed.all_gather(raw, group=self.group, stream=self.stream),
        )
        rows = np.array(out, dtype=np.uint8)
        return rows.view(values.dtype).reshape((self.world.size, *values.shape))
