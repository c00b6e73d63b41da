"""Validation on held-out texts and the kept checkpoint (embdistill/validation.py) in stage 5,
on the tiny BERT and the inputs of tests/test_train_stage.py (12 texts, 4 held out)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embdistill.paths import Paths
from embdistill.teachers import load_teacher
from embdistill.students import build_student
from embdistill.metrics_plot import read_metrics
from embdistill.training import Trainer
from embdistill.validation import Validation, indices_digest, linear_cka, similarity_agreement, validation_split
from test_train_stage import make_inputs, run_in_process, train_script

VALIDATED = ["--student-layers", "1", "--epochs", "2", "--batch-size", "2", "--warmup-steps", "0",
             "--max-length", "32", "--log-every", "1", "--val-texts", "4", "--val-every", "2",
             "--save-every", "2", "--keep-last", "10", "--seed", "3"]


def train(paths: Paths, tiny_bert_dir, capsys, *extra: str) -> str:
    code, err = run_in_process(train_script(paths.base, tiny_bert_dir, *VALIDATED, *extra), capsys)
    assert code == 0, err[-3000:]
    return err


def exported_weights(paths: Paths) -> dict[str, torch.Tensor]:
    return load_teacher(str(paths.export_dir / "hf"), device="cpu").model.state_dict()


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture
def stage_inputs(tmp_path, tiny_bert_dir) -> Paths:
    paths = make_inputs(tmp_path, tiny_bert_dir)
    return Paths(paths.base, paths.task, paths.teacher, "skd")


def test_the_held_out_texts_are_never_batched_and_are_recorded(stage_inputs, tiny_bert_dir, capsys, monkeypatch):
    trained: list[int] = []
    original = Trainer._step

    def recording(self, micro_batches):
        trained.extend(self.dataset[j] for batch in micro_batches for j in batch)
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "_step", recording)
    train(stage_inputs, tiny_bert_dir, capsys, "--lr", "1e-3")
    _, held_out = validation_split(12, 0.05, 3, count=4)
    assert len(held_out) == 4 and not set(trained) & set(held_out.tolist())
    assert set(trained) == set(range(12)) - set(held_out.tolist())  # every other text, each epoch
    assert len(trained) == 2 * 8
    recorded = json.loads((stage_inputs.run_dir / "config.json").read_text())["run"]["validation"]
    assert recorded["texts"] == 4 and recorded["seed"] == 3 and recorded["indices_sha256"] == indices_digest(held_out)
    manifest = json.loads((stage_inputs.run_dir / "export.manifest.json").read_text())
    assert manifest["config"]["run"]["validation"] == recorded
    selection = json.loads((stage_inputs.run_dir / "selection.json").read_text())
    assert selection["validation"]["indices"] == held_out.tolist()
    # the validation rows, step 0 first, are in metrics.jsonl
    rows = read_metrics(stage_inputs.run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows if "val/similarity" in row] == [0, 2, 4, 6, 8]
    assert {"val/cka", "val/loss", "val/sense_accuracy"} <= set(rows[0])


def test_a_validation_runs_the_student_once_per_held_out_batch(stage_inputs, tiny_bert_dir, capsys, monkeypatch):
    """The validation loss reuses the forward pass of the embeddings (it took a second one)."""
    from transformers import BertModel

    forwards, validating = [], []
    forward, validate = BertModel.forward, Validation.__call__

    def counting_forward(self, *args, **kwargs):
        forwards.extend(validating)
        return forward(self, *args, **kwargs)

    def flagged_validation(self, model):
        validating.append(True)
        try:
            return validate(self, model)
        finally:
            validating.clear()

    monkeypatch.setattr(BertModel, "forward", counting_forward)
    monkeypatch.setattr(Validation, "__call__", flagged_validation)
    train(stage_inputs, tiny_bert_dir, capsys, "--lr", "1e-3")
    rows = read_metrics(stage_inputs.run_dir / "metrics.jsonl")
    validations = [row for row in rows if "val/similarity" in row]
    assert len(validations) == 5 and all("val/loss" in row for row in validations)
    assert len(forwards) == 5 * 2  # 4 held-out texts in batches of 2, at steps 0, 2, 4, 6, 8


def test_a_destructive_learning_rate_exports_the_untrained_student_with_one_warning(
        stage_inputs, tiny_bert_dir, capsys):
    err = train(stage_inputs, tiny_bert_dir, capsys, "--lr", "10", "--keep-best", "similarity")
    selection = json.loads((stage_inputs.run_dir / "selection.json").read_text())
    start, *later = selection["scores"]
    assert start["step"] == 0 and [row["step"] for row in later] == [2, 4, 6, 8]
    assert all(row["similarity"] < start["similarity"] for row in later)
    assert selection["kept_step"] == 0 and selection["kept_score"] == start["similarity"]
    warnings = [line for line in err.splitlines() if "never beat the untrained student" in line]
    assert len(warnings) == 1 and "exporting the untrained student (step 0)" in warnings[0]
    untrained = build_student(load_teacher(str(tiny_bert_dir), device="cpu"), 1).state_dict()
    assert_same_weights(exported_weights(stage_inputs), untrained)
    manifest = json.loads((stage_inputs.run_dir / "export.manifest.json").read_text())
    assert manifest["extra"]["selection"]["kept_step"] == 0 and manifest["extra"]["global_step"] == 8


def test_a_sane_run_exports_its_best_validated_step(stage_inputs, tiny_bert_dir, capsys):
    """At this rate the validation loss falls, then rises again at the last step: the kept
    step is neither the start nor the end."""
    train(stage_inputs, tiny_bert_dir, capsys, "--lr", "7e-3", "--keep-best", "loss")
    selection = json.loads((stage_inputs.run_dir / "selection.json").read_text())
    scores = {row["step"]: row["loss"] for row in selection["scores"]}
    best = min(scores, key=scores.get)
    assert selection["kept_step"] == best and selection["criterion"] == "loss" and 0 < best < 8
    checkpoint = torch.load(stage_inputs.checkpoint_dir / f"step-{best:08d}.pt", weights_only=True)
    assert_same_weights(exported_weights(stage_inputs), checkpoint["model"])
    kept = torch.load(stage_inputs.checkpoint_dir / "best.pt", weights_only=True)
    assert kept["step"] == best
    assert_same_weights(kept["model"], checkpoint["model"])


def test_a_resumed_run_keeps_the_scores_and_the_best_of_before(stage_inputs, tiny_bert_dir, capsys):
    train(stage_inputs, tiny_bert_dir, capsys, "--lr", "10", "--max-steps", "4")
    before = json.loads((stage_inputs.run_dir / "selection.json").read_text())["scores"]
    err = train(stage_inputs, tiny_bert_dir, capsys, "--lr", "10")  # resumes from step 4
    assert "resumed from" in err
    selection = json.loads((stage_inputs.run_dir / "selection.json").read_text())
    assert selection["scores"][: len(before)] == before and selection["kept_step"] == 0
    untrained = build_student(load_teacher(str(tiny_bert_dir), device="cpu"), 1).state_dict()
    assert_same_weights(exported_weights(stage_inputs), untrained)


def test_the_criteria_score_agreement_with_the_teacher():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(20, 8))
    rotated = teacher @ np.linalg.qr(rng.normal(size=(8, 8)))[0]  # the same similarity structure
    unrelated = rng.normal(size=(20, 8))
    assert similarity_agreement(rotated, teacher) == pytest.approx(1.0)
    assert linear_cka(rotated, teacher) == pytest.approx(1.0)
    assert abs(similarity_agreement(unrelated, teacher)) < 0.3 and linear_cka(unrelated, teacher) < 0.6
    assert np.isnan(similarity_agreement(np.ones((20, 8)), teacher))  # collapsed: never kept
