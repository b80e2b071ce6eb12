"""Data parallelism on torch.distributed: N processes (launched by torch's elastic launcher, ``torchrun``
or ``zoo run --nproc N``), each with a full copy of the models, each computing the gradient of its shard
of every batch; gradients are all-reduced before each optimizer step, so every rank takes the same step.

The convention that makes N ranks equal to one rank with the whole batch, exactly and for uneven shards:
a loss that is a mean over items (pairs, tokens) is written as

    (sum over this rank's items) * world_size / (number of items in the WHOLE batch)      `Dist.mean_loss`

and `rlhf_zoo.training.optimizer_step` averages the ranks' gradients, giving the gradient of the whole
batch's mean. Gradient accumulation follows from the same convention: each micro-batch's loss is its sum
over the step's total count, and the micro-batch gradients add up in ``.grad`` before the step.

gloo on CPU, NCCL on CUDA. A single process (no ``WORLD_SIZE`` in the environment, or 1) uses `SINGLE`,
whose operations are identities, so the single-process code path is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def bounds(self, n: int) -> tuple[int, int]:
        """Rows [lo, hi) of an ``n``-row batch owned by this rank (contiguous, sizes differ by at most 1)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of a batch of indices (the same ``idx`` on every rank)."""
        lo, hi = self.bounds(len(idx))
        return idx[lo:hi]

    def owned(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Of global row numbers ``rows`` (of an ``n``-row batch), those this rank holds, as local indices."""
        lo, hi = self.bounds(n)
        return rows[(rows >= lo) & (rows < hi)] - lo

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (a new tensor; ``x`` is unchanged)."""
        if not self.active:
            return x
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x) / self.world_size

    def mean_loss(self, local_sum: torch.Tensor, total_count: torch.Tensor | float) -> torch.Tensor:
        """The loss whose rank-averaged gradient is that of (sum over all ranks' items) / total_count."""
        return local_sum * self.world_size / total_count

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (same shape and dtype on each), stacked in rank order (on the CPU)."""
        if not self.active:
            return x.detach().cpu().unsqueeze(0)
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        parts = [torch.empty_like(x, device=device) for _ in range(self.world_size)]
        dist.all_gather(parts, x.detach().to(device))
        return torch.stack([p.cpu() for p in parts])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Dist()


def current() -> Dist:
    """The running job's `Dist` (`SINGLE` when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(device_type: str) -> Dist:
    """Join the job described by the launcher's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...): gloo on
    CPU, NCCL on CUDA. A no-op returning `SINGLE` outside a multi-process launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return current()


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks, in one flat buffer (a missing gradient counts
    as zeros, so every rank reduces the same buffer even when one had no item in a micro-batch)."""
    d = current()
    if not d.active or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
