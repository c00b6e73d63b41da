"""A new objective is one class and one registry line: a toy one (cosine to the teacher's
token states), registered here, trains through scripts/05_train.py and exports a loadable
SentenceTransformer folder."""

from __future__ import annotations

import json

import numpy as np
import torch

from embdistill.artifacts import read_manifest, save_json
from embdistill.input_format import format_example
from embdistill.objectives import STUDENT_OBJECTIVES, StudentObjective
from embdistill.objectives.base import example_collator
from embdistill.paths import Paths
from embdistill.teachers import load_teacher
from embdistill.training import LossOutput
from helpers import run_stage

SENTENCES = ["the team won the game", "the bank fell again", "a good movie review", "the cat sat on the mat",
             "money is tight", "the news of the day", "sport and the team", "the market is open today"]


class CosineToTeacher(StudentObjective):
    """1 - cosine of the student's and the teacher's states at each text token."""

    run_name = "cosine"
    needs = ("teacher_states",)

    @classmethod
    def build(cls, run, inputs):
        objective = cls()
        objective.teacher = load_teacher(run.args.teacher, device=run.device)
        objective.collate = example_collator(run.tokenizer.tokenize, run.examples, run.max_length)
        return objective

    def __call__(self, model, batch):
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        with torch.no_grad():
            target = self.teacher.token_states(batch).to(states.device)
        mask = batch["embed_mask"].bool()
        loss = 1 - torch.nn.functional.cosine_similarity(states[mask], target[mask].float(), dim=-1).mean()
        return LossOutput(loss, int(mask.sum()), {})


def test_a_registered_objective_trains_through_stage_5_and_exports(tmp_path, tiny_bert_dir, monkeypatch):
    from sentence_transformers import SentenceTransformer

    monkeypatch.setitem(STUDENT_OBJECTIVES, "cosine", CosineToTeacher)
    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    paths = Paths(tmp_path, "bbc-news", teacher.slug, "cosine")
    save_json([format_example("Classify the topic", s) for s in SENTENCES], paths.train_json)

    assert run_stage("scripts/05_train.py", "--task", "bbc-news", "--base-dir", tmp_path, "--teacher",
                     tiny_bert_dir, "--loss", "cosine", "--student-layers", "1", "--epochs", "1",
                     "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--max-length", "32",
                     "--log-every", "1", "--val-fraction", "0") == 0

    rows = [json.loads(line) for line in (paths.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(0 < row["loss"] < 2 for row in rows)
    manifest = read_manifest(paths.export_dir)
    assert manifest["config"]["run"]["loss"] == "cosine"
    assert sorted(p.name for p in paths.export_dir.iterdir() if p.is_dir()) == ["hf", "st"]
    student = SentenceTransformer(str(paths.export_dir / "st"), device="cpu")
    embeddings = student.encode(["the team won", "the bank fell"])
    assert embeddings.shape == (2, 32) and np.isfinite(embeddings).all()
