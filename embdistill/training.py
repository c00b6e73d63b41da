"""The training loop shared by both methods (SKD and multi-teacher distillation).

:class:`Trainer` trains any ``nn.Module`` on any loss, in the manner of a torchtune recipe:

* **loss**: ``loss_fn(model, batch) -> LossOutput(loss, count, metrics)``, where ``loss`` is
  the mean over the ``count`` units of the micro-batch (text tokens for SKD, texts for the
  multi-teacher heads). The trainer makes every optimiser step minimise the mean over *all*
  units of the step (every micro-batch of the accumulation, every rank): it back-propagates
  ``loss * count`` and rescales the gradients by ``world_size / global_count``. So 2 ranks x
  batch b, 1 rank x batch 2b and batch b with 2 accumulation steps take the same step, however
  the units are spread over the batches. ``loss_fn`` gets the (DDP-wrapped) model and must call
  it, so that DDP synchronises the gradients.
* **data**: each epoch shuffles the dataset with ``DistributedSampler`` (seed + epoch), each
  rank takes its share, in batches of ``batch_size``; ``collate_fn`` turns a list of items into
  a batch (tensors are moved to the device here).
* **optimisation** (:class:`~embdistill.train_config.TrainConfig`): AdamW (one parameter group,
  or the caller's ``param_groups`` with their own learning rates), linear warm-up then a cosine
  decay or a constant rate (:mod:`embdistill.schedules`), gradient accumulation, gradient clipping, bf16 autocast on CUDA (float32 weights and
  optimiser state).
* **checkpoints** (:mod:`embdistill.checkpoints`: ``run_dir/checkpoints/step-NNNNNNNN.pt``,
  written atomically every ``save_every`` steps, at each epoch end and at the end): model, optimiser, scheduler, the RNG
  states of every rank, epoch and step within it, config; the last ``keep_last`` are kept.
  ``resume=True`` continues from the latest readable checkpoint, skipping the batches that
  epoch already trained on, and refuses one written for a different run (model, data, batch
  layout, optimiser settings, world size); ``resume=False`` deletes the old checkpoints and
  starts over. The run folder must be shared by all ranks.
* **metrics**: rank 0 shows tqdm, logs and appends to ``run_dir/metrics.jsonl`` every
  ``log_every`` steps, and draws ``run_dir/loss.png`` at the end (:mod:`embdistill.metrics_plot`). ``on_step_end`` (rank 0,
  after every step and at step 0 of a fresh start) adds the caller's measurements (a probe
  batch, a validation) to them; ``caller_state`` (the kept checkpoint) rides in checkpoints.
* **a fresh start**: ``on_fresh_start`` runs on every rank before the first step of a run that
  did not resume from a checkpoint (e.g. to fit some parts of the model before the rest).
* **failures**: a non-finite loss or gradient stops training with a :class:`UserError` naming
  the step, before the optimiser step (the last checkpoint stays the last good one), and so do
  non-finite parameters before a checkpoint is written; a peer that dies or hangs ends the
  others with a one-line ``UserError`` after at most ``dist_timeout_s``.
* **one writer**: rank 0 holds ``run_dir.lock`` (:func:`embdistill.artifacts.output_lock`)
  while it trains, so a second training of the same run is refused instead of writing every
  metrics row twice; a torn last metrics row (a killed writer) is dropped on resume, and an
  unreadable checkpoint is skipped with a warning naming it, or refused when no readable one is
  left (rather than silently starting over).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .artifacts import atomic_open, output_lock, save_json
from .checkpoints import (check_resumable, checkpoint_path, discard_checkpoints, latest_readable, rng_state, set_rng_state,
                          write_checkpoint)
from .distributed import barrier, default_device, dist_env
from .errors import UserError, first_line
from .metrics_plot import plot_metrics
from .schedules import lr_schedule
from .train_config import TrainConfig, resolved_config

log = logging.getLogger("embdistill.training")


class LossOutput(NamedTuple):
    """What a ``loss_fn`` returns for one micro-batch."""

    loss: torch.Tensor  # mean over the micro-batch's units, with its graph
    count: int  # the number of units in that mean (0 allowed: the batch then weighs nothing)
    metrics: Mapping[str, torch.Tensor | float]  # per-unit means to log (same keys every call)


@dataclass
class TrainResult:
    global_step: int
    epoch: int
    metrics: dict[str, float]  # of the last logged window
    resumed_from: Path | None


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def non_finite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters holding inf or nan (a run that diverged, e.g. at a huge lr)."""
    return [name for name, parameter in module.named_parameters() if not torch.isfinite(parameter).all()]


_PEER_FAILURE = re.compile(
    r"gloo|nccl|connection (closed|reset|refused)|timed? ?out|broken pipe|peer|socket", re.IGNORECASE
)


def _peer_failure(exc: BaseException) -> bool:
    """Whether an error from inside training is another process dying or hanging."""
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and _PEER_FAILURE.search(str(exc)) is not None
    )


class Trainer:
    """Train ``model`` on ``loss_fn`` over ``train_dataset``; see the module docstring.

    ``run_config``: what identifies the run besides the optimisation settings (model, data,
    loss; JSON-serialisable): saved in ``config.json`` and in every checkpoint, and a
    checkpoint with a different one is refused on resume. ``device``: default this rank's GPU,
    else the CPU. ``param_groups``: AdamW's groups (dicts with ``params`` and any setting of
    their own, such as ``lr``; the schedule scales each group's rate), default one group of
    every trainable parameter at ``config.lr``. ``on_fresh_start(model)``: see the module
    docstring; it gets the unwrapped model. ``on_step_end(model, step, finished) -> metrics``:
    rank 0, after every optimiser step, with the unwrapped model; a non-empty result goes into
    that step's metrics row (a row of its own when the step logs nothing), and at step 0 of a
    fresh start. It must leave the model as it found it (training mode, no RNG draws), so that
    resumed runs stay identical. ``caller_state.state_dict()`` is saved in every checkpoint,
    ``caller_state.load_state_dict`` gets it back on resume (every rank).
    ``cpu_autocast``: bf16 autocast on the CPU too (``config.bf16`` applies it on CUDA only
    otherwise), so that the CUDA precision path can be tested on a CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], LossOutput],
        train_dataset: Sequence,
        collate_fn: Callable[[list], Any],
        config: TrainConfig,
        run_dir: str | Path,
        *,
        run_config: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        resume: bool = True,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        on_fresh_start: Callable[[nn.Module], None] | None = None,
        on_step_end: Callable[[nn.Module, int, bool], Mapping[str, float]] | None = None,
        caller_state: Any = None,
        cpu_autocast: bool = False,
    ):
        if len(train_dataset) == 0:
            raise UserError("no training examples")
        self.config = config
        self.env = dist_env()
        if self.env.distributed and not dist.is_initialized():
            raise RuntimeError(f"WORLD_SIZE is {self.env.world_size}: join the process group "
                               "(embdistill.distributed.init_distributed) before building a Trainer")
        self.device = torch.device(device) if device is not None else default_device(self.env)
        self.module = model.to(self.device)
        self.model = self._wrap(self.module)
        self.loss_fn = loss_fn
        self.dataset = train_dataset
        self.collate_fn = collate_fn
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.run_config = dict(run_config or {})
        self.resume = resume
        self.on_fresh_start = on_fresh_start
        self.on_step_end = on_step_end
        self.caller_state = caller_state

        groups = [dict(group) for group in param_groups] if param_groups else [
            {"params": list(self.module.parameters())}]
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        self.parameters = [p for group in groups for p in group["params"]]
        if not self.parameters:
            raise UserError("the model has no trainable parameters")
        # fused: one kernel over all parameters instead of torch's CPU default, a loop of small
        # ops per tensor; on the 2-core CPU the demo student's (15.6M parameters) optimiser step
        # took 0.01 s instead of 0.06 s, of a 0.45 s training step. CPU and CUDA have it.
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        batches_per_epoch = math.ceil(len(self._sampler(0)) / config.batch_size)
        self.steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(config.schedule, config.warmup_steps, self.total_steps)
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.last_checkpoint: Path | None = None
        self.use_bf16 = config.bf16 and (self.device.type == "cuda" or cpu_autocast)

    # ---------------------------------------------------------------------------------------
    # set-up

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return module
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def _sampler(self, epoch: int) -> DistributedSampler:
        sampler = DistributedSampler(
            self.dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=True,
            seed=self.config.seed, drop_last=False,
        )
        sampler.set_epoch(epoch)
        return sampler

    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """This rank's optimiser steps of ``epoch``: lists of micro-batches of dataset indices."""
        indices = list(self._sampler(epoch))
        size = self.config.batch_size
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        accum = self.config.grad_accum
        return [batches[i : i + accum] for i in range(0, len(batches), accum)]

    @property
    def saved_config(self) -> dict:
        """The resolved config: ``config.json`` and every checkpoint hold it."""
        return resolved_config(self.run_config, self.config, self.env.world_size) | {
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }

    # ---------------------------------------------------------------------------------------
    # the loop

    def train(self) -> TrainResult:
        """Train to the end (resuming first when asked); return where it ended."""
        try:
            with output_lock(self.run_dir) if self.env.is_main else contextlib.nullcontext():
                return self._train()
        except Exception as exc:
            if self.env.distributed and _peer_failure(exc):
                raise UserError(
                    f"rank {self.env.rank}: lost contact with the other processes at step "
                    f"{self.global_step + 1} ({first_line(exc)}); another rank crashed or hung "
                    "(see its log), or --dist-timeout is too short"
                ) from None
            raise

    def _train(self) -> TrainResult:
        resumed_from = self._resume() if self.resume else self._discard_checkpoints()
        self._check_ranks_agree()
        if resumed_from is None:
            torch.manual_seed(self.config.seed + self.env.rank)
            random.seed(self.config.seed + self.env.rank)
            np.random.seed(self.config.seed + self.env.rank)
            if self.on_fresh_start is not None:
                self.on_fresh_start(self.module)
        if self.env.is_main:
            save_json(self.saved_config, self.run_dir / "config.json")
            self._trim_metrics(fresh=resumed_from is None)
            if resumed_from is None and self.on_step_end and (start := self.on_step_end(self.module, 0, False)):
                self._write_row({"step": 0, **start})
        self.module.train()
        window: dict[str, float] = {}
        last_logged: dict[str, float] = {}
        started = time.perf_counter()
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="train",
                        disable=not self.env.is_main, dynamic_ncols=True)
        with progress:
            while self.global_step < self.total_steps:
                steps = self._epoch_steps(self.epoch)
                for micro_batches in steps[self.step_in_epoch :]:
                    stats = self._step(micro_batches)
                    self.global_step += 1
                    self.step_in_epoch += 1
                    epoch_end = self.step_in_epoch == len(steps)
                    if epoch_end:
                        self.epoch += 1
                        self.step_in_epoch = 0
                    _accumulate(window, stats)
                    progress.update(1)
                    progress.set_postfix(loss=f"{stats['loss']:.4f}")
                    finished = self.global_step >= self.total_steps
                    extra = {}
                    if self.on_step_end is not None and self.env.is_main:
                        extra = dict(self.on_step_end(self.module, self.global_step, finished))
                    if self.global_step % self.config.log_every == 0 or finished:
                        last_logged = self._log(window, time.perf_counter() - started, extra)
                        window = {}
                    elif extra:
                        self._write_row({"step": self.global_step, **extra})
                    if epoch_end or finished or self.global_step % self.config.save_every == 0:
                        self._save_checkpoint()
                    if finished:
                        break
        if self.env.is_main and self.metrics_path.is_file():
            plot_metrics(self.metrics_path, self.run_dir / "loss.png")
        return TrainResult(self.global_step, self.epoch, last_logged, resumed_from)

    def _step(self, micro_batches: list[list[int]]) -> dict[str, float]:
        """One optimiser step over ``micro_batches``; the step's global statistics."""
        self.optimizer.zero_grad(set_to_none=True)
        sums: torch.Tensor | None = None
        metric_names: list[str] = []
        for i, indices in enumerate(micro_batches):
            batch = to_device(self.collate_fn([self.dataset[j] for j in indices]), self.device)
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients in the last micro-batch's backward only.
            no_sync = self.model.no_sync() if self.env.distributed and not last else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                    loss, count, metrics = self.loss_fn(self.model, batch)
                (loss * count).backward()
            metric_names = sorted(metrics)
            values = [loss.detach().float() * count, torch.tensor(float(count), device=self.device)]
            values += [torch.as_tensor(metrics[name], dtype=torch.float32, device=self.device) * count
                       for name in metric_names]
            micro_sums = torch.stack([v.to(self.device, torch.float64).reshape(()) for v in values])
            sums = micro_sums if sums is None else sums + micro_sums
        if self.env.distributed:
            dist.all_reduce(sums)
        loss_sum, count, *metric_sums = sums.tolist()
        if not math.isfinite(loss_sum):
            self._stop(f"the loss is {loss_sum}")
        # DDP averaged the gradients over ranks; this makes them those of the mean over units.
        scale = self.env.world_size / max(count, 1.0)
        for parameter in self.parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(scale)
        total_norm = nn.utils.get_total_norm([p.grad for p in self.parameters if p.grad is not None])
        # not clip_grad_norm_(inf): unclipped, it multiplies every gradient by 1.0, a pass over
        # all of them (the embedding matrix's included) for nothing
        if self.config.max_grad_norm:
            nn.utils.clip_grads_with_norm_(self.parameters, self.config.max_grad_norm, total_norm)
        grad_norm = float(total_norm)
        if not math.isfinite(grad_norm):
            self._stop(f"the gradient norm is {grad_norm}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        denominator = max(count, 1.0)
        stats = {"loss": loss_sum / denominator, "count": count, "grad_norm": grad_norm, "lr": lr}
        stats.update({name: value / denominator for name, value in zip(metric_names, metric_sums)})
        return stats

    def _stop(self, what: str) -> None:
        raise UserError(
            f"{what} at step {self.global_step + 1} (epoch {self.epoch}); training stopped "
            f"before the optimiser step, {self._kept()}; try a lower --lr or --max-grad-norm"
        )

    def _kept(self) -> str:
        return (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written yet")

    # ---------------------------------------------------------------------------------------
    # metrics

    def _log(self, window: dict[str, float], elapsed: float, extra: Mapping[str, float]) -> dict[str, float]:
        row = _window_means(window)
        row = {"step": self.global_step,
               "epoch": round(self.epoch + self.step_in_epoch / self.steps_per_epoch, 4),
               **row, **extra, "elapsed_s": round(elapsed, 3)}
        if self.env.is_main:
            log.info("step %d/%d  %s", self.global_step, self.total_steps,
                     "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "epoch")))
            self._write_row(row)
        return row

    def _write_row(self, row: Mapping[str, float]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _trim_metrics(self, fresh: bool) -> None:
        """Drop metric rows logged after the checkpoint we resume from (or all, when fresh),
        and a row torn by a writer killed while appending it."""
        if not self.metrics_path.is_file():
            return
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                log.warning("%s: dropped a torn row (%r)", self.metrics_path, line[:80])
                continue
            if not fresh and isinstance(row, dict) and row.get("step", 0) <= self.global_step:
                rows.append(line)
        with atomic_open(self.metrics_path, "w") as fh:
            fh.write("".join(row + "\n" for row in rows))

    # ---------------------------------------------------------------------------------------
    # checkpoints

    def _save_checkpoint(self) -> None:
        diverged = non_finite_parameters(self.module)
        if diverged:  # every rank holds the same parameters, so every rank stops here
            raise UserError(
                f"the parameters are not finite after step {self.global_step} ({', '.join(diverged[:3])}"
                f"{', ...' if len(diverged) > 3 else ''}), so none was checkpointed ({self._kept()}); "
                "try a lower --lr or --max-grad-norm")
        rng_states = [None] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(rng_states, rng_state())
        else:
            rng_states = [rng_state()]
        if self.env.is_main:
            write_checkpoint({
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_states,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "config": self.saved_config,
                "caller_state": self.caller_state.state_dict() if self.caller_state is not None else None,
            }, self.checkpoint_dir, self.config.keep_last)
        self.last_checkpoint = checkpoint_path(self.checkpoint_dir, self.global_step)
        barrier()

    def _resume(self) -> Path | None:
        """Load the latest readable checkpoint, if any (:func:`~.checkpoints.latest_readable`);
        return its path."""
        latest = latest_readable(self.checkpoint_dir)
        if latest is None:
            return None
        path, state = latest
        check_resumable(path, state["config"], self.saved_config)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][self.env.rank])
        if self.caller_state is not None and state.get("caller_state") is not None:
            self.caller_state.load_state_dict(state["caller_state"])
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.last_checkpoint = path
        log.info("resumed from %s (step %d, epoch %d)", path, self.global_step, self.epoch)
        return path

    def _discard_checkpoints(self) -> None:
        """Starting over: old checkpoints would otherwise be resumed from later."""
        if self.env.is_main:
            discard_checkpoints(self.checkpoint_dir)
        barrier()

    def _check_ranks_agree(self) -> None:
        """Every rank must start from the same step (one may not see the checkpoints)."""
        if not self.env.distributed:
            return
        steps = [None] * self.env.world_size
        dist.all_gather_object(steps, self.global_step)
        if len(set(steps)) > 1:
            raise UserError(
                f"the ranks found different checkpoints to resume from (steps {steps}); "
                f"{self.checkpoint_dir} must be on a file system shared by every node"
            )


def _accumulate(window: dict[str, float], stats: dict[str, float]) -> None:
    """Add a step to the log window: unit-weighted sums of means, the latest lr and norm."""
    count = stats["count"]
    window["count"] = window.get("count", 0.0) + count
    window["steps"] = window.get("steps", 0.0) + 1
    for name, value in stats.items():
        if name in ("lr", "grad_norm"):
            window[name] = value
        elif name != "count":
            window[f"sum:{name}"] = window.get(f"sum:{name}", 0.0) + value * count


def _window_means(window: dict[str, float]) -> dict[str, float]:
    count = max(window.get("count", 0.0), 1.0)
    row = {name[4:]: value / count for name, value in window.items() if name.startswith("sum:")}
    row.update(lr=window.get("lr", 0.0), grad_norm=window.get("grad_norm", 0.0),
               units_per_step=window.get("count", 0.0) / max(window.get("steps", 1.0), 1.0))
    return row
