"""The torchrun entry point the shell drivers use (embdistill.torchrun)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _launch(tmp_path, script_body, *script_args):
    script = tmp_path / "stage.py"
    script.write_text(script_body)
    return subprocess.run(
        [sys.executable, "-m", "embdistill.torchrun", "--nproc_per_node", "1",
         str(script), *script_args],
        capture_output=True, text=True, timeout=120,
    )


def test_stage_options_are_not_abbreviations_of_torchrun_options(tmp_path):
    # Plain torchrun fails here: "ambiguous option: --run could match --run-path, --run_path".
    result = _launch(tmp_path, "import sys; print(sys.argv[1:])", "--run", "x", "--nproc", "3")
    assert result.returncode == 0, result.stderr
    assert "['--run', 'x', '--nproc', '3']" in result.stdout


def test_failed_worker_gives_one_line_and_its_status(tmp_path):
    result = _launch(tmp_path, "import sys; print('error: bad task', file=sys.stderr); sys.exit(2)")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("rank 0 ended with status 2")


def test_device_options_fail_in_one_line():
    import pytest
    import torch

    from embdistill.distributed import resolve_device
    from embdistill.errors import UserError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_evaluation_with_a_bad_device_exits_2_in_one_line(tmp_path):
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "06_evaluate.py"
    result = subprocess.run([sys.executable, str(script), "--base-dir", str(tmp_path), "--task", "bbc-news",
                             "--models", "teacher:minilm", "--device", "gpu0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: unknown device 'gpu0' (e.g. cpu, cuda, cuda:1)"


# ------------------------------------------------------------------------------------------
# the launcher under faults: ports, flags, signals, a dying rank (issue 13, items 7-10)

WORKER = """
import os, sys, time
from embdistill.cli import run_main

def main():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    open(os.path.join(sys.argv[1], f"pid{rank}"), "w").write(str(os.getpid()))
    if len(sys.argv) > 2 and rank == int(sys.argv[2]):
        time.sleep(1)
        os.kill(os.getpid(), 9)
    time.sleep(60)

run_main(main)
"""


def _start(tmp_path, *args, launch=("--nproc_per_node", "2")):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, "-m", "embdistill.torchrun", *launch, str(script), str(tmp_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _worker_pids(tmp_path, launcher, timeout=120):
    deadline = time.monotonic() + timeout
    while not all((tmp_path / f"pid{rank}").is_file() for rank in (0, 1)):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    return [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _last_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_bad_launch_flags_end_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {("--master_port", str(port)): f"error: port {port} is in use",
                 ("--master_port", "99999"): "error: --master_port must be 1 to 65535, got 99999",
                 ("--nproc_per_node", "0"): "error: --nproc_per_node must be a whole number >= 1, got '0'"}
        for flags, message in cases.items():
            launch = _start(tmp_path, launch=flags)
            _, err = launch.communicate(timeout=120)
            assert launch.returncode == 2 and _last_line(err).startswith(message), err[-3000:]


@pytest.mark.slow
def test_workers_end_with_a_killed_launcher(tmp_path):
    """kill -9 of the launcher: its workers must not go on writing (they would race a rerun)."""
    launcher = _start(tmp_path)
    pids = _worker_pids(tmp_path, launcher)
    launcher.kill()
    launcher.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    running = [pid for pid in pids if _running(pid)]
    for pid in running:  # clean up after a failure
        os.kill(pid, signal.SIGKILL)
    assert not running


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_launcher_stops_the_workers_in_one_line(tmp_path, signum, status):
    launcher = _start(tmp_path)
    pids = _worker_pids(tmp_path, launcher)
    launcher.send_signal(signum)
    _, err = launcher.communicate(timeout=90)
    assert launcher.returncode == status
    assert err.strip().splitlines()[-1] == (f"error: {tmp_path / 'worker.py'}: interrupted by "
                                            f"{signal.Signals(signum).name}; the workers were stopped")
    assert _last_line(err)  # that line alone: no worker's "interrupted", no traceback
    assert not any(_running(pid) for pid in pids)


@pytest.mark.slow
def test_the_rank_that_failed_first_is_named(tmp_path):
    """Rank 1 dies; rank 0 is then stopped by torchrun with SIGTERM. On main the launcher
    named the lowest rank, 'rank 0 ended with signal SIGTERM'."""
    launcher = _start(tmp_path, "1")
    _, err = launcher.communicate(timeout=120)
    assert _last_line(err) == f"error: {tmp_path / 'worker.py'}: rank 1 ended with signal SIGKILL"
    assert launcher.returncode == 128 + signal.SIGKILL
