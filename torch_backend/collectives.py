"""The torch side of data parallelism: `torch.distributed` under the world's bounded waits.

`torchrun` starts the ranks and describes them in the environment (`mlxft.training.world`);
`init_process_group` connects them, gloo on the CPU and NCCL on CUDA (MPS has no collective
backend in torch).  An explicit all-reduce rather than DistributedDataParallel: the trainer
sums token losses and divides by the world's trained-token count after the reduction, which
DDP's gradient averaging (a mean over ranks of per-rank means) cannot express; and one buffer
per step (every gradient, then the step's loss sum, token count and stop vote) is one
collective, where DDP's buckets would be several.
"""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from mlxft.errors import UserError, engine_message

# torch's own timeout is a backstop a little behind the world's watchdog, whose message is ours
BACKSTOP_SECONDS = 5.0


class Collectives:
    """The process group of a `torchrun` world, and the seconds spent in it."""

    def __init__(self, world, device: torch.device):
        self.world = world
        self.seconds = 0.0
        self.device = device
        if device.type == "mps":
            raise UserError(
                "torch has no collective backend for mps: pass --device cpu to train on "
                "several processes with torchrun, or use the MLX backend with mlx.launch",
                every_rank=True,
            )
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_available():
            raise UserError("this torch build has no torch.distributed", every_rank=True)
        timeout = timedelta(seconds=world.timeout + BACKSTOP_SECONDS)
        with world.guard("connecting to the other ranks"):
            try:
                dist.init_process_group(
                    self.backend, rank=world.rank, world_size=world.size, timeout=timeout
                )
            except (RuntimeError, ValueError) as err:
                raise UserError(
                    f"torch.distributed cannot connect the ranks "
                    f"({engine_message(err)}); start the run with torchrun"
                ) from None

    def _run(self, what: str, fn) -> None:
        """One collective inside the watchdog's bound; a lost peer is one line."""
        tic = time.perf_counter()
        with self.world.collective(what):
            fn()
            if self.device.type == "cuda":  # NCCL only queues the work: wait for it here
                torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - tic

    def step(self, params: list, total: torch.Tensor, count: int, stop: bool) -> tuple:
        """Sum every parameter's gradient (a rank with no rows has none: zeros), the loss sum,
        the token count and the stop vote over the ranks, in one all-reduce.  Returns
        (loss sum tensor, token count, stop); the summed gradients are left in `p.grad`."""
        scalars = torch.tensor([0.0, float(count), float(stop)], device=total.device)
        scalars[0] = total
        summed = self.reduce(params, scalars)
        total, count, votes = summed[0], summed[1], summed[2]
        return total, int(round(count.item())), bool(votes.item() > 0)

    def reduce(self, params: list, scalars: torch.Tensor) -> torch.Tensor:
        """Every parameter's gradient (zeros where a rank has none) and `scalars` (sums, counts,
        the stop vote) summed over the ranks in one float32 all-reduce; the summed gradients
        are left in `p.grad`, the summed scalars returned."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        tail = scalars.to(self.device, torch.float32).reshape(-1)
        buffer = torch.cat([g.reshape(-1).float() for g in grads] + [tail])
        self._run("the gradient all-reduce", lambda: dist.all_reduce(buffer))
        offset = 0
        for p in params:
            p.grad = buffer[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return buffer[offset:]

    def all_gather(self, values: np.ndarray) -> np.ndarray:
        """Every rank's `values` stacked (size, ...), moved as bytes."""
        values = np.ascontiguousarray(values)
        mine = torch.from_numpy(values.reshape(-1).view(np.uint8).copy()).to(self.device)
        rows = [torch.empty_like(mine) for _ in range(self.world.size)]
        self._run("an all-gather", lambda: dist.all_gather(rows, mine))
        out = np.stack([r.cpu().numpy() for r in rows])
        return out.view(values.dtype).reshape((self.world.size, *values.shape))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
