"""Data-parallel training under `torchrun`: everything distributed lives here, in torch's own terms.

No launcher or communication layer of our own: torchrun starts the processes and sets RANK,
WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; `torch.distributed` (NCCL on CUDA, gloo on CPU) moves
the numbers; DistributedDataParallel averages the gradients. Without torchrun the run is one process,
no process group exists, and every helper below is a no-op that returns its input unchanged — so a
single-process run computes exactly what it computed before this module existed. Under torchrun the
distributed path runs whatever the number of processes, one included.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .devices import resolve_device
from .utils import UserError, first_line

# How long a collective waits for a missing rank before the survivors give up (torchrun itself
# stops the others within seconds when one rank exits; this bounds runs started without it).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among `world_size`, and on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, writes results and weights, and profiles."""
        return self.rank == 0


def ranks_from_env(environ: Mapping[str, str] = os.environ) -> Ranks:
    """The ranks torchrun set, or one process when WORLD_SIZE is absent."""
    if "WORLD_SIZE" not in environ:
        return Ranks()
    try:
        world = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                        "(start the trainer with torchrun)") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise UserError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                        f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
    return Ranks(rank, world, local_rank, local_world)


def gpu_shortage(ranks: Ranks, gpus: int) -> str | None:
    """The one line every rank prints when its node has fewer GPUs than processes (checked before any
    collective, so no rank waits for another that will never come)."""
    if gpus >= ranks.local_world_size:
        return None
    return (f"{ranks.local_world_size} processes per node need {ranks.local_world_size} GPUs, this machine has "
            f"{gpus}: use torchrun --nproc_per_node={gpus}" if gpus else
            f"{ranks.local_world_size} processes need CUDA GPUs, and CUDA is not available here: "
            "use --device cpu (gloo)")


def setup(device_name: str) -> tuple[Ranks, torch.device]:
    """(ranks, this process's device). Under torchrun (any number of processes, one included):
    cuda:LOCAL_RANK with NCCL, or the CPU with gloo, and the process group initialised; otherwise one
    process on `device_name` as always."""
    ranks = ranks_from_env()
    if not launched():
        return ranks, resolve_device(device_name)
    if device_name not in ("auto", "cpu", "cuda"):
        raise UserError(f"under torchrun each process uses cuda:LOCAL_RANK or the CPU: pass --device cuda, cpu "
                        f"or auto, not {device_name!r}")
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        problem = gpu_shortage(ranks, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if problem:
            raise UserError(problem)
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (ValueError, RuntimeError) as err:  # no MASTER_ADDR, a port in use, a peer that never came
        raise UserError(f"cannot start the {backend} process group: {first_line(err)}") from None
    return ranks, device


def launched(environ: Mapping[str, str] = os.environ) -> bool:
    """Started by torchrun (which sets WORLD_SIZE), even as its only process: then the run takes the
    distributed path (process group, DDP), so `torchrun --nproc_per_node=1` exercises it on one GPU."""
    return "WORLD_SIZE" in environ


def active() -> bool:
    """A process group is running (under torchrun): the helpers below then talk to every rank."""
    return dist.is_available() and dist.is_initialized()


def backend() -> str | None:
    """The process group's backend ('nccl', 'gloo'), or None for a plain single-process run."""
    return dist.get_backend() if active() else None


def is_main() -> bool:
    """Rank 0, or the only process."""
    return not active() or dist.get_rank() == 0


def cleanup() -> None:
    """Destroy the process group now, while the interpreter is fully alive, after collecting what still
    refers to it (DDP's reducer does, from reference cycles): call it once the DDP wrapper is out of
    scope. A process group that outlives this (a DDP wrapper alive until interpreter shutdown) is torn
    down with gloo's worker threads during finalization, a known way to abort with "terminate called
    without an active exception" (pytorch#179291); once in 20 two-node launches of
    tests/helpers/ddp_first_step.py, whose wrapper was a module global, rank 1 exited so (SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun: DDP over the model (compiled in place first under --compile: `train.compiled`);
    one process: the model itself."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside DDP (compiled in place under --compile), for evaluation: scoring needs no
    collective, and DDP's forward would broadcast buffers at the first eval batch of every epoch."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics: each rank updated its own from its own
    batches since DDP last broadcast them, and evaluation must score the model rank 0 saves."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def sum_over_ranks(*values: torch.Tensor | float, device: torch.device) -> list[float]:
    """Sums over all ranks of counts and sums (never of means: ranks see different numbers of
    images), as Python floats; one process: the values themselves."""
    if not active():
        return [v.item() if isinstance(v, torch.Tensor) else float(v) for v in values]
    totals = torch.stack([torch.as_tensor(v, device=device).to(torch.float64) for v in values])
    dist.all_reduce(totals)
    return totals.tolist()


def gather_over_ranks(*values: float, device: torch.device) -> list[list[float]]:
    """Each value from every rank: [[rank 0's, rank 1's, ...], ...]; one process: [[v], ...]."""
    if not active():
        return [[float(v)] for v in values]
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return torch.stack(every, 1).tolist()


def train_shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of an epoch's training order, as torch's DistributedSampler (and so FFCV's
    distributed loader) splits it: padded to a multiple of the world size by repeating its first
    `(-n) % world_size` entries, so that every rank takes the same number of steps, then every
    world_size-th entry from `rank`. The first global batch is the one-process run's first batch."""
    padding = (-len(order)) % world_size
    return np.concatenate([order, np.resize(order, padding)])[rank::world_size]


def rank_images(images: int, train: bool, rank: int, world_size: int) -> int:
    """How many of a split's images this rank sees per epoch: its `train_shard` (padded: the same on
    every rank) or its `eval_shard` (unpadded)."""
    return -(-images // world_size) if train else len(eval_shard(images, rank, world_size))


def eval_shard(images: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's positions of a val/test split, in order and without padding: every image is scored
    by exactly one rank, and the ranks' counts and sums add up to the split's."""
    return np.arange(rank, images, world_size)
