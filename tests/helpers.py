"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

import socket
from pathlib import Path


def run_stage(script: str, *args) -> int:
    """:func:`embdistill.drivers.run_stage` (in this process, as the drivers run a one-process
    stage); returns the exit status. ``script``: relative to the repository (``scripts/05_train.py``)."""
    from embdistill.drivers import run_stage as run

    return run(script, args)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Runs a Python script with one method wrapped to SIGKILL the process on its n-th call: a real
# kill -9 at a known point (no cleanup, no exception handlers), without a hook in the library.
KILLER = """
import importlib, os, runpy, signal, sys
module, owner, method, n, script = sys.argv[1:6]
cls = getattr(importlib.import_module(module), owner)
original, calls = getattr(cls, method), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(cls, method, dying)
sys.argv = [script] + sys.argv[6:]
runpy.run_path(script, run_name="__main__")
"""


def killed_command(module: str, owner: str, method: str, n: int, script, *args) -> list[str]:
    """The command that runs ``script`` and SIGKILLs it on the n-th call of owner.method
    (``owner`` a class, or a module whose function ``method`` is replaced)."""
    import sys

    return [sys.executable, "-c", KILLER, module, owner, method, str(n), str(script), *map(str, args)]


def save_dictionary(dictionary, path: Path, sense_rule: str | None = None) -> Path:
    """A sense dictionary file; with ``sense_rule``, a manifest recording it (None: no manifest,
    as the original's files and ours from before the rule was recorded)."""
    from embdistill.artifacts import save_pickle, write_manifest

    save_pickle(dictionary, path)
    if sense_rule is not None:
        write_manifest(path, stage="cluster", config={"sense_rule": sense_rule})
    return path


def combine_to_dict(groups, cap: int, seed: int, pickle: str = "always"):
    """Run the combine into a throw-away folder: (combined.pkl as a dict, the metadata); the
    dict is read back from the row file where ``pickle`` writes no pickle."""
    import tempfile

    from embdistill.artifacts import fingerprint, load_pickle
    from embdistill.senses.combine import combine, combined_artifact, open_combined

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "combined.pkl"
        meta = combine(groups, cap, seed, output, config={}, inputs={}, combined_pickle=pickle)
        if output.exists():
            return load_pickle(output), meta
        rows = combined_artifact(output)
        return {t: v.copy() for t, v in open_combined(rows, fingerprint(rows)).items()}, meta
