"""torchrun environment, process-group set-up and tear-down, rank-0 printing.

Every stage reads the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); run without torchrun it is a single process of rank 0. The backend is NCCL
on CUDA and gloo on CPU; a timeout bounds every collective so that a dead peer ends the
survivors with an error instead of a hang.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger("embdistill.distributed")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """The torchrun environment of this process (defaults: one process, rank 0)."""
    env = os.environ
    return DistEnv(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 29500)),
    )


def default_device(env: DistEnv | None = None) -> torch.device:
    """This rank's GPU (by LOCAL_RANK) when CUDA is present, else the CPU."""
    env = env or dist_env()
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(arg: str | None, env: DistEnv | None = None) -> torch.device:
    """A ``--device`` option: None gives :func:`default_device`; a bad or unavailable device
    is a one-line UserError (not torch's traceback at first use)."""
    if arg is None:
        return default_device(env)
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise UserError(f"unknown device '{arg}' (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {arg}: CUDA is not available here")
    return device


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> DistEnv:
    """Join the process group when WORLD_SIZE > 1 (idempotent); return the environment."""
    env = dist_env()
    if env.distributed and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined (%s)", env.rank, env.world_size, backend)
    return env


def cleanup() -> None:
    """Leave the process group, if joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if dist_env().is_main:
        print(*args, **kwargs, flush=True)


def shard(items: list, env: DistEnv | None = None) -> list:
    """This rank's share of ``items``: every world_size-th item from its rank (stable)."""
    env = env or dist_env()
    return items[env.rank :: env.world_size]
