"""torchrun, as the shell drivers launch it: ``python -m embdistill.torchrun [torchrun flags]
SCRIPT [stage options]``.

Two differences from ``python -m torch.distributed.run``:

* options are matched exactly: torchrun's parser lets argparse abbreviate, so a stage option
  such as ``--run`` after the script is taken for torchrun's ``--run-path`` ("ambiguous option");
* a failed worker ends the launch with one line naming its rank and exit status (the worker's
  own one-line error is printed above it), and that status, instead of torchrun's traceback.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    parser.allow_abbrev = False
    args = parser.parse_args(argv)
    # Its "failed (exitcode: N) local_rank: ..." line is replaced by ours below.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items())
        status = failure.exitcode if failure.exitcode > 0 else 1
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"status {failure.exitcode}"
        print(f"error: {args.training_script}: rank {rank} ended with {how}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
