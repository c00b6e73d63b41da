"""torchrun, as the shell drivers launch it: ``python -m embdistill.torchrun [torchrun flags]
SCRIPT [stage options]``.

Differences from ``python -m torch.distributed.run``:

* options are matched exactly: torchrun's parser lets argparse abbreviate, so a stage option
  such as ``--run`` after the script is taken for torchrun's ``--run-path`` ("ambiguous option");
* every way a launch ends badly is one line on stderr instead of a traceback: a failed worker
  (the first rank to fail, its exit status or signal; the worker's own one-line error is
  printed above it), a signal to the launcher (SIGINT: exit 130, SIGTERM: 143; the workers
  are stopped first), a busy ``--master_port``, an impossible launch flag;
* workers end with their launcher: each stage script's :func:`embdistill.cli.run_main` asks
  Linux for a signal when its parent dies (:func:`die_with_launcher`), so a launcher killed
  with ``kill -9`` leaves no worker writing behind it.

Without ``--master_port`` on one machine torchrun picks a free port itself (as ``--standalone``
does), so that two launches on one machine do not collide; with ``--nnodes > 1`` every node
must name the same port, and torchrun's default 29500 applies.

This module imports torch only in :func:`main`: the workers import it for
:func:`die_with_launcher` alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from .errors import UserError, first_line

# Set by the launcher for its workers: the launcher's pid.
LAUNCHER_PID_ENV = "EMBDISTILL_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Looked up here, in the parent: die_with_parent also runs in a child between fork and exec,
# where loading a library (dlopen) can deadlock if the parent ran threads.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Have Linux send this process ``signum`` when its parent ends (``prctl(PR_SET_PDEATHSIG)``);
    if the parent is already gone (it died before the request), end now. A no-op elsewhere."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def die_with_launcher() -> None:
    """In a worker of :func:`main`'s launch: end when the launcher ends, however it ends."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and "LOCAL_RANK" in os.environ:
        die_with_parent(int(launcher))


def check_launch(nproc_per_node: str | int, nnodes: str | int, node_rank: int,
                 master_port: int | None) -> None:
    """UserError for launch flags torchrun would fail on with a traceback (or hang on)."""
    if not str(nproc_per_node).isdigit() or int(nproc_per_node) < 1:
        raise UserError(f"--nproc_per_node must be a whole number >= 1, got '{nproc_per_node}'")
    low, _, high = str(nnodes).partition(":")  # torchrun's N or MIN:MAX
    high = high or low
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise UserError(f"--nnodes must be a whole number >= 1, got '{nnodes}'")
    if not 0 <= node_rank < int(high):
        raise UserError(f"--node_rank must be 0 to {int(high) - 1} with --nnodes {nnodes}, got {node_rank}")
    if master_port is not None and not 1 <= master_port <= 65535:
        raise UserError(f"--master_port must be 1 to 65535, got {master_port}")


def first_failure(failures: dict) -> tuple[int, object]:
    """(rank, failure) of the rank that failed first. torchrun stops the others once one fails
    and records them too (ended by its SIGTERM); timestamps are whole seconds, so ties keep
    torchrun's order, which is the order it saw them fail in."""
    return min(failures.items(), key=lambda item: item[1].timestamp)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.allow_abbrev = False
    args = parser.parse_args(argv)
    script = args.training_script
    try:
        check_launch(args.nproc_per_node, args.nnodes, args.node_rank, args.master_port)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Their failure and shutdown messages are replaced by our one line below.
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the workers inherit it
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = first_failure(exc.failures)
        if failure.exitcode < 0:
            print(f"error: {script}: rank {rank} ended with signal {failure.signal_name()}", file=sys.stderr)
            return 128 - failure.exitcode
        print(f"error: {script}: rank {rank} ended with status {failure.exitcode}", file=sys.stderr)
        return failure.exitcode
    except SignalException as exc:
        print(f"error: {script}: interrupted by {signal.Signals(exc.sigval).name}; the workers were stopped",
              file=sys.stderr)
        return 128 + int(exc.sigval)
    except DistError as exc:
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
            print(f"error: port {args.master_port} is in use (another launch?): choose another --master_port"
                  + (", or leave it out to get a free one" if str(args.nnodes) in ("1", "1:1") else ""), file=sys.stderr)
            return 2
        print(f"error: {script}: the launch failed: {first_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
