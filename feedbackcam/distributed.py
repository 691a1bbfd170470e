"""Data-parallel training across processes (``torchrun``): one rank per GPU, or CPU with gloo.

``torchrun --nproc_per_node 4 -m feedbackcam.cli simulate ... --device cuda`` runs the same
simulation on four GPUs: every rank holds the whole (prepared) data set, a DistributedSampler
gives each rank its share of every epoch, the model is wrapped in DistributedDataParallel so
gradients are averaged across ranks after each step, training statistics are summed across ranks,
and only rank 0 logs and writes files. The global batch size is the configured one; each rank
takes ``batch_size / world_size`` of it, so results match single-process training on the same
data (a test checks this with two CPU processes).

Each sample's explanation loss needs only its own activations and gradients, so the CAM inside
the step is unchanged under DDP; the averaged gradient of the per-rank mean losses equals the
gradient of the global mean when ranks hold equal numbers of samples (and of masked samples).
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel job (world_size 1: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def init_from_env(device: str = "cpu") -> tuple[Dist, str]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Returns the rank information and the device this rank should use (``cuda:<local_rank>``
    when ``device`` is "cuda").
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        # torn down before the interpreter ends: a group left to the C++ destructors can abort
        # the rank at exit ("terminate called without an active exception", seen with gloo)
        atexit.register(_destroy)
    return Dist(rank, world, local), device


def _destroy() -> None:
    if dist.is_initialized():
        gc.collect()  # a DDP wrapper left in a reference cycle holds the group until collected
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Dist) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed; ``model`` itself otherwise.

    A wrapper still alive when the interpreter ends (a script's global, or one left in a
    reference cycle after its function returned) holds the gloo process group past
    ``destroy_process_group``, and its teardown then aborted the rank at exit ("terminate called
    without an active exception": 5 of 70 torchrun runs of the test's worker on the 2-core CPU);
    :func:`_destroy` collects such cycles first (0 of 70 since)."""
    if not ctx.enabled:
        return model
    device_ids = None
    first = next(model.parameters())
    if first.device.type == "cuda":
        device_ids = [first.device.index]
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard_order(n: int, *, epoch: int, seed: int, ctx: Dist) -> torch.Tensor:
    """This rank's positions (into an index array of length ``n``) for one epoch, shuffled the
    same way on every rank (torch's DistributedSampler; padded by repetition to equal shares)."""
    sampler = torch.utils.data.DistributedSampler(
        range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def local_batch_size(batch_size: int, ctx: Dist) -> int:
    """Each rank's share of the global batch."""
    if batch_size % ctx.world_size:
        raise ValueError(
            f"batch size {batch_size} does not split evenly over {ctx.world_size} ranks"
        )
    return batch_size // ctx.world_size


def sum_across(value: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (in place where distributed); identity for a single process."""
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()
