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
    with pytest.raises(UserError):
        artifacts.load_pickle(path)
    assert not marker.exists()


def test_truncated_and_missing_pickles(tmp_path):
    path = tmp_path / "s.pkl"
    artifacts.save_pickle({1: np.zeros((50, 16), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt pickle"):
        artifacts.load_pickle(path)
    with pytest.raises(UserError, match="missing file"):
        artifacts.load_pickle(tmp_path / "nope.pkl")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.pkl"
    artifacts.save_pickle({"a": 1}, path)
    with pytest.raises(RuntimeError):
        with artifacts.atomic_open(path) as fh:
            fh.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert artifacts.load_pickle(path) == {"a": 1}  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.pkl"]  # no temp file left


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
