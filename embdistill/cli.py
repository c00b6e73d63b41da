"""Argument and entry-point helpers shared by every stage script.

Each stage script builds its parser with :func:`stage_parser` (in its ``build_parser()``, which
the shell drivers also read: :mod:`embdistill.drivers`), then calls ``run_main(main)``.
``run_main`` turns :class:`UserError` (a bad option included) into one line on stderr and exit
status 2, and an environment error (a full disk, a read-only folder, no memory) into one line
and exit status 1, so users never see a traceback from deep inside.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError, first_line
from .torchrun import LAUNCHER_PID_ENV, die_with_launcher

log = logging.getLogger("embdistill")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record, not as it was at set-up, so a stage
    run again in the same process after stderr was redirected (tests, notebooks) still logs."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides
        pass


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def setup_logging(level: str | None = None) -> None:
    """Log ``HH:MM:SS stage message`` lines to stderr; rank > 0 logs warnings only."""
    level = (level or os.environ.get("EMBDISTILL_LOG") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise UserError(f"unknown log level '{level}' (--log-level or $EMBDISTILL_LOG): "
                        f"choose one of {', '.join(LOG_LEVELS)}")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=level if rank == 0 else "WARNING",
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_CurrentStderrHandler()],
        force=True,
    )
    # Hub libraries are chatty about things our users cannot act on.
    for noisy in ("transformers", "sentence_transformers", "datasets", "mteb", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Hub retries are logged once per attempt; the failure itself reaches the user as one
    # UserError line naming what could not be downloaded.
    # huggingface_hub configures its own root logger on import, so set it through its API.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """Set the level of logger ``name`` ("": the root logger) for the block."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help; the epilog's examples kept as written."""


class ListOnce(argparse._StoreAction):
    """A list option (``nargs`` "+" or "*") given once, each value once: argparse keeps only the
    last of ``--teachers a --teachers b``, and a value named twice (``--teachers a a``) would
    train or evaluate the same thing twice; both are refused when parsed."""

    def __call__(self, parser, namespace, values, option_string=None):
        # argparse sets every default before the first option: anything else was given already
        if getattr(namespace, self.dest, None) is not self.default:
            raise argparse.ArgumentError(self, "given twice: give its values once, after one "
                                         f"{option_string}")
        repeated = [value for i, value in enumerate(values) if value in values[:i]]
        if repeated:
            raise argparse.ArgumentError(self, f"{repeated[0]!r} given twice")
        super().__call__(parser, namespace, values, option_string)


class StageArgumentParser(argparse.ArgumentParser):
    """A parser whose errors (unknown option, bad value) are a :class:`UserError`: one line
    ``error: ...`` and exit status 2 under :func:`run_main`, not argparse's usage block. Its list
    options are :class:`ListOnce`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _store_action)  # argument groups share the registry
        self.register("action", "store", _store_action)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _store_action(option_strings, dest, nargs=None, **kwargs) -> argparse.Action:
    """argparse's store action, or :class:`ListOnce` for a list option."""
    action = ListOnce if nargs in ("+", "*") else argparse._StoreAction
    return action(option_strings, dest, nargs=nargs, **kwargs)


# Every numeric option's type states its range, so that a stage's parser (which the drivers
# run on each stage's options before the first stage) refuses a value the stage cannot use; a
# bare int or float would let --batch-size 0 through to the stage, after hours of earlier ones.


def whole_number(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low`` (ASCII digits: int() also reads '٣')."""

    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit() or int(text) < low:
            wanted = "a positive integer" if low == 1 else f"a whole number >= {low}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return int(text)

    return parse


positive_int = whole_number(1)  # (a negative cap would drop texts from the end)
non_negative_int = whole_number(0)


def finite_float(text: str) -> float:
    """A float that is a number (not inf or nan): the base of :func:`bounded_float`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def bounded_float(low: float, high: float = math.inf, *, low_included: bool = True,
                  high_included: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float from ``low`` to ``high`` (each end included or not)."""
    if high == math.inf:
        wanted = f"{'>=' if low_included else '>'} {low:g}"
    else:
        wanted = f"in {'[' if low_included else '('}{low:g}, {high:g}{']' if high_included else ')'}"

    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or value > high or (value == low and not low_included) or (value == high and not high_included):
            raise argparse.ArgumentTypeError(f"expected a number {wanted}, got {text!r}")
        return value

    return parse


non_negative_float = bounded_float(0)
positive_float = bounded_float(0, low_included=False)
fraction = bounded_float(0, 1, low_included=False)  # a share of the texts: neither none nor all


def stage_parser(doc: str, *, task: bool = True, task_set: bool = False) -> argparse.ArgumentParser:
    """A parser with the options every stage shares: --task, --base-dir, --overwrite, --seed.
    ``task_set``: --task takes several tasks, distilled together (a list; see
    :func:`embdistill.tasks.resolve_task_set`).

    ``doc`` is the stage script's docstring: its first line describes the stage, the rest
    (usage examples) is shown after the options. The parser is named after the calling script's
    file, however the script was started (``python script``, or its ``main([...])`` in-process)."""
    description, _, epilog = doc.strip().partition("\n")
    script = sys._getframe(1).f_globals.get("__file__")
    parser = StageArgumentParser(
        prog=Path(script).name if script else None, description=description,
        epilog=epilog.strip("\n") or None, formatter_class=HelpFormatter,
    )
    if task:
        parser.add_argument(
            "--task",
            nargs="+" if task_set else None,
            default=["bbc-news"] if task_set else "bbc-news",
            help="task index 1-16, a task name (e.g. bbc-news, tweet-sentiment, "
            "Banking77Classification) or a .jsonl/.csv file with text and label columns"
            + ("; several (or all: tasks 1-16): one task set, distilled together, under "
               "its own folder name (e.g. bbc-news+tweet-sentiment)" if task_set else ""),
        )
        parser.add_argument("--text-column", default="text", help="text column of a user file")
        parser.add_argument("--label-column", default="label", help="label column of a user file")
    parser.add_argument(
        "--base-dir",
        default=None,
        help="where outputs go (text_train/, work/, sense_dict/, runs/, results/); "
        "default $EMBDISTILL_HOME or the current directory",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo work that is already done")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    parser.add_argument("--log-level", default=None, type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default INFO)")
    return parser


def describe_os_error(exc: OSError) -> str:
    """An environment error as one line naming the path: 'PATH: No space left on device'."""
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or first_line(exc)
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def run_main(main: Callable[[], int | None]) -> None:
    """Run a stage's ``main``: bad input becomes one line and exit status 2, an environment
    error (OSError, MemoryError) one line and status 1, an interruption status 130."""
    die_with_launcher()
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Under our launcher, the launcher reports the interruption once for every rank.
        if LAUNCHER_PID_ENV not in os.environ:
            print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:
        print("error: out of memory; try smaller batches (--batch-size) or fewer texts", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
