"""Devices per process (``--device``, ``--teacher-device``) with a mocked CUDA, the NCCL notice,
and what the stages do with them: each process binds its own GPU."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embdistill import distributed
from embdistill.artifacts import save_pickle, write_manifest
from embdistill.distributed import DistEnv, bind_device, default_device, init_distributed, resolve_device
from embdistill.errors import UserError
from embdistill.paths import Paths
from embdistill.senses.gather import count_config
from helpers import run_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch):
    """A node with 4 GPUs as far as torch.cuda says; returns the devices set_device was given."""
    bound: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: bound.append(torch.device(device)))
    monkeypatch.setattr(distributed, "_bound_device", None, raising=False)
    return bound


def local(rank: int, processes: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=processes, local_world_size=processes)


def cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


def test_cuda_is_this_processs_own_gpu(gpus):
    for rank in range(4):
        assert resolve_device("cuda", local(rank, 4)) == cuda(rank)
        assert resolve_device(None, local(rank, 4)) == cuda(rank) == default_device(local(rank, 4))
    assert resolve_device("cpu", local(3, 4)) == torch.device("cpu")


def test_cuda_n_is_an_offset_per_local_process(gpus):
    assert resolve_device("cuda:1", local(0, 1)) == cuda(1)  # one process: torch's meaning
    assert [resolve_device("cuda:2", local(r, 2)) for r in range(2)] == [cuda(2), cuda(3)]
    with pytest.raises(UserError, match=r"would use cuda:4, but 4 GPU\(s\) are visible"):
        resolve_device("cuda:1", local(3, 4))


def test_a_list_gives_one_device_per_local_process(gpus):
    assert [resolve_device("cuda:3,cuda:0", local(r, 2)) for r in range(2)] == [cuda(3), cuda(0)]
    assert resolve_device("cpu,cuda:1", local(0, 2)) == torch.device("cpu")
    with pytest.raises(UserError, match="2 devices for 3 process"):
        resolve_device("cuda:0,cuda:1", local(0, 3))
    with pytest.raises(UserError, match="would use cuda:7"):
        resolve_device("cuda:0,cuda:7", local(1, 2))
    with pytest.raises(UserError, match="unknown device 'gpu1'"):
        resolve_device("cuda:0,gpu1", local(1, 2))


def test_more_processes_than_gpus_share_them_with_a_warning(gpus, caplog):
    with caplog.at_level(logging.WARNING, logger="embdistill.distributed"):
        assert [resolve_device("cuda", local(r, 6)) for r in (0, 3, 4, 5)] == [cuda(0), cuda(3), cuda(0), cuda(1)]
    assert "6 processes on this node share 4 GPU(s)" in caplog.text


def test_without_cuda_a_cuda_device_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for arg in ("cuda", "cuda:1", "cpu,cuda:0"):
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device(arg, local(0, 2 if "," in arg else 1))
    assert resolve_device(None, local(1, 2)) == torch.device("cpu")
    with pytest.raises(UserError, match="only cpu and cuda"):
        resolve_device("meta")


def test_nccl_joins_on_the_bound_gpu_and_says_what_a_hung_peer_does(gpus, monkeypatch, caplog):
    joined = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    bind_device(resolve_device("cuda:2"))  # GPUs 2 and 3 for the two processes
    with caplog.at_level(logging.INFO, logger="embdistill.distributed"):
        init_distributed(timeout_s=120)
    assert joined["backend"] == "nccl" and joined["timeout"].total_seconds() == 120
    assert gpus == [cuda(3), cuda(3)]  # bound, then the same GPU for NCCL (not cuda:LOCAL_RANK)
    assert "NCCL watchdog abort this process (SIGABRT" in caplog.text and "120 s (--dist-timeout)" in caplog.text


# ----------------------------------------------------------------------- the stages' devices


class Stop(Exception):
    """Raised by a mocked loader once the stage has chosen its devices."""


def run_until_stopped(script: str, args: list[str], monkeypatch) -> None:
    with pytest.raises(Stop):
        run_stage(script, *args)


@pytest.fixture
def second_of_two(gpus, monkeypatch):
    """This process is local rank 1 of 2 on one node (no process group: WORLD_SIZE 1)."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "1")
    return gpus


def record_teacher_device(monkeypatch, module) -> list:
    devices = []

    def fake_load_teacher(name, *, device=None, **kwargs):
        devices.append(torch.device(device))
        raise Stop

    monkeypatch.setattr(module, "load_teacher", fake_load_teacher)
    return devices


def test_gather_puts_each_processs_teacher_on_its_own_gpu(tmp_path, second_of_two, monkeypatch):
    import embdistill.teachers

    paths = Paths(tmp_path, "bbc-news", "minilm")
    paths.text_dir.mkdir(parents=True)
    paths.train_json.write_text(json.dumps(["a text !@#$%^&*()the cat sat"]))
    save_pickle({5: 1}, paths.counts)
    write_manifest(paths.counts, stage="count", config=count_config("minilm", 512))
    devices = record_teacher_device(monkeypatch, embdistill.teachers)
    run_until_stopped("scripts/02_gather.py", ["--base-dir", str(tmp_path), "--device", "cuda"], monkeypatch)
    assert devices == [cuda(1)] and second_of_two == [cuda(1)]


def test_cluster_runs_on_each_processs_own_gpu(tmp_path, second_of_two, monkeypatch):
    import embdistill.senses.cluster

    combined = tmp_path / "combined.pkl"
    save_pickle({5: np.zeros((6, 4), dtype=np.float16)}, combined)
    devices = []

    def fake_run(*args, **kwargs):
        devices.append(args[6])
        raise Stop

    monkeypatch.setattr(embdistill.senses.cluster, "run", fake_run)
    run_until_stopped("scripts/03_cluster.py", ["--base-dir", str(tmp_path), "--input", str(combined),
                                        "--device", "cuda"], monkeypatch)
    assert devices == [cuda(1)] and second_of_two == [cuda(1)]


@pytest.mark.parametrize("teacher_device, expected", [
    (None, 3),  # a spare GPU: local rank + local world size
    ("cuda", 3),
    ("cuda:0,cuda:1", 1),
    ("cuda:2", 3),  # an offset, as --device
])
def test_training_binds_the_student_and_gives_the_teacher_a_gpu_per_process(
        tmp_path, second_of_two, monkeypatch, teacher_device, expected):
    import embdistill.objectives.state_matching  # --loss mse's objective loads the teacher

    devices = record_teacher_device(monkeypatch, embdistill.objectives.state_matching)
    paths = Paths(tmp_path, "bbc-news", "minilm")
    paths.text_dir.mkdir(parents=True)
    paths.train_json.write_text(json.dumps(["a text !@#$%^&*()the cat sat"]))
    extra = ["--teacher-device", teacher_device] if teacher_device else []
    run_until_stopped("scripts/05_train.py", ["--base-dir", str(tmp_path), "--device", "cuda", "--loss", "mse", *extra],
              monkeypatch)
    assert second_of_two == [cuda(1)] and devices == [cuda(expected)]


def test_a_process_aborted_like_by_the_nccl_watchdog_ends_the_launch_in_one_line(tmp_path):
    """What a user sees when NCCL's watchdog aborts a rank whose peer hung (the CPU cannot run
    NCCL: the worker prints the watchdog's words and aborts as it does): the worker's lines,
    then the launcher's one line naming the rank and SIGABRT, a failing status."""
    import subprocess

    script = tmp_path / "stage.py"
    script.write_text(
        "import os, sys\n"
        "print('[rank0]:[E] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
        "OpType=ALLREDUCE, Timeout(ms)=1800000) ran for 1800083 milliseconds before timing out.', "
        "file=sys.stderr, flush=True)\n"
        "os.abort()\n")
    result = subprocess.run([sys.executable, "-m", "embdistill.torchrun", "--nproc_per_node", "1", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Watchdog caught collective operation timeout" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "SIGABRT" in last, result.stderr
