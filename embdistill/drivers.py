"""The shell drivers' command lines and stage sequences: each ``run_*.sh`` prints its usage on
``--help`` and otherwise runs ``python -m embdistill.drivers NAME ARGS``.

A driver's command line is ``TASK [TASK ...] [launch flags] [options]``, in any order (the
SKD drivers take several tasks as one task set, distilled into one student; the gather driver
gathers each task, then combines them):

* the launch flags are torchrun's (``--nproc_per_node --nnodes --node_rank --master_addr
  --master_port``), for the stages run under :mod:`embdistill.torchrun` (one process on one
  machine, the default, runs such a stage without it, as when it is run by hand);
* every other option belongs to the driver's stage scripts and goes to each stage whose parser
  defines it, unless the driver sends it elsewhere (:class:`Driver`);
* before the first stage runs, an option that no stage takes is named, and each stage's own
  parser reads the options it will get, so a bad option or value fails in one line before any
  work starts, not after an hour of gathering.

Which options a stage takes comes from the stage script alone (its ``build_parser()``); nothing
here lists them again, so a new option is routed without anyone touching a driver. Stages run
one after another: a launch of several processes or machines under torchrun, a stage that
needs its own environment in a process of its own, which ends when the driver ends however it
ends (:func:`embdistill.torchrun.die_with_parent`), a SIGINT or SIGTERM to the driver passed
on to it; any other stage in the driver's process, as tests/helpers.py runs stages (the
driver has imported it already to read its parser).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

from .cli import run_main
from .errors import UserError
from .torchrun import check_launch, die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[1]

# torchrun's flag -> the spellings the drivers accept for it
LAUNCH_FLAGS = {
    "--nproc_per_node": ("--nproc_per_node", "--nproc-per-node", "--nproc"),
    "--nnodes": ("--nnodes",),
    "--node_rank": ("--node_rank", "--node-rank"),
    "--master_addr": ("--master_addr", "--master-addr"),
    "--master_port": ("--master_port", "--master-port"),
}
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # argparse's rule: such a token is a value
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StageFailed(Exception):
    """A stage ended with a non-zero status (it has said why); the driver ends with it."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


@dataclass(frozen=True)
class Stage:
    """A stage script; ``launched``: under torchrun (every process of the launch), else in
    one process."""

    script: str  # relative to the repository root
    launched: bool = False

    @property
    def parser(self) -> argparse.ArgumentParser:
        return stage_parser_of(self.script)

    def arities(self) -> dict[str, int | str | None]:
        """Each option string of the stage (but --help) -> its argparse nargs (0: a flag)."""
        return {option: action.nargs for action in self.parser._actions
                if action.option_strings and not isinstance(action, argparse._HelpAction)
                for option in action.option_strings}


@functools.cache
def stage_parser_of(script: str) -> argparse.ArgumentParser:
    """The stage script's own parser, from its ``build_parser()`` (its main does not run)."""
    parser = runpy.run_path(str(REPO_ROOT / script), run_name="embdistill_stage")["build_parser"]()
    parser.prog = script
    return parser


class _Signalled(BaseException):
    """A SIGTERM or SIGHUP during a stage run in this process (not an Exception: no stage's
    ``except Exception`` takes it for an error of its own; ``finally`` blocks still run)."""


def run_in_this_process(script: str, args: list[str]) -> int:
    """A stage script's ``main(args)`` in this process, through ``run_main`` as its command line
    runs it (one-line errors, exit statuses); returns the exit status. ``script``: relative to
    the repository (``scripts/05_train.py``). A SIGTERM or SIGHUP ends the stage as it would end
    a stage of its own process (one line, status 128 + the signal) after its cleanup."""
    main = runpy.run_path(str(REPO_ROOT / script), run_name="embdistill_stage")["main"]

    def stop(signum, frame):
        raise _Signalled(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)} if main_thread else {}
    try:
        run_main(lambda: main([str(arg) for arg in args]))
    except SystemExit as exc:
        return exc.code or 0
    except _Signalled as exc:
        print(f"error: {script}: ended with signal {signal.Signals(exc.args[0]).name}", file=sys.stderr)
        return 128 + exc.args[0]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _release_memory()
    raise AssertionError(f"{script}: run_main returned without exiting")


def _release_memory() -> None:
    """The finished stage's arrays and models, before the next stage allocates its own."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Launch:
    """The launch flags, checked (:func:`embdistill.torchrun.check_launch`). Without
    ``master_port`` one node gets a free port from torchrun; several nodes, its 29500."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    def __post_init__(self):
        check_launch(self.nproc_per_node, self.nnodes, self.node_rank, self.master_port)

    @property
    def one_process(self) -> bool:
        """One process on one machine: such a stage runs without torchrun's launcher (which
        would only add a process and its start-up, ~2.5 s per stage), in the driver's process."""
        return self.nproc_per_node == 1 and self.nnodes == 1

    def torchrun_args(self) -> list[str]:
        args = ["--nproc_per_node", str(self.nproc_per_node), "--nnodes", str(self.nnodes),
                "--node_rank", str(self.node_rank), "--master_addr", self.master_addr]
        return args + (["--master_port", str(self.master_port)] if self.master_port is not None else [])


@dataclass(frozen=True)
class Driver:
    """A shell driver: its stages (by a short name) and where its options go.

    ``own``: the driver's own options (option -> nargs), not passed on as they are;
    ``only``: option -> the stages it goes to, instead of every stage that takes it;
    ``renamed``: the driver's option -> (stage, that stage's option);
    ``reserved``: stage options the driver sets itself -> why (given ones are refused)."""

    name: str
    stages: Mapping[str, Stage]
    run: Callable[["Invocation"], None]
    own: Mapping[str, int | str | None] = field(default_factory=dict)
    only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    renamed: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    reserved: Mapping[str, str] = field(default_factory=lambda: {"--task": "give the task as the first argument"})

    @property
    def script(self) -> str:
        return f"run_{self.name}.sh"


class Invocation:
    """One driver command line, split into tasks, launch flags, the driver's own options and
    each stage's options (see the module docstring)."""

    def __init__(self, driver: Driver, argv: list[str]):
        self.driver = driver
        launch_spellings = {spelling: flag for flag, spellings in LAUNCH_FLAGS.items() for spelling in spellings}
        stage_options: dict[str, set[str]] = {}
        arities: dict[str, int | str | None] = {}
        for stage_name, stage in driver.stages.items():
            for option, nargs in stage.arities().items():
                # (a reserved option is refused whatever its values; stages may differ on them)
                if arities.setdefault(option, nargs) != nargs and option not in driver.reserved:
                    raise AssertionError(f"{driver.script}: stages disagree on the values of {option}")
                stage_options.setdefault(option, set()).add(stage_name)
        arities |= {**dict.fromkeys(launch_spellings), **driver.own, **dict.fromkeys(driver.renamed)}

        self.tasks: list[str] = []
        self.launch_flags: dict[str, str] = {}
        self.own: dict[str, list[str]] = {}
        self.stage_args: dict[str, list[str]] = {name: [] for name in driver.stages}
        for option, tokens in split_command_line(argv, arities, driver.script, self.tasks):
            _, equals, value = tokens[0].partition("=")
            values = [value] if equals else tokens[1:]
            if option in driver.reserved:
                raise UserError(f"{option} is set by {driver.script}: {driver.reserved[option]}")
            if option in launch_spellings:
                self.launch_flags[launch_spellings[option]] = values[0]
            elif option in driver.own:
                self.own[option] = values
            elif option in driver.renamed:
                stage_name, stage_option = driver.renamed[option]
                self.stage_args[stage_name] += [stage_option, *values]
            else:
                for stage_name in driver.only.get(option, stage_options[option]):
                    self.stage_args[stage_name] += tokens

    def one_task(self) -> str | None:
        """The task given, if any (a driver that takes at most one)."""
        if len(self.tasks) > 1:
            raise UserError(f"{self.driver.script} takes one task, got {' '.join(self.tasks)}")
        return self.tasks[0] if self.tasks else None

    def some_tasks(self) -> list[str]:
        """The tasks given (one, or several: a task set, see embdistill.tasks.TaskSet)."""
        if not self.tasks:
            raise UserError(f"{self.driver.script} needs a TASK (first arguments: an index 1-16, "
                            "a task name or a data file; several: one task set); see --help")
        return self.tasks

    def launch(self, **defaults) -> Launch:
        """The launch flags given (over ``defaults``), checked."""
        values = {**defaults, **{flag[2:]: value for flag, value in self.launch_flags.items()}}
        try:
            numbers = {key: int(value) for key, value in values.items() if key != "master_addr"}
        except ValueError:
            raise UserError(f"launch flags must be whole numbers: {values}") from None
        return Launch(**{**values, **numbers})

    def check(self, stage_name: str, fixed: list[str] = ()) -> argparse.Namespace:
        """The stage's options as its own parser reads them (``fixed``: those the driver sets
        first); a bad one is a UserError naming the stage."""
        stage = self.driver.stages[stage_name]
        try:
            return stage.parser.parse_args([*fixed, *self.stage_args[stage_name]])
        except UserError as exc:
            raise UserError(f"{stage.script}: {exc}") from None

    def run(self, stage_name: str, fixed: list[str] = (), *, launch: Launch | None = None,
            env: Mapping[str, str] | None = None) -> None:
        """Run a stage (after :meth:`check`) with ``fixed`` and its options (:func:`run_stage`)."""
        stage = self.driver.stages[stage_name]
        status = run_stage(stage.script, [*fixed, *self.stage_args[stage_name]],
                           launch=launch if stage.launched else None, env=env)
        if status:
            raise StageFailed(status)

    def command(self, stage_name: str, fixed: list[str] = ()) -> str:
        """The shell command of a one-process stage, to run by hand."""
        script = REPO_ROOT / self.driver.stages[stage_name].script
        return shlex.join([sys.executable, str(script), *fixed, *self.stage_args[stage_name]])


def split_command_line(argv: list[str], arities: Mapping[str, int | str | None], script: str,
                       positionals: list[str]) -> list[tuple[str, list[str]]]:
    """``argv`` as (option, its tokens as given) in order; other arguments go to
    ``positionals``. Option values are taken as argparse takes them (``nargs``)."""
    options = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            positionals += argv[i + 1:]
            break
        if not _is_option(token):
            positionals.append(token)
            i += 1
            continue
        option, equals, _ = token.partition("=")
        if option not in arities:
            raise UserError(f"unknown option {option}: no stage of {script} takes it (see {script} --help)")
        nargs = arities[option]
        if equals:
            if nargs == 0:
                raise UserError(f"{option} takes no value, got '{token}'")
            tokens = [token]
        else:
            wanted = {None: 1, "?": 1, "+": len(argv), "*": len(argv)}.get(nargs, nargs)
            values = []
            for value in argv[i + 1 : i + 1 + wanted]:
                if _is_option(value):
                    break
                values.append(value)
            if len(values) < (1 if nargs in (None, "+") else nargs if isinstance(nargs, int) else 0):
                raise UserError(f"{option} needs a value")
            tokens = [token, *values]
        options.append((option, tokens))
        i += len(tokens)
    return options


def _is_option(token: str) -> bool:
    return token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.fullmatch(token)


def run_stage(script: str, args: Sequence, *, launch: Launch | None = None, env: Mapping[str, str] | None = None,
              output: IO | None = None) -> int:
    """Run a stage script, the one way drivers, lib.sh's ``run_stage``, studies and tests run
    one; returns its exit status (128 + the signal for a stage ended by one). ``script``:
    relative to the repository (``scripts/05_train.py``). Under torchrun when ``launch`` is
    more than one process (:mod:`embdistill.torchrun`); in a process of its own when it needs
    its own environment ``env`` (thread counts are read at start-up) or its output goes to
    ``output`` (a file); otherwise in this process (:func:`run_in_this_process`), which has
    often imported the stage already (its parser) and so skips a start-up (5-6 s per stage on
    the 2-core CPU)."""
    args = [str(arg) for arg in args]
    torchrun = launch is not None and not launch.one_process
    if not (torchrun or env or output):
        return run_in_this_process(script, args)
    launcher = [sys.executable, "-m", "embdistill.torchrun", *launch.torchrun_args()] if torchrun else [sys.executable]
    status = run_process([*launcher, str(REPO_ROOT / script), *args], env={**os.environ, **(env or {})}, output=output)
    if status < 0:  # a one-process stage ended by a signal says nothing itself
        print(f"error: {script}: ended with signal {signal.Signals(-status).name}", file=sys.stderr)
        return 128 - status
    return status


def run_process(command: list[str], env: Mapping[str, str], output: IO | None = None) -> int:
    """Run ``command`` to its end and return its status; it dies when this process dies, and a
    SIGINT, SIGTERM or SIGHUP sent here is passed to it (it runs in its own session, so a
    Ctrl-C in the terminal reaches it once, through us). ``output``: a file for its stdout and
    stderr (default: ours)."""
    process = subprocess.Popen(command, env=dict(env), start_new_session=True, stdout=output,
                               stderr=subprocess.STDOUT if output else None,
                               preexec_fn=functools.partial(die_with_parent, os.getpid()))

    def forward(signum, frame):
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED_SIGNALS}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------ drivers


def _positive(invocation: Invocation, option: str, default: int) -> int:
    values = invocation.own.get(option, [str(default)])
    if not values[0].isascii() or not values[0].isdigit() or int(values[0]) < 1:
        raise UserError(f"{option} must be a whole number >= 1, got '{values[0]}'")
    return int(values[0])


def run_gather_sense(cli: Invocation) -> None:
    """Each task's counts, gather and combine; with several tasks (a task set), then the set's
    combine of its members' gathered states (each task is gathered once, for itself and for
    every set it is in)."""
    from .tasks import expand_all

    tasks = expand_all(cli.some_tasks())
    launch = cli.launch()
    for task in tasks:
        for stage in ("count", "gather", "combine"):
            cli.check(stage, ["--task", task])
    combines = [["--task", task] for task in tasks] + ([["--task", *tasks]] if len(tasks) > 1 else [])
    for task in tasks:
        cli.run("count", ["--task", task])
        cli.run("gather", ["--task", task], launch=launch)
    for combine in combines:
        if launch.nnodes == 1:
            cli.run("combine", combine)
        elif launch.node_rank == 0:
            print(f"when every machine has finished, combine the ranks with:\n  {cli.command('combine', combine)}")


def run_sep_cluster(cli: Invocation) -> None:
    task = ["--task", *cli.some_tasks()]
    launch = cli.launch()
    if launch.nproc_per_node != 1:
        raise UserError("run_sep_cluster.sh runs one process: use run_multithread_cluster.sh --procs N")
    cli.check("cluster", task)
    cli.run("cluster", task, launch=launch)


def run_multithread_cluster(cli: Invocation) -> None:
    threads = _positive(cli, "--threads", 1)
    procs = _positive(cli, "--procs", 2)
    fixed = ["--task", *cli.some_tasks(), "--threads", str(threads)]
    launch = cli.launch(nproc_per_node=procs)
    cli.check("cluster", fixed)
    cli.run("cluster", fixed, launch=launch, env={"OMP_NUM_THREADS": str(threads)})  # torchrun would set 1


def run_train(cli: Invocation) -> None:
    from .objectives import STUDENT_OBJECTIVES

    task = ["--task", *cli.some_tasks()]
    launch = cli.launch()
    if "targets" in STUDENT_OBJECTIVES[cli.check("train", task).loss].needs:  # e.g. not mse's: its teacher runs
        cli.check("targets", task)
        cli.run("targets", task, launch=launch)
    cli.run("train", task, launch=launch)


def run_evaluate(cli: Invocation) -> None:
    task = cli.one_task()
    fixed = ["--task", task] if task else []
    cli.launch()  # one process: the launch flags are accepted (and checked), not used
    cli.check("evaluate", fixed)
    cli.run("evaluate", fixed)


def run_multiteacher(cli: Invocation) -> None:
    from .multiteacher import evaluation_models
    from .multiteacher.corpus import corpus_name
    from .paths import Paths, base_dir

    if not cli.tasks:
        raise UserError("run_multiteacher.sh needs at least one TASK (first arguments); see --help")
    launch = cli.launch()
    naming = ["--task", *cli.tasks]
    results = cli.own.get("--results", ["multiteacher"])[0]
    cli.check("texts", ["--task", cli.tasks[0]])
    cli.check("teachers", naming)
    train = cli.check("train", naming)
    runs = multiteacher_runs(train.standardize)
    models = evaluation_models(Paths(base_dir(train.base_dir), corpus_name(train)), train.teachers, runs)
    evaluation = ["--tasks", *cli.tasks, "--run", results, "--models", *models]
    cli.check("evaluate", evaluation)

    print(f"== texts: {' '.join(cli.tasks)}", flush=True)
    for task in cli.tasks:
        cli.run("texts", ["--task", task])
    print(f"== teacher embeddings: {' '.join(train.teachers)}", flush=True)
    cli.run("teachers", naming, launch=launch)
    for label, run in runs.items():  # the runs' default names, mt-<loss>, which `models` names
        loss = run.removeprefix("mt-")
        print(f"== train: {loss} -> runs/.../{run} (evaluated as {label})", flush=True)
        cli.run("train", [*naming, "--loss", loss], launch=launch)
    print(f"== evaluate -> results/{results}", flush=True)
    cli.run("evaluate", evaluation)


def multiteacher_runs(standardize: bool | None) -> dict[str, str]:
    """The evaluation's label -> run of each loss: the run's default name, mt-<loss>; the label
    says which targets it trained on (``--standardize`` as given, else the loss's default), e.g.
    ``mse-student-raw-targets``."""
    from .multiteacher.model import targets_kind
    from .objectives import MULTITEACHER_OBJECTIVES

    return {f"{loss}-student-{targets_kind(objective.standardizes(standardize))}-targets": f"mt-{loss}"
            for loss, objective in MULTITEACHER_OBJECTIVES.items()}


_CLUSTER = {"cluster": Stage("scripts/03_cluster.py", launched=True)}
DRIVERS = {driver.name: driver for driver in [
    Driver("gather_sense", {"count": Stage("scripts/01_count.py"),
                            "gather": Stage("scripts/02_gather.py", launched=True),
                            "combine": Stage("a0_generate_combinepkl.py")}, run_gather_sense),
    Driver("sep_cluster", _CLUSTER, run_sep_cluster),
    Driver("multithread_cluster", _CLUSTER, run_multithread_cluster,
           own={"--procs": None, "--threads": None}),
    Driver("train", {"targets": Stage("scripts/04_targets.py", launched=True),
                     "train": Stage("scripts/05_train.py", launched=True)}, run_train,
           # the training's batch; the targets stage's is --targets-batch-size
           only={"--batch-size": ("train",)},
           renamed={"--targets-batch-size": ("targets", "--batch-size")}),
    Driver("evaluate", {"evaluate": Stage("scripts/06_evaluate.py")}, run_evaluate),
    Driver("multiteacher", {"texts": Stage("scripts/00_texts.py"),
                            "teachers": Stage("scripts/10_teacher_embeddings.py", launched=True),
                            "train": Stage("scripts/11_train_multiteacher.py", launched=True),
                            "evaluate": Stage("scripts/06_evaluate.py")}, run_multiteacher,
           own={"--results": None},
           # the training's batch and length; the teachers' batch is --teacher-batch-size
           only={"--batch-size": ("train",), "--max-length": ("train",)},
           renamed={"--teacher-batch-size": ("teachers", "--batch-size")},
           reserved={"--task": "give the tasks as the first arguments",
                     "--tasks": "give the tasks as the first arguments",
                     "--loss": "it trains both, mt-nll and mt-mse", "--run": "the runs are mt-nll and mt-mse",
                     "--models": "it evaluates both students, the student before and each teacher"}),
]}


STAGE_COMMAND = "stage"  # python -m embdistill.drivers stage SCRIPT ARGS: one stage (lib.sh's run_stage)


def main(argv: list[str]) -> int:
    if argv[:1] == [STAGE_COMMAND] and len(argv) > 1:
        return run_stage(argv[1], argv[2:])
    if not argv or argv[0] not in DRIVERS:
        raise UserError(f"usage: python -m embdistill.drivers {{{','.join(DRIVERS)}}} ARGS, "
                        f"or {STAGE_COMMAND} SCRIPT ARGS")
    driver = DRIVERS[argv[0]]
    try:
        driver.run(Invocation(driver, argv[1:]))
    except StageFailed as failed:
        return failed.status
    return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
