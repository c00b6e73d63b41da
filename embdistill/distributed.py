"""torchrun environment, device binding, process-group set-up and tear-down, rank-0 printing.

Every stage reads the variables torchrun sets (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); run without torchrun it is a single process of rank 0. The backend
is NCCL on CUDA and gloo on CPU; a timeout bounds every collective. Under gloo a dead or hung
peer ends the survivors with an exception (turned into one line by the stages); under NCCL the
watchdog thread aborts the waiting process instead (SIGABRT after ``--dist-timeout``, its log
saying "Watchdog caught collective operation timeout"): see README, "Several GPUs".

Devices (``--device``, :func:`resolve_device`) are per process: ``cuda`` is this process's own
GPU, ``cuda:LOCAL_RANK``, so that ``--nproc_per_node 6`` puts one teacher on each of six GPUs
instead of six on the first.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError, first_line

log = logging.getLogger("embdistill.distributed")

DEVICE_HELP = ("cpu; cuda (this process's GPU: cuda:LOCAL_RANK); cuda:N (GPU N, or N + LOCAL_RANK "
               "with several processes per node); or a comma list, one device per local process "
               "(cuda:0,cuda:2); default: this process's GPU, else the CPU")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_world_size: int = 1  # processes on this node

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
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
    )


def _own_gpu(env: DistEnv) -> torch.device:
    """cuda:LOCAL_RANK; with more processes on the node than GPUs they share, round-robin."""
    count = torch.cuda.device_count()
    if env.local_world_size > count:
        log.warning("%d processes on this node share %d GPU(s): process %d uses cuda:%d",
                    env.local_world_size, count, env.local_rank, env.local_rank % count)
    return torch.device("cuda", env.local_rank % count)


def default_device(env: DistEnv | None = None) -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK) when CUDA is present, else the CPU."""
    env = env or dist_env()
    return _own_gpu(env) if torch.cuda.is_available() else torch.device("cpu")


def _parse_device(arg: str) -> torch.device:
    try:
        device = torch.device(arg.strip())
    except RuntimeError:
        raise UserError(f"unknown device '{arg}' (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {arg}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {arg}: CUDA is not available here")
    return device


def _visible(device: torch.device, arg: str) -> torch.device:
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index >= count:
        raise UserError(f"device {arg}: this process would use cuda:{device.index}, but {count} GPU(s) "
                        "are visible (CUDA_VISIBLE_DEVICES)")
    return device


def resolve_device(arg: str | None, env: DistEnv | None = None) -> torch.device:
    """This process's device for a ``--device`` option (see :data:`DEVICE_HELP`):

    * None: :func:`default_device`;
    * ``cpu``;
    * ``cuda``: cuda:LOCAL_RANK (processes share GPUs round-robin when there are fewer GPUs);
    * ``cuda:N``: GPU N for one process per node; with several, local process r takes GPU
      N + r (an offset: ``--nproc_per_node 2 --device cuda:2`` uses GPUs 2 and 3);
    * a comma list (``cuda:0,cuda:2`` or ``cpu,cpu``): entry LOCAL_RANK, one per local process.

    A bad, unavailable or missing device is a one-line UserError, not torch's traceback at
    first use."""
    env = env or dist_env()
    if arg is None:
        return default_device(env)
    if "," in arg:
        entries = arg.split(",")
        if len(entries) != env.local_world_size:
            raise UserError(f"--device {arg}: {len(entries)} devices for {env.local_world_size} "
                            "process(es) on this node; give one per process")
        devices = [_parse_device(entry) for entry in entries]  # every process checks every entry
        return _visible(devices[env.local_rank], arg)
    device = _parse_device(arg)
    if device.type == "cpu":
        return device
    if device.index is None:
        return _own_gpu(env)
    return _visible(torch.device("cuda", device.index + env.local_rank), arg)


# The device this process was bound to (bind_device): NCCL's process group must use it too.
_bound_device: torch.device | None = None


def bind_device(device: torch.device) -> torch.device:
    """Make ``device`` this process's current CUDA device (kernels, caches and NCCL that take
    no explicit device use it); returns ``device``. No-op for the CPU."""
    global _bound_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        _bound_device = device
    return device


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> DistEnv:
    """Join the process group when WORLD_SIZE > 1 (idempotent); return the environment. A peer
    that does not join within ``timeout_s`` is a one-line :class:`UserError`.

    Under NCCL the process's GPU is the one :func:`bind_device` chose, else cuda:LOCAL_RANK."""
    env = dist_env()
    if env.distributed and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(_bound_device or default_device(env))
            log.info("NCCL: a peer that hangs in a collective for %.0f s (--dist-timeout) makes the "
                     "NCCL watchdog abort this process (SIGABRT; its log names the timed-out "
                     "collective, 'Watchdog caught collective operation timeout')", timeout_s)
        try:
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
        except dist.DistError as exc:
            raise UserError(
                f"could not join the process group ({first_line(exc)}); check that every node "
                "started, --master_addr/--master_port, and --dist-timeout"
            ) from None
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
