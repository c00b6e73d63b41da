"""The torchrun entry point the shell drivers use (embdistill.torchrun)."""

import subprocess
import sys


def _launch(tmp_path, script_body, *script_args):
    script = tmp_path / "stage.py"
    script.write_text(script_body)
    return subprocess.run(
        [sys.executable, "-m", "embdistill.torchrun", "--nproc_per_node", "1", "--master_port", "0",
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
