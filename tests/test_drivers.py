"""The shell drivers (run_*.sh -> embdistill.drivers): option routing, options checked before the
first stage, signals passed on, and every driver end to end on a user's .jsonl file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embdistill.drivers import DRIVERS, Invocation, multiteacher_runs, stage_parser_of
from embdistill.errors import UserError
from embdistill.paths import Paths

REPO = Path(__file__).resolve().parents[1]


def drive(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------
# routing (in this process: the stage scripts' parsers, nothing runs)


def test_each_option_goes_to_the_stages_that_take_it():
    cli = Invocation(DRIVERS["gather_sense"], [
        "bbc-news", "--teacher", "minilm", "--cap", "10", "--batch-size=8", "--overwrite",
        "--nproc_per_node", "2", "--max-length", "64", "--dtype", "float32"])
    assert cli.tasks == ["bbc-news"] and cli.launch().nproc_per_node == 2
    assert cli.stage_args == {
        "count": ["--teacher", "minilm", "--overwrite", "--max-length", "64"],
        "gather": ["--teacher", "minilm", "--batch-size=8", "--overwrite", "--max-length", "64",
                   "--dtype", "float32"],
        "combine": ["--teacher", "minilm", "--cap", "10", "--overwrite"],
    }


def test_the_multiteacher_driver_routes_renames_and_reserves():
    cli = Invocation(DRIVERS["multiteacher"], [
        "bbc-news", "tweet-sentiment", "--teachers", "minilm", "lsa", "--teacher-batch-size", "16",
        "--batch-size", "32", "--max-length", "128", "--lsa-dim", "64", "--device", "cpu",
        "--max-train", "400", "--results", "mine", "--seed", "3"])
    assert cli.tasks == ["bbc-news", "tweet-sentiment"] and cli.own == {"--results": ["mine"]}
    assert cli.stage_args["texts"] == ["--max-train", "400", "--seed", "3"]
    assert cli.stage_args["teachers"] == ["--teachers", "minilm", "lsa", "--batch-size", "16", "--lsa-dim", "64",
                                          "--seed", "3"]
    assert cli.stage_args["train"] == ["--teachers", "minilm", "lsa", "--batch-size", "32", "--max-length", "128",
                                       "--seed", "3"]
    assert cli.stage_args["evaluate"] == ["--device", "cpu", "--seed", "3"]
    with pytest.raises(UserError, match="--loss is set by run_multiteacher.sh"):
        Invocation(DRIVERS["multiteacher"], ["bbc-news", "--loss", "mse"])


def test_the_multiteacher_table_labels_say_which_targets_each_student_trained_on():
    assert multiteacher_runs(None) == {"nll-student-standardised-targets": "mt-nll",
                                       "mse-student-raw-targets": "mt-mse"}  # each loss's default
    assert multiteacher_runs(True) == {"nll-student-standardised-targets": "mt-nll",
                                       "mse-student-standardised-targets": "mt-mse"}
    assert multiteacher_runs(False) == {"nll-student-raw-targets": "mt-nll", "mse-student-raw-targets": "mt-mse"}


@pytest.mark.parametrize("driver, args, message", [
    ("gather_sense", ["bbc-news", "--bogus", "--base-dir", "W"], "unknown option --bogus: no stage of run_gather_sense.sh"),
    ("gather_sense", ["bbc-news", "--teacher"], "--teacher needs a value"),
    ("gather_sense", ["bbc-news", "--overwrite=yes"], "--overwrite takes no value"),
    ("gather_sense", ["bbc-news", "--task", "14"], "--task is set by run_gather_sense.sh"),
    # on main: torchrun started, every rank failed, "rank 0 ended with signal SIGTERM", exit 1
    ("multithread_cluster", ["bbc-news", "--bogus"], "unknown option --bogus: no stage of run_multithread_cluster.sh"),
])
def test_unknown_and_malformed_options_are_named(driver, args, message):
    with pytest.raises(UserError, match=message):
        Invocation(DRIVERS[driver], args)


def test_each_stage_checks_its_own_options_before_anything_runs():
    cli = Invocation(DRIVERS["gather_sense"], ["bbc-news", "--max-length", "0"])
    with pytest.raises(UserError, match=r"scripts/01_count.py: argument --max-length: expected a positive integer"):
        cli.check("count", ["--task", "bbc-news"])
    with pytest.raises(UserError, match="--nproc_per_node must be a whole number >= 1"):
        Invocation(DRIVERS["train"], ["bbc-news", "--nproc_per_node", "0"]).launch()


# issue 22, 6f: on main each of these ran the stages before the one that refused the value
@pytest.mark.parametrize("driver, args, message", [
    ("gather_sense", ["--batch-size", "0"], "scripts/02_gather.py: argument --batch-size: expected a positive integer"),
    ("sep_cluster", ["--senses", "0"], "scripts/03_cluster.py: argument --senses: expected a positive integer"),
    ("train", ["--batch-size", "0"], "scripts/05_train.py: argument --batch-size: expected a positive integer"),
    ("train", ["--dist-timeout", "0"], "scripts/05_train.py: argument --dist-timeout: expected a number > 0"),
    ("multiteacher", ["--val-fraction", "1"], "argument --val-fraction: expected a number in [0, 1), got '1'"),
    ("multiteacher", ["--lsa-dim", "0"], "scripts/10_teacher_embeddings.py: argument --lsa-dim: expected a positive"),
])
def test_every_stage_s_value_ranges_are_checked_before_the_first_stage(monkeypatch, driver, args, message):
    ran = []
    monkeypatch.setattr(Invocation, "run", lambda self, stage, *rest, **kwargs: ran.append(stage))
    with pytest.raises(UserError, match=re.escape(message)):
        DRIVERS[driver].run(Invocation(DRIVERS[driver], ["bbc-news", *args]))
    assert ran == []


def test_every_numeric_option_of_every_stage_states_its_range():
    """What the drivers check before the first stage is what each stage's parser checks: a bare
    int or float type lets a value through that the stage refuses only when it runs."""
    from embdistill.cli import finite_float

    unbounded = [f"{stage.script} {action.option_strings[0]}" for driver in DRIVERS.values()
                 for stage in driver.stages.values() for action in stage.parser._actions
                 if action.type in (int, float, finite_float)]
    assert unbounded == []


# issue 22, 6e: on main the first list was dropped without a word, and a teacher named twice
# trained both students before the evaluation failed
@pytest.mark.parametrize("args, message", [
    (["--teachers", "minilm", "--teachers", "lsa"], "argument --teachers: given twice: give its values once"),
    (["--teachers", "minilm", "minilm"], "argument --teachers: 'minilm' given twice"),
])
def test_a_list_option_is_given_once_with_each_value_once(monkeypatch, args, message):
    ran = []
    monkeypatch.setattr(Invocation, "run", lambda self, stage, *rest, **kwargs: ran.append(stage))
    with pytest.raises(UserError, match=re.escape(message)):
        DRIVERS["multiteacher"].run(Invocation(DRIVERS["multiteacher"], ["bbc-news", *args]))
    assert ran == []


def test_a_stage_run_by_hand_refuses_a_repeated_list_option_too():
    evaluate = stage_parser_of("scripts/06_evaluate.py")
    with pytest.raises(UserError, match="argument --models: given twice"):
        evaluate.parse_args(["--models", "minilm", "--models", "lsa"])
    with pytest.raises(UserError, match="argument --tasks: 'bbc-news' given twice"):
        evaluate.parse_args(["--models", "minilm", "--tasks", "bbc-news", "bbc-news"])
    assert evaluate.parse_args(["--models", "minilm", "lsa"]).models == ["minilm", "lsa"]


@pytest.mark.parametrize("flags, how", [([], "here"), (["--nproc_per_node", "2"], "torchrun"),
                                       (["--nnodes", "2", "--node_rank", "1"], "torchrun")])
def test_only_a_launch_of_several_processes_goes_through_torchrun(monkeypatch, flags, how):
    """One process on one machine runs a launched stage in the driver's process (no launcher,
    no second start-up); more processes or machines go through embdistill.torchrun."""
    calls = []
    monkeypatch.setattr("embdistill.drivers.run_process",
                        lambda command, env, output: calls.append(("torchrun", command)) or 0)
    monkeypatch.setattr("embdistill.drivers.run_in_this_process", lambda script, args: calls.append(("here", [script, *args])) or 0)
    cli = Invocation(DRIVERS["train"], ["bbc-news", "--loss", "mse", *flags])
    cli.run("train", ["--task", "bbc-news"], launch=cli.launch())
    ((called, command),) = calls
    assert called == how and ("embdistill.torchrun" in command) == (how == "torchrun")
    assert command[-4:] == ["--task", "bbc-news", "--loss", "mse"]


def test_a_stage_run_in_the_driver_s_process_gives_its_exit_status(tmp_path, capsys):
    from embdistill.drivers import run_in_this_process

    assert run_in_this_process("scripts/08_quantize.py", ["--task", "bbc-news", "--base-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no SentenceTransformer folder")
    assert run_in_this_process("scripts/00_texts.py", ["--task", "bbc-news", "--max-train", "8", "--max-test", "4",
                                                       "--base-dir", str(tmp_path)]) == 0
    assert (tmp_path / "text_train" / "bbc-news" / "train.json").is_file()


def test_lib_sh_and_studies_run_a_stage_through_the_drivers_run_stage(tmp_path, capsys):
    """lib.sh's run_stage (run_demo.sh's) is ``python -m embdistill.drivers stage``; a study runs a
    stage in a process of its own with its output in a log file (``output``)."""
    from embdistill.drivers import main, run_stage

    args = ["--task", "bbc-news", "--base-dir", str(tmp_path)]
    assert main(["stage", "scripts/08_quantize.py", *args]) == 2
    assert capsys.readouterr().err.startswith("error: no SentenceTransformer folder")
    with open(tmp_path / "stage.log", "w") as log:
        assert run_stage("scripts/08_quantize.py", args, env={"PYTHONPATH": str(REPO)}, output=log) == 2
    assert (tmp_path / "stage.log").read_text().strip().splitlines()[-1].startswith("error: no SentenceTransformer")


def test_a_stage_in_the_driver_s_process_ends_on_sigterm_in_one_line_after_its_cleanup(tmp_path):
    stage, marker = tmp_path / "stage.py", tmp_path / "marker"
    stage.write_text("import pathlib, time\n"
                     "def main(argv):\n"
                     "    marker = pathlib.Path(argv[0])\n"
                     "    try:\n"
                     "        marker.write_text('started')\n"
                     "        time.sleep(120)\n"
                     "    finally:\n"
                     "        marker.write_text('cleaned up')\n")
    code = ("import sys; from embdistill.drivers import run_in_this_process; "
            f"sys.exit(run_in_this_process({str(stage)!r}, [{str(marker)!r}]))")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not (marker.is_file() and marker.read_text() == "started"):
        assert time.time() < deadline and process.poll() is None, "the stage did not start"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip() == f"error: {stage}: ended with signal SIGTERM"
    assert marker.read_text() == "cleaned up"


def test_stages_of_a_driver_agree_on_each_shared_option():
    """A name two stages of a driver share takes the same values in both (else routing it by
    name would be wrong); every driver's stages are checked."""
    for driver in DRIVERS.values():
        Invocation(driver, [])


# ------------------------------------------------------------------------------------------
# the drivers as users run them


@pytest.mark.slow
def test_an_unknown_option_is_named_before_the_first_stage(tmp_path):
    """On main, run_gather_sense.sh took --base-dir as the value of --bogus, and
    run_multiteacher.sh failed only after two stages had run."""
    line = one_error_line(drive("run_gather_sense.sh", "bbc-news", "--bogus", "--base-dir", str(tmp_path / "w")))
    assert line.startswith("error: unknown option --bogus")
    line = one_error_line(drive("run_multiteacher.sh", "bbc-news", "--base-dir", str(tmp_path / "w"),
                                "--epochs", "x"))
    assert line.startswith("error: scripts/11_train_multiteacher.py: argument --epochs: expected a positive integer, got 'x'")
    assert not (tmp_path / "w").exists()  # no stage ran


def test_the_driver_passes_signals_on_and_its_stage_dies_with_it(tmp_path):
    """run_process: a SIGTERM to the driver reaches the stage; kill -9 of the driver ends it."""
    stage = tmp_path / "stage.py"
    stage.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    driver = ("import os, sys\nfrom embdistill.drivers import run_process\n"
              f"print(run_process([sys.executable, {str(stage)!r}, sys.argv[1]], os.environ))\n")

    def start(pid_file):
        process = subprocess.Popen([sys.executable, "-c", driver, str(pid_file)], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        return process, int(pid_file.read_text())

    process, stage_pid = start(tmp_path / "a")
    process.send_signal(signal.SIGTERM)
    assert process.communicate(timeout=30)[0].strip() == str(-signal.SIGTERM)  # the stage ended by it
    process, stage_pid = start(tmp_path / "b")
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{stage_pid}").exists() and "\nState:\tZ" not in _status(stage_pid):
        assert time.monotonic() < deadline, "the stage outlived its driver"
        time.sleep(0.05)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "\nState:\tZ"


# ------------------------------------------------------------------------------------------
# every driver, end to end, on a user's data file


def user_data(path: Path) -> Path:
    topics = {"sport": ["team", "match", "goal", "player", "coach", "league", "season", "score"],
              "money": ["bank", "price", "market", "stock", "loan", "profit", "trade", "rates"]}
    rows = []
    for label, words in topics.items():
        for i in range(24):
            picked = [words[(i * 3 + j) % len(words)] for j in range(5)]
            rows.append({"text": f"the {' and the '.join(picked)} story number {i}", "label": label})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_every_driver_runs_on_a_user_data_file(tmp_path, tiny_bert_dir):
    """On main the combine took the data file itself for a rank pickle ('corrupt pickle')."""
    data = user_data(tmp_path / "data.jsonl")
    base = ["--base-dir", str(tmp_path / "out")]
    teacher = ["--teacher", str(tiny_bert_dir)]
    texts = subprocess.run([sys.executable, str(REPO / "scripts" / "00_texts.py"), "--task", str(data), *base],
                           capture_output=True, text=True, timeout=300)
    assert texts.returncode == 0, texts.stderr[-3000:]
    paths = Paths(tmp_path / "out", "data", tiny_bert_dir.name)

    def ok(script, *args):
        result = drive(script, str(data), *args, *base)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
        return result

    ok("run_gather_sense.sh", *teacher, "--max-length", "32", "--batch-size", "16")
    assert paths.combined.is_file()
    ok("run_sep_cluster.sh", *teacher)
    ok("run_multithread_cluster.sh", *teacher, "--procs", "1", "--output", str(tmp_path / "mt.kmeanspkl"))
    assert paths.sense_dict.is_file() and (tmp_path / "mt.kmeanspkl").is_file()
    ok("run_train.sh", *teacher, "--loss", "sense", "--student-layers", "1", "--max-steps", "2", "--batch-size", "4",
       "--max-length", "32")
    student = paths.export_dir / "hf"
    evaluation = ["--batch-size", "16", "--max-length", "32", "--throughput-texts", "8", "--n-experiments", "1",
                  "--samples-per-label", "4"]
    ok("run_evaluate.sh", "--run", "e2e", *evaluation, "--models", f"replace:{student}@{paths.sense_dict}")
    assert (tmp_path / "out" / "results" / "e2e" / "table.json").is_file()
    ok("run_multiteacher.sh", "--teachers", str(tiny_bert_dir), "lsa", "--student", str(tiny_bert_dir),
       "--student-layers", "1", "--lsa-dim", "4", "--max-steps", "2", "--batch-size", "4", "--max-length", "32",
       "--teacher-batch-size", "16", *evaluation)
    table = json.loads((tmp_path / "out" / "results" / "multiteacher" / "table.json").read_text())
    assert {"nll-student-standardised-targets", "mse-student-raw-targets", "student-before", "lsa"} <= {
        model["label"] for model in table["models"]}
