"""torch.distributed under ``torchrun``: which rank this is, sharding, gathering, rank-0-only I/O.

    torchrun --nproc_per_node=4 -m mtt.run +head=autopool      # 4 GPUs (NCCL), or CPU (Gloo)

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op for a
single process, so the training code has one path. The rules of a distributed run:

- rank 0 prepares data first (dataset, feature store, backbone cache) while the others wait;
- each rank streams a disjoint shard of the training clips (``clip_ids[rank::world]``) through
  its own pescador mux, with ``batch_size // world`` patches per step, so one step consumes
  the same global batch and an epoch the same amount of data as with one process;
- evaluation splits the clips the same way and gathers the probabilities, so every clip is
  evaluated exactly once, by a model whose BatchNorm statistics are rank 0's (``sync_buffers``),
  and the metrics equal a single-process evaluation of the checkpoint rank 0 writes; on CUDA
  BatchNorm is ``SyncBatchNorm`` (statistics of the global batch);
- only rank 0 talks to MLflow and writes checkpoints (``paths.cache`` must be a filesystem all
  ranks see, as on one node or a cluster's shared disk).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_rank() -> int:
    """This process's rank as torchrun announces it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init(device_spec: str) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, Gloo on CPU); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_spec != "cpu"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local)


def device_for(d: Dist, device: torch.device) -> torch.device:
    """Each rank of a multi-GPU run owns ``cuda:LOCAL_RANK``."""
    return torch.device("cuda", d.local_rank) if d.active and device.type == "cuda" else device


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


@contextlib.contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (downloads, building stores); the others run it after, finding
    them done. Rank 0 releases the others even when the block fails (they then run it and most
    likely fail the same way, instead of waiting at the barrier until the process group times out)."""
    if not d.main:
        barrier(d)
    try:
        yield
    finally:
        if d.main:
            barrier(d)


def broadcast(d: Dist, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not d.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(d: Dist, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not d.active:
        return [value]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, value)
    return out


def shard(d: Dist, n: int) -> np.ndarray:
    """This rank's row numbers out of ``n``: ``rank, rank + world, ...``."""
    return np.arange(n)[d.rank :: d.world]


def gather_rows(d: Dist, n: int, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Run ``compute(rows)`` on this rank's shard of ``n`` rows, reassemble all ranks' results.

    Every row is computed by exactly one rank; the result ``(n, ...)`` is on every rank.
    """
    rows = shard(d, n)
    parts = gather(d, (rows, compute(rows)))
    first = parts[0][1]
    out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    for r, values in parts:
        out[r] = values
    return out


def local_batch(d: Dist, batch_size: int) -> int:
    """Patches per step on each rank so that one step is still ``batch_size`` patches in all."""
    if batch_size % d.world:
        raise ValueError(f"trainer.batch_size={batch_size} is not divisible by the {d.world} processes")
    return batch_size // d.world


def wrap(d: Dist, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around the model (gradients of trainable parameters averaged).

    On CUDA the model's BatchNorm layers become ``SyncBatchNorm`` first (in place, same
    parameters and buffers), so they normalise over the global batch rather than each rank's
    ``batch/world`` share. PyTorch runs SyncBatchNorm on GPUs only; on CPU (Gloo) each rank keeps
    its own statistics during an epoch and ``sync_buffers`` makes them rank 0's before evaluation.
    """
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_buffers(d: Dist, model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    Call after each training epoch: every rank then evaluates exactly the model rank 0 saves.
    DDP broadcasts buffers only at the start of a training forward, so after an epoch's last step
    each rank's statistics include its own last local batch.
    """
    if d.active:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


class RankTracker:
    """What ranks other than 0 log to: nothing. It carries rank 0's run id (for checkpoints)."""

    def __init__(self, run_id: str | None, resumed: bool):
        self.run_id, self.resumed = run_id, resumed

    def __enter__(self) -> RankTracker:
        return self

    def __exit__(self, *exc) -> Literal[False]:
        return False

    def _skip(self, *args, **kwargs) -> None:
        return None

    log_params = set_tags = log_metrics = log_inputs = log_text = log_artifact = log_artifacts = _skip


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
