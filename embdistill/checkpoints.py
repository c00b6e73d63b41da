"""The Trainer's checkpoints on disk (``run_dir/checkpoints/step-NNNNNNNN.pt``): the RNG states
they carry, which one a run resumes from, and whether it belongs to the run resuming it.

A checkpoint holds the model, optimiser and scheduler states, every rank's RNG states, the
position in the data (epoch, step within it, global step), the run's resolved config and the
caller's state (:class:`embdistill.training.Trainer` writes and reads it).
"""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from .artifacts import normalise_config, save_torch, weights_only_refusal
from .errors import UserError, first_line

log = logging.getLogger("embdistill.checkpoints")

CHECKPOINT_PATTERN = "step-*.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "step_in_epoch", "global_step", "config")
# Settings that may change between a checkpoint and its resumption: they set how long to train
# and what to write, not what a step does.
RESUMABLE_CHANGES = ("epochs", "max_steps", "save_every", "keep_last", "log_every", "dist_timeout_s")


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values (``torch.load(weights_only=True)``
    reads them back without extra safe globals)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU visible when the checkpoint was written; the number may differ now
        # (another machine, CUDA_VISIBLE_DEVICES): restore those that exist. Only the resumed
        # run's random draws on the other GPUs then differ from an uninterrupted run's.
        saved, visible = state["cuda"], torch.cuda.device_count()
        for index, device_state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(device_state, index)
        if len(saved) != visible:
            log.warning("the checkpoint holds CUDA RNG states of %d GPU(s), %d are visible: restored "
                        "%d; random draws on the others are not those of an uninterrupted run",
                        len(saved), visible, min(len(saved), visible))


def checkpoint_path(checkpoint_dir: Path, global_step: int) -> Path:
    return checkpoint_dir / f"step-{global_step:08d}.pt"


def write_checkpoint(state: dict, checkpoint_dir: Path, keep_last: int) -> Path:
    """``state`` saved as the checkpoint of its ``global_step`` (atomically; a full disk: one
    line, the previous checkpoints kept), then all but the last ``keep_last`` deleted."""
    path = checkpoint_path(checkpoint_dir, state["global_step"])
    save_torch(state, path)
    for old in sorted(checkpoint_dir.glob(CHECKPOINT_PATTERN))[:-keep_last]:
        old.unlink()
    log.info("saved %s", path)
    return path


def latest_readable(checkpoint_dir: Path) -> tuple[Path, dict] | None:
    """The latest checkpoint that loads, with its state; None when there is none. UserError
    when there are checkpoints but none is readable: starting over would discard them silently."""
    unreadable = []
    for path in sorted(checkpoint_dir.glob(CHECKPOINT_PATTERN), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
            if missing:
                raise ValueError(f"not a checkpoint of this trainer: no {', '.join(map(repr, missing))}")
        except Exception as exc:  # a damaged file of any kind: fall back to the one before
            reason = weights_only_refusal(exc) if isinstance(exc, pickle.UnpicklingError) else first_line(exc)
            log.warning("skipping unreadable checkpoint %s (%s)", path, reason)
            unreadable.append(path.name)
            continue
        return path, state
    if unreadable:
        raise UserError(f"no readable checkpoint in {checkpoint_dir} ({', '.join(unreadable)}); "
                        "pass --no-resume (or --overwrite) to start over")
    return None


def discard_checkpoints(checkpoint_dir: Path) -> None:
    for old in checkpoint_dir.glob(CHECKPOINT_PATTERN):
        old.unlink()


def check_resumable(path: Path, saved: dict, config: dict) -> None:
    """UserError unless the checkpoint at ``path`` (its resolved config ``saved``) belongs to
    the run of resolved config ``config``: only :data:`RESUMABLE_CHANGES` may differ."""
    current = normalise_config(config)
    differences = [f"{key}: {saved['run'].get(key)!r} -> {value!r}"
                   for key, value in current["run"].items() if saved["run"].get(key) != value]
    differences += [f"{key}: {saved['run'][key]!r} -> (none)" for key in saved["run"]
                    if key not in current["run"]]
    differences += [f"{key}: {saved['train'].get(key)!r} -> {value!r}"
                    for key, value in current["train"].items()
                    if key not in RESUMABLE_CHANGES and saved["train"].get(key) != value]
    if differences:
        raise UserError(
            f"{path} belongs to a different run ({'; '.join(differences)}); pass --overwrite "
            "(or --no-resume) to start over, or choose another --run"
        )
    changed = [key for key in RESUMABLE_CHANGES if saved["train"].get(key) != current["train"][key]]
    if changed:
        log.info("resuming with changed %s", ", ".join(changed))
