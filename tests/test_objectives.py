"""A new objective is one class and one registry line: a toy one (cosine to the teacher's
token states), registered here, trains through scripts/05_train.py and exports a loadable
SentenceTransformer folder. And --loss pooled-mse's formula against sentence-transformers'
embeddings of the exported folders (the stage runs: tests/test_train_stage.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embdistill.artifacts import read_manifest, save_json
from embdistill.input_format import SEPARATOR, format_example
from embdistill.objectives import STUDENT_OBJECTIVES, PooledMatching, StudentObjective
from embdistill.objectives.base import example_collator
from embdistill.objectives.pooled_matching import TeacherSentenceEmbeddings
from embdistill.paths import Paths
from embdistill.students import build_student, export_student
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


INSTRUCTION = "Classify the topic"


@pytest.mark.parametrize("normalize", [False, True])
def test_the_pooled_loss_is_the_squared_distance_of_the_exported_students_and_the_teachers_embeddings(
        tmp_path, tiny_bert_dir, normalize):
    """--loss pooled-mse on a batch equals mse_loss(reduction="sum") / B of the embeddings that
    sentence-transformers computes from the exported student's folder and the teacher's own
    folder (its pooling told to leave the prompt out, as the export's does)."""
    from sentence_transformers import SentenceTransformer

    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    teacher.normalize = normalize
    student = build_student(teacher, 1)
    with torch.no_grad():  # a student that differs from the teacher's first layer
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    examples = [format_example(INSTRUCTION, s) for s in SENTENCES]
    objective = PooledMatching(TeacherSentenceEmbeddings(teacher))
    batch = example_collator(teacher.tokenize, examples, 32)(list(range(len(examples))))
    student.eval()
    with torch.no_grad():
        output = objective(student, batch)
    export_student(student, teacher.tokenizer, tmp_path / "export", normalize=normalize, max_seq_length=32,
                   instruction=INSTRUCTION)

    exported = SentenceTransformer(str(tmp_path / "export" / "st"), device="cpu")
    whole = SentenceTransformer(str(tiny_bert_dir), device="cpu")
    whole[1].include_prompt = False
    texts = [example.split(SEPARATOR)[1] for example in examples]
    student_embeddings = torch.from_numpy(exported.encode(texts))  # the task's instruction: its default prompt
    teacher_embeddings = torch.from_numpy(whole.encode(texts, prompt=exported.prompts["task"],
                                                       normalize_embeddings=normalize))
    expected = torch.nn.functional.mse_loss(student_embeddings, teacher_embeddings, reduction="sum") / len(texts)
    assert output.count == len(texts) and float(expected) > 1e-3
    torch.testing.assert_close(output.loss, expected, rtol=1e-4, atol=1e-6)
    if normalize:  # unit vectors: 2 - 2 cos
        cosines = torch.nn.functional.cosine_similarity(student_embeddings, teacher_embeddings)
        torch.testing.assert_close(output.loss, (2 - 2 * cosines).mean(), rtol=1e-4, atol=1e-6)


def test_the_teachers_sentence_embeddings_are_computed_once_per_example(tiny_bert_dir):
    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    examples = [format_example(INSTRUCTION, s) for s in SENTENCES]
    collate = example_collator(teacher.tokenize, examples, 32)
    embeddings = TeacherSentenceEmbeddings(teacher)
    for ids in ([0, 1, 2], [3, 0], [1, 4], [4, 3, 2, 1, 0]):
        torch.testing.assert_close(embeddings(collate(ids)),
                                   torch.from_numpy(teacher.encode([examples[i] for i in ids], max_length=32)),
                                   rtol=1e-5, atol=1e-6)
    assert embeddings.teacher_examples == 5 and sorted(embeddings.kept) == [0, 1, 2, 3, 4]
