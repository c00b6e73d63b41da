"""The generic training loop (embdistill.training) on a tiny token model.

The model maps token ids to vectors and learns fixed random targets under the masked MSE, with
sequences of different lengths so that ranks and micro-batches hold different numbers of units.
Run as a script (``python tests/test_training.py WORKER OUT BATCH``) this file is the worker
that ``test_two_ranks_train_like_one_rank_with_the_global_batch`` launches under torchrun.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from embdistill.errors import UserError
from embdistill.losses import masked_mse
from embdistill.metrics_plot import read_metrics
from embdistill.schedules import cosine_with_warmup, lr_schedule
from embdistill.train_config import TrainConfig
from embdistill.training import LossOutput, Trainer
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
VOCAB, DIM = 20, 6


class TinyTokenModel(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.dropout = nn.Dropout(dropout)
        self.mix = nn.Linear(DIM, DIM)

    def forward(self, input_ids):
        return self.mix(self.dropout(torch.tanh(self.embed(input_ids))))


def sequences(n: int = 24) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (1 + i % 7,), generator=generator).tolist() for i in range(n)]


def collate(items: list[list[int]]) -> dict[str, torch.Tensor]:
    length = max(len(item) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item)] = torch.tensor(item)
        mask[row, : len(item)] = 1
    return {"input_ids": ids, "mask": mask}


TARGETS = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(2))


def mse_objective(model, batch) -> LossOutput:
    predicted = model(batch["input_ids"])
    loss, count = masked_mse(predicted, TARGETS[batch["input_ids"]], batch["mask"])
    return LossOutput(loss, count, {"norm": predicted.detach().norm(dim=-1)[batch["mask"].bool()].mean()})


def config(**overrides) -> TrainConfig:
    values = dict(epochs=2, batch_size=4, lr=0.05, weight_decay=0.01, warmup_steps=2, save_every=4,
                  keep_last=2, log_every=2, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def train(run_dir, dropout=0.0, loss_fn=mse_objective, **overrides) -> tuple[Trainer, nn.Module]:
    model = TinyTokenModel(dropout)
    trainer = Trainer(model, loss_fn, sequences(), collate, config(**overrides), run_dir,
                      run_config={"model": "tiny"}, device="cpu")
    trainer.train()
    return trainer, model


def assert_same_parameters(a: nn.Module | dict, b: nn.Module | dict, **tolerance) -> None:
    a = a.state_dict() if isinstance(a, nn.Module) else a
    b = b.state_dict() if isinstance(b, nn.Module) else b
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance)


def test_a_run_learns_and_writes_config_metrics_plot_and_checkpoints(tmp_path):
    trainer, model = train(tmp_path, epochs=4)
    assert trainer.steps_per_epoch == 6 and trainer.global_step == trainer.total_steps == 24
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(2, 25, 2))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert {"loss", "norm", "lr", "grad_norm", "epoch"} <= rows[0].keys()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["run"] == {"model": "tiny"} and saved["train"]["lr"] == 0.05 and saved["train"]["world_size"] == 1
    # every 4 steps and at each epoch end (6, 12, 18, 24), the last two kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000020.pt", "step-00000024.pt"]
    state = torch.load(tmp_path / "checkpoints" / "step-00000024.pt", weights_only=True)
    assert state["global_step"] == 24 and state["epoch"] == 4 and state["step_in_epoch"] == 0
    assert_same_parameters(state["model"], model, rtol=0, atol=0)


def test_accumulation_takes_the_step_of_the_bigger_batch(tmp_path):
    _, big = train(tmp_path / "big", batch_size=4)
    _, accumulated = train(tmp_path / "accumulated", batch_size=2, grad_accum=2)
    assert_same_parameters(big, accumulated, rtol=1e-5, atol=1e-6)
    _, different = train(tmp_path / "different", batch_size=2)  # twice the steps: not the same
    with pytest.raises(AssertionError):
        assert_same_parameters(big, different, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_with_warmup():
    factor = cosine_with_warmup(warmup_steps=3, total_steps=13)
    assert [factor(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert factor(3) == 1.0 and factor(8) == pytest.approx(0.5) and factor(13) == pytest.approx(0.0)
    assert cosine_with_warmup(0, 10)(0) == 1.0


def test_constant_schedule_with_warmup():
    factor = lr_schedule("constant", warmup_steps=3, total_steps=13)
    assert [factor(s) for s in range(3)] == [0.25, 0.5, 0.75] and factor(3) == factor(13) == 1.0
    assert lr_schedule("cosine", 3, 13)(8) == pytest.approx(0.5)
    with pytest.raises(UserError, match="--schedule"):
        config(schedule="linear")


def test_param_groups_keep_their_own_lr_and_the_hooks_run_when_asked(tmp_path):
    model = TinyTokenModel()
    fresh_starts, seen = [], []

    def groups(model):
        return [{"params": model.embed.parameters(), "lr": 0.0}, {"params": model.mix.parameters(), "lr": 0.01}]

    def on_step_end(module, step, finished):
        assert module is model and model.training
        seen.append(step)
        return {"probe": float(step)} if step % 3 == 0 or finished else {}

    frozen = model.embed.weight.detach().clone()
    trainer = Trainer(model, mse_objective, sequences(), collate, config(schedule="constant", warmup_steps=0),
                      tmp_path, run_config={"model": "tiny"}, device="cpu",
                      param_groups=groups(model), on_fresh_start=fresh_starts.append, on_step_end=on_step_end)
    trainer.train()
    assert fresh_starts == [model] and seen == list(range(0, 13))  # step 0: the untrained model
    assert torch.equal(model.embed.weight, frozen)  # lr 0: its group did not move
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.0, 0.01]  # constant, per group
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(row["step"], "probe" in row, "loss" in row) for row in rows] == [
        (0, True, False), (2, False, True), (3, True, False), (4, False, True), (6, True, True), (8, False, True),
        (9, True, False), (10, False, True), (12, True, True)]  # log_every 2: merged or a row of its own
    assert (tmp_path / "loss.png").is_file()
    # a resumed run does not start fresh
    other = TinyTokenModel()
    Trainer(other, mse_objective, sequences(), collate, config(schedule="constant", warmup_steps=0, epochs=3),
            tmp_path, run_config={"model": "tiny"}, device="cpu", param_groups=groups(other),
            on_fresh_start=fresh_starts.append).train()
    assert fresh_starts == [model]


class Interrupt(Exception):
    pass


def interrupted_at(step_to_fail: int):
    """The objective, raising when the trainer reaches ``step_to_fail`` (a stand-in for a kill)."""
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        if calls["n"] == step_to_fail:
            raise Interrupt
        return mse_objective(model, batch)

    return objective


def test_resume_continues_mid_epoch_to_the_uninterrupted_result(tmp_path):
    # dropout makes the result depend on the restored RNG state too
    _, uninterrupted = train(tmp_path / "once", dropout=0.2, epochs=3)
    with pytest.raises(Interrupt):  # step 11 fails; checkpoints at 4 and 6 and 8
        train(tmp_path / "twice", dropout=0.2, epochs=3, loss_fn=interrupted_at(11))
    assert (tmp_path / "twice" / "checkpoints" / "step-00000008.pt").is_file()
    rows_before = read_metrics(tmp_path / "twice" / "metrics.jsonl")
    assert rows_before[-1]["step"] == 10  # logged after the last checkpoint: dropped on resume
    trainer, resumed = train(tmp_path / "twice", dropout=0.2, epochs=3)
    assert trainer.global_step == 18
    assert_same_parameters(uninterrupted, resumed, rtol=1e-6, atol=1e-7)
    steps = [row["step"] for row in read_metrics(tmp_path / "twice" / "metrics.jsonl")]
    assert steps == list(range(2, 19, 2))
    # resume=False starts over, discarding the checkpoints
    with pytest.raises(Interrupt):
        Trainer(TinyTokenModel(0.2), interrupted_at(3), sequences(), collate, config(epochs=3), tmp_path / "twice",
                run_config={"model": "tiny"}, device="cpu", resume=False).train()
    assert not list((tmp_path / "twice" / "checkpoints").glob("*.pt"))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train(tmp_path, epochs=1)
    with pytest.raises(UserError, match=r"different run \(batch_size: 4 -> 2\)"):
        train(tmp_path, epochs=1, batch_size=2)
    model = TinyTokenModel()
    other = Trainer(model, mse_objective, sequences(), collate, config(epochs=1), tmp_path,
                    run_config={"model": "other"}, device="cpu")
    with pytest.raises(UserError, match="model: 'tiny' -> 'other'"):
        other.train()
    # more epochs is a longer run, not another one
    trainer, _ = train(tmp_path, epochs=2)
    assert trainer.global_step == 12


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    train(tmp_path, epochs=1)  # checkpoints at 4 and 6
    (tmp_path / "checkpoints" / "step-00000009.pt").write_bytes(b"not a checkpoint")
    trainer, _ = train(tmp_path, epochs=2)
    assert trainer.global_step == 12
    assert read_metrics(tmp_path / "metrics.jsonl")[2]["step"] == 6


def test_resume_with_fewer_gpus_than_the_checkpoint_has_rng_states_for(tmp_path, monkeypatch, caplog):
    """A checkpoint written on 3 GPUs, resumed where 1 is visible: the states of GPUs that
    exist are restored, the others are skipped with a warning (torch's set_rng_state_all
    fails with an invalid device index)."""
    train(tmp_path, epochs=1)  # written on the CPU: checkpoints at steps 4 and 6
    latest = sorted((tmp_path / "checkpoints").glob("*.pt"))[-1]
    state = torch.load(latest, weights_only=True)
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    state["rng"][0]["cuda"] = saved
    torch.save(state, latest)

    restored = {}

    def set_rng_state(new_state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= 1:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        restored[index] = new_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])
    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "set_rng_state", set_rng_state)
    with caplog.at_level(logging.WARNING, logger="embdistill.training"):
        trainer, _ = train(tmp_path, epochs=2)
    assert trainer.global_step == 12
    assert list(restored) == [0] and torch.equal(restored[0], saved[0])
    assert "CUDA RNG states of 3 GPU(s), 1 are visible" in caplog.text


def nan_at(step: int):
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        output = mse_objective(model, batch)
        return output._replace(loss=output.loss * float("nan")) if calls["n"] == step else output

    return objective


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(UserError, match=r"the loss is nan at step 5 .*step-00000004\.pt") as caught:
        train(tmp_path, loss_fn=nan_at(5))
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004.pt"]
    state = torch.load(tmp_path / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert state["global_step"] == 4


def test_parameters_that_are_not_finite_are_never_checkpointed(tmp_path):
    """Weights that became inf or nan in a step whose loss and gradients were finite (on main,
    --lr inf trained, checkpointed and exported such a student, exit 0)."""

    def corrupting(model, batch):
        output = mse_objective(model, batch)
        with torch.no_grad():
            model.mix.bias[0] = float("inf")  # after the forward pass: loss and gradients stay finite
        return output

    with pytest.raises(UserError, match=r"the parameters are not finite after step 1 \(mix.bias\), so none "
                                        r"was checkpointed \(no checkpoint was written yet\)"):
        train(tmp_path, loss_fn=corrupting, max_steps=1)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def test_training_options_must_be_finite_numbers():
    from embdistill.cli import stage_parser
    from embdistill.train_config import add_training_args

    parser = stage_parser("a stage")
    add_training_args(parser, TrainConfig())
    for option in ("--lr", "--weight-decay", "--max-grad-norm", "--dist-timeout"):
        for value in ("inf", "nan", "-inf"):
            with pytest.raises(UserError, match=f"argument {option}: expected a finite number, got '{value}'"):
                parser.parse_args([f"{option}={value}"])


def test_a_second_training_of_the_same_run_is_refused(tmp_path):
    """On main both wrote every metrics row (one writer per output, issue 13 item 6)."""
    from embdistill.artifacts import output_lock

    with output_lock(tmp_path / "run"):  # as another training of this run holds it
        with pytest.raises(UserError, match=f"{tmp_path / 'run'} is being written by another process"):
            train(tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    train(tmp_path / "run", epochs=1)  # the lock is free again


def test_a_torn_last_metrics_row_is_dropped_on_resume(tmp_path):
    train(tmp_path, max_steps=4)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 0.1')  # a writer killed mid-row
    trainer, _ = train(tmp_path, max_steps=8)
    assert trainer.global_step == 8
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 6, 8]


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_that_cannot_be_resumed_are_named_not_silently_dropped(tmp_path, caplog):
    """On main a checkpoint without "config" ended in KeyError, and a refused payload was
    skipped, training silently starting over from step 0."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"model": {}, "global_step": 3}, checkpoints / "step-00000003.pt")
    with pytest.raises(UserError, match=r"no readable checkpoint in .*checkpoints \(step-00000003.pt\); "
                                        r"pass --no-resume \(or --overwrite\) to start over"):
        train(tmp_path)
    assert "step-00000003.pt (not a checkpoint of this trainer: no 'optimizer'" in caplog.text
    (checkpoints / "step-00000003.pt").unlink()
    torch.save({"config": _RunsCommand(tmp_path / "pwned")}, checkpoints / "step-00000005.pt")
    caplog.clear()
    with pytest.raises(UserError, match=r"no readable checkpoint .*\(step-00000005.pt\)"):
        train(tmp_path)
    assert "unsupported GLOBAL posix.system" in caplog.text and "weights_only" not in caplog.text
    assert not (tmp_path / "pwned").exists()
    trainer = Trainer(TinyTokenModel(), mse_objective, sequences(), collate, config(epochs=1), tmp_path,
                      run_config={"model": "tiny"}, device="cpu", resume=False)
    assert trainer.train().global_step == 6  # --no-resume starts over


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        config(batch_size=0)
    with pytest.raises(UserError, match="--lr must not be negative"):
        config(lr=-1.0)
    with pytest.raises(UserError, match="no training examples"):
        Trainer(TinyTokenModel(), mse_objective, [], collate, config(), tmp_path, device="cpu")


# 2 ranks x batch 2, and 2 ranks x batch 1 x 2 micro-batches (DDP's no_sync branch): the step of
# one rank with the global batch of 4
@pytest.mark.parametrize("batch_size, grad_accum", [(2, 1), (1, 2)])
def test_two_ranks_train_like_one_rank_with_the_global_batch(tmp_path, batch_size, grad_accum):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(Path(__file__)), "worker", str(tmp_path / "ddp"), str(batch_size), str(grad_accum)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    assert_same_parameters(rank0, rank1, rtol=0, atol=0)  # DDP really synchronised them

    _, single = train(tmp_path / "single", batch_size=4)
    assert_same_parameters(rank0, single, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single.state_dict()["mix.weight"], TinyTokenModel().state_dict()["mix.weight"])


def _worker(out_dir: str, batch_size: str, grad_accum: str) -> None:
    """One rank of the DDP test: train, then save this rank's parameters."""
    from embdistill.distributed import cleanup, dist_env, init_distributed

    init_distributed(timeout_s=300)
    model = TinyTokenModel()
    trainer = Trainer(model, mse_objective, sequences(), collate,
                      config(batch_size=int(batch_size), grad_accum=int(grad_accum)),
                      out_dir, run_config={"model": "tiny"}, device="cpu")
    trainer.train()
    torch.save(model.state_dict(), Path(out_dir) / f"rank{dist_env().rank}.pt")
    cleanup()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(*sys.argv[2:])


def test_no_space_for_a_checkpoint_is_one_line_and_the_previous_one_is_kept(tmp_path, monkeypatch):
    """On main: OSError 28, then torch's "unexpected pos" RuntimeError and a traceback (issue 22,
    6d). The disk fills during the second checkpoint's write (a writer that refuses past 1 KB)."""
    import errno

    from embdistill.cli import describe_os_error

    original, saves = torch.save, []

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def save(state, fh, *args, **kwargs):
        saves.append(1)
        return original(state, FullDisk(fh) if len(saves) == 2 else fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as error:
        train(tmp_path, save_every=2)
    line = f"error: {describe_os_error(error.value)}"
    assert line.startswith(f"error: {tmp_path / 'checkpoints'}: no space left on device for step-00000004.pt: "
                           "it needs about ") and "MB are free" in line and "\n" not in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002.pt"]
    assert torch.load(tmp_path / "checkpoints" / "step-00000002.pt", weights_only=True)["global_step"] == 2
