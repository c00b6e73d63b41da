"""bench/gpu_check.sh --tiny: the GPU check's code, every section, on the CPU at toy sizes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["attention", "gather", "cluster", "faiss", "skd_step", "replace", "ddp"]


@pytest.mark.slow  # about 40 s on 2 cores: the ddp section starts two processes
def test_tiny_gpu_check_runs_every_section_without_mteb_or_datasets(tmp_path):
    blocked = tmp_path / "blocked"  # the GPU machine has neither: importing one must fail the run
    blocked.mkdir()
    for name in ("mteb", "datasets"):
        (blocked / f"{name}.py").write_text("raise ImportError('the GPU check must not need this')\n")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--tiny"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(blocked), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["meta"]["mode"] == "tiny" and list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        if section["status"] == "ok":
            assert section["results"] and section["rows"], name
        else:
            assert section["reason"], name
    assert report["sections"]["replace"]["results"]["outputs_equal"]
    assert report["sections"]["ddp"]["results"]["parameters_equal"]
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in SECTIONS)


@pytest.mark.slow  # a process start-up with torch and transformers
def test_without_a_gpu_the_full_check_says_so_in_one_line(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--only", "replace"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        pytest.skip("a GPU is visible here")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no CUDA device")
    usage = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
