"""Safe pickles, atomic writes, manifests and the skip-if-done rule."""

import io
import os
import pickle

import numpy as np
import pytest
import torch

from embdistill import artifacts
from embdistill.errors import UserError


class _RunsCommand:
    """A pickle payload that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_roundtrip_numpy_dict(tmp_path):
    states = {7: np.arange(12, dtype=np.float16).reshape(3, 4), 9: np.ones((1, 4), np.float32)}
    artifacts.save_pickle(states, tmp_path / "s.pkl")
    loaded = artifacts.load_pickle(tmp_path / "s.pkl")
    assert loaded.keys() == states.keys()
    for key in states:
        np.testing.assert_array_equal(loaded[key], states[key])
        assert loaded[key].dtype == states[key].dtype


def test_reads_original_bf16_tensor_layout(tmp_path):
    """The original's .kmeanspkl: dict token_id -> bf16 torch tensor, written by pickle.dump."""
    senses = {101: torch.randn(5, 8).to(torch.bfloat16), 2023: torch.randn(6, 8).to(torch.bfloat16)}
    with open(tmp_path / "orig.kmeanspkl", "wb") as fh:
        pickle.dump(senses, fh)
    loaded = artifacts.load_pickle(tmp_path / "orig.kmeanspkl")
    for key, value in senses.items():
        assert loaded[key].dtype == torch.bfloat16
        assert torch.equal(loaded[key], value)


def test_refuses_code_execution_payload(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({1: _RunsCommand(marker)}))
    with pytest.raises(UserError, match="unsafe pickle.*posix.system|unsafe pickle.*os.system"):
        artifacts.load_pickle(path)
    assert not marker.exists()


def test_refuses_payload_hidden_in_torch_storage(tmp_path):
    """torch.storage._load_from_bytes would torch.load(weights_only=False) its bytes."""
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    torch.save(_RunsCommand(marker), inner)

    class _Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (inner.getvalue(),))

    path = tmp_path / "evil_storage.pkl"
    path.write_bytes(pickle.dumps({1: _Storage()}))
    with pytest.raises(UserError) as refused:
        artifacts.load_pickle(path)
    assert not marker.exists()
    # one line, naming what was refused, and no advice to load it unsafely (torch's own message
    # has four lines recommending weights_only=False)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "unsafe pickle" in message and "posix.system" in message
    assert "weights_only" not in message


def test_truncated_and_missing_pickles(tmp_path):
    path = tmp_path / "s.pkl"
    artifacts.save_pickle({1: np.zeros((50, 16), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt pickle"):
        artifacts.load_pickle(path)
    with pytest.raises(UserError, match="missing file"):
        artifacts.load_pickle(tmp_path / "nope.pkl")


def test_out_of_memory_is_not_called_corrupt(tmp_path, monkeypatch):
    """A MemoryError while loading says so, with the file and its size, in one line."""
    path = tmp_path / "s.pkl"
    artifacts.save_pickle({1: np.zeros((1024, 256), np.float32)}, path)

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(artifacts.RestrictedUnpickler, "load", out_of_memory)
    with pytest.raises(UserError) as failed:
        artifacts.load_pickle(path)
    message = str(failed.value)
    assert len(message.splitlines()) == 1 and "corrupt" not in message
    assert str(path) in message and "out of memory" in message and "1.0 MB" in message


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.pkl"
    artifacts.save_pickle({"a": 1}, path)
    with pytest.raises(RuntimeError):
        with artifacts.atomic_open(path) as fh:
            fh.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert artifacts.load_pickle(path) == {"a": 1}  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.pkl"]  # no temp file left


def test_a_replaced_folder_is_readable_by_others_like_any_written_file(tmp_path):
    # transformers' save_pretrained writes model.safetensors through a temp file: 0600
    import tempfile

    with artifacts.replacing_folder(tmp_path / "export") as building:
        building.mkdir()
        fd, temp = tempfile.mkstemp(dir=building)
        os.close(fd)
        os.replace(temp, building / "model.safetensors")
        (building / "sub").mkdir()
        (building / "sub" / "run.sh").write_text("")
        os.chmod(building / "sub" / "run.sh", 0o700)
    plain = 0o666 & ~artifacts._UMASK
    assert (tmp_path / "export" / "model.safetensors").stat().st_mode & 0o777 == plain
    assert (tmp_path / "export" / "sub" / "run.sh").stat().st_mode & 0o777 == plain | 0o100


def test_a_failed_write_names_the_file(tmp_path):
    """A full disk fails inside write(), whose OSError names no file: the error must."""
    path = tmp_path / "out.pkl"

    class FullDisk(io.RawIOBase):
        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as failed:
        with artifacts.atomic_open(path) as fh:
            FullDisk().write(b"rows")
    assert failed.value.errno == 28 and failed.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


HOLD_LOCK = """
import sys, time
from embdistill.artifacts import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_one_writer_per_output_and_a_dead_writers_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    output = tmp_path / "runs" / "skd"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert (tmp_path / "runs" / "skd.lock").read_text().split()[0] == str(holder.pid)
        with pytest.raises(UserError, match=f"{output} is being written by another process "
                                            rf"\(pid {holder.pid} on .*\); wait for it"):
            with artifacts.output_lock(output):
                pass
    finally:
        holder.kill()  # kill -9: the lock file stays, with the dead pid in it
        holder.wait()
    assert (tmp_path / "runs" / "skd.lock").exists()
    with artifacts.output_lock(output) as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_manifest_decides_done(tmp_path):
    source, out = tmp_path / "in.txt", tmp_path / "out.pkl"
    source.write_text("v1")
    config = {"k": 5, "rule": "mcl", "layers": (1, 2)}
    assert not artifacts.is_done(out, config=config, inputs={"in": source})
    artifacts.save_pickle({}, out)
    assert not artifacts.is_done(out, config=config, inputs={"in": source})  # no manifest yet
    manifest = artifacts.write_manifest(out, stage="test", config=config, inputs={"in": source})
    assert manifest["versions"]["torch"] == torch.__version__
    assert artifacts.is_done(out, config=config, inputs={"in": source})
    assert artifacts.skip_if_done(out, config=config, inputs={"in": source})
    assert not artifacts.skip_if_done(out, config=config, inputs={"in": source}, overwrite=True)
    assert not artifacts.is_done(out, config={**config, "k": 6}, inputs={"in": source})
    source.write_text("v2")
    assert not artifacts.is_done(out, config=config, inputs={"in": source})


def test_logging_follows_the_current_stderr(monkeypatch):
    """A stage run twice in one process logs to the stderr of the second run."""
    import logging
    import sys

    from embdistill.cli import setup_logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("INFO")
    first.close()  # as pytest closes a finished test's capture
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("embdistill.test").warning("second run")
    assert "second run" in second.getvalue()


# ------------------------------------------------------------------ environment errors


@pytest.mark.parametrize("error, line", [
    (OSError(28, "No space left on device", "/data/runs/skd/metrics.jsonl"),
     "error: /data/runs/skd/metrics.jsonl: No space left on device"),
    (PermissionError(13, "Permission denied", "/data/text_train"), "error: /data/text_train: Permission denied"),
    (MemoryError(), "error: out of memory; try smaller batches (--batch-size) or fewer texts"),
])
def test_environment_errors_are_one_line_naming_the_path(error, line, capsys):
    from embdistill.cli import run_main

    def main():
        raise error

    with pytest.raises(SystemExit) as exited:
        run_main(main)
    assert exited.value.code == 1 and capsys.readouterr().err == line + "\n"


def test_a_base_dir_that_cannot_be_written_is_one_line(tmp_path):
    """On main: an OSError traceback (a read-only folder or a full disk end the same way)."""
    import subprocess
    import sys
    from pathlib import Path

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "00_texts.py"),
                             "--task", "bbc-news", "--max-train", "20", "--max-test", "5",
                             "--base-dir", str(blocker / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {blocker / 'out'}") and lines[-1].endswith("Not a directory"), result.stderr


def test_fingerprints_are_content_hashes_computed_once_per_version(tmp_path, monkeypatch):
    import hashlib
    import os

    from embdistill import artifacts, digests

    path = tmp_path / "states.bin"
    path.write_bytes(b"x" * 3000)
    opened = []
    monkeypatch.setattr(digests, "open", lambda *a, **k: opened.append(a[0]) or open(*a, **k), raising=False)
    first = artifacts.fingerprint(path)
    assert first == hashlib.sha256(b"x" * 3000).hexdigest()
    assert artifacts.fingerprint(path) == first and len(opened) == 1  # the second call reads nothing
    path.write_bytes(b"y" * 3000)  # same size, new content
    os.utime(path, ns=(1, 2))  # and a modification time of its own
    assert artifacts.fingerprint(path) == hashlib.sha256(b"y" * 3000).hexdigest() and len(opened) == 2
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub" / "b.bin").write_bytes(b"b")
    before = artifacts.fingerprint(folder)
    (folder / "sub" / "b.bin").rename(folder / "sub" / "c.bin")  # a renamed file changes the folder's
    assert artifacts.fingerprint(folder) != before


def test_a_damaged_output_is_redone_not_skipped(tmp_path, caplog):
    """On main a truncated export/st/model.safetensors was 'up to date, skipping' (issue 22, 6b):
    the manifest records each output file's size, time and sha256, and is_done checks them."""
    out = tmp_path / "export"
    weights = out / "st" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w" * 1000)
    (out / "config.json").write_text("{}")
    artifacts.write_manifest(out, stage="train", config={})
    assert artifacts.is_done(out, config={})
    os.truncate(weights, 500)
    assert not artifacts.is_done(out, config={})
    assert f"damaged output, redoing it: {weights} has 500 bytes, 1000 were written" in caplog.text
    weights.write_bytes(b"w" * 1000)
    os.utime(weights, ns=(1, 1))  # the same bytes at another time (a copy): hashed, and found the same
    assert artifacts.is_done(out, config={})
    with open(weights, "r+b") as fh:
        fh.write(b"x")  # a flipped byte in place (a new modification time, set here to be sure)
    os.utime(weights, ns=(2, 2))
    assert not artifacts.is_done(out, config={}) and "changed since it was written" in caplog.text
    weights.unlink()
    assert not artifacts.is_done(out, config={}) and f"{weights} is missing" in caplog.text
    (out / "st" / "model.safetensors").write_bytes(b"w" * 1000)
    (out / "st-int8").mkdir()  # a later stage's folder inside: not this output's
    (out / "st-int8" / "model.onnx").write_bytes(b"int8")
    os.utime(weights, ns=(3, 3))
    assert artifacts.is_done(out, config={})
