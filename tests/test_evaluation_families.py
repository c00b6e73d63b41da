"""The demo's evaluation over several task families: each input embedded once per model (the
embedding cache), per-task specs on a task without runs of its own (--student-of), and each
student's gain over the untrained row of its mode in the table."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from transformers import BertModel

from embdistill.artifacts import read_manifest
from embdistill.errors import UserError
from embdistill.evaluation.local_tasks import (EvaluationTask, load_evaluation_task, local_task,
                                               resolve_evaluation_task)
from embdistill.paths import Paths
from embdistill.tasks import resolve_task
from test_evaluation import _result_file, _single_line_error, _stage, _topic_rows, _write_task

# ------------------------------------------------------------------------- embedding cache


@pytest.fixture
def count_rows(monkeypatch):
    """Texts through any BERT forward pass (our kinds' and sentence-transformers' alike)."""
    rows, forward = [], BertModel.forward

    def counted(self, input_ids=None, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(BertModel, "forward", counted)
    return rows


def _family_tasks(tmp_path) -> list[EvaluationTask]:
    """Classification and clustering of one labelled split (the same held-out texts), and
    lee-sts (50 documents in 1,225 pairs)."""
    rows = _topic_rows(40)
    split = {"train": {"text": [r["text"] for r in rows[:20]], "label": [r["label"] for r in rows[:20]]},
             "test": {"text": [r["text"] for r in rows[20:]], "label": [r["label"] for r in rows[20:]]}}
    topics = resolve_task(str(_write_task(tmp_path, "topics", rows)))
    tasks = [EvaluationTask(topics, local_task(topics, split, task_type, samples_per_label=4, n_experiments=2,
                                               seed=0), "sort by topic")
             for task_type in ("Classification", "Clustering")]
    lee = resolve_evaluation_task("lee-sts")
    return tasks + [load_evaluation_task(lee, "STS", Paths(tmp_path, lee.slug), samples_per_label=None,
                                         n_experiments=None, seed=0)]


@pytest.mark.parametrize("kind", ["teacher", "st"])
def test_each_input_is_embedded_once_per_model_and_scores_equal_the_uncached_path(
        kind, tiny_bert_dir, tmp_path, count_rows, monkeypatch):
    import mteb

    from embdistill.evaluation import models
    from embdistill.evaluation.specs import parse_model_spec

    tasks = _family_tasks(tmp_path)
    results = mteb.ResultCache(cache_path=tmp_path / "results")

    def evaluate_all() -> tuple[list[int], list[float]]:
        encoder = models.load_encoder(parse_model_spec(f"{kind}:{tiny_bert_dir}"),
                                      {t.name: t.instruction for t in tasks}, device="cpu", batch_size=16,
                                      max_length=64)
        rows_per_task, scores = [], []
        for task in tasks:
            before = sum(count_rows)
            task.reset_random_state()
            result = mteb.evaluate(encoder, task.mteb_task, cache=results, overwrite_strategy="always",
                                   encode_kwargs={"batch_size": 16}, co2_tracker=False, show_progress_bar=False)
            rows_per_task.append(sum(count_rows) - before)
            scores.append(result.task_results[0].main_score)
        return rows_per_task, scores

    rows, scores = evaluate_all()
    # clustering's texts are classification's held-out texts; lee-sts embeds its 50 documents
    assert rows[0] > 20 and rows[1:] == [0, 50]
    monkeypatch.setattr(models.EmbeddingCache, "embed", lambda self, keys, compute: compute(list(keys)))
    uncached_rows, uncached_scores = evaluate_all()
    assert uncached_rows[1:] == [20, 2 * 1225]
    assert scores == pytest.approx(uncached_scores, abs=1e-6)


def test_st_rows_cut_long_texts_before_tokenising_to_the_same_embeddings(tiny_bert_dir):
    """An st: folder with a fast tokenizer is handed each text cut (to the same tokens): the
    embeddings are those of the whole texts read at the run's max length."""
    from sentence_transformers import SentenceTransformer

    from embdistill.evaluation.models import load_encoder
    from embdistill.evaluation.specs import parse_model_spec

    texts = [" ".join(r["text"] for r in _topic_rows(40, seed=i)) for i in range(4)]  # ~1,300 characters
    encoder = load_encoder(parse_model_spec(f"st:{tiny_bert_dir}"), {}, device="cpu", batch_size=4, max_length=32)
    assert all(len(cut) < len(text) / 3 for cut, text in zip(encoder.cut(texts), texts))
    whole = SentenceTransformer(str(tiny_bert_dir), device="cpu")
    whole.max_seq_length = 32
    np.testing.assert_allclose(encoder.embed(texts, "any"), whole.encode(texts), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ student_of


@pytest.fixture(scope="module")
def per_task_models(tmp_path_factory, tiny_bert_dir):
    """A labelled task 'topics' (stage 0 done) and a model folder for it under models/topics/."""
    from test_evaluation import _stage0

    base = tmp_path_factory.mktemp("student-of")
    task_file = _write_task(base, "topics", _topic_rows())
    _stage0(base, task_file)
    shutil.copytree(tiny_bert_dir, base / "models" / "topics")
    return {"base": base, "task": str(task_file), "spec": f"m=teacher:{base}/models/{{task}}"}


def test_student_of_scores_a_task_without_runs_with_another_tasks_model(per_task_models, monkeypatch, capsys):
    base, task = per_task_models["base"], per_task_models["task"]
    args = ["--base-dir", str(base), "--task", task, "--tasks", "lee-sts", "--run", "lee",
            "--samples-per-label", "4", "--n-experiments", "2", "--max-length", "32", "--throughput-texts", "8",
            "--models", per_task_models["spec"]]
    code, err = _stage(monkeypatch, capsys, *args)
    assert code == 2
    assert f"no such folder {base}/models/lee-sts (a task without runs of its own takes another task's: " \
           "--student-of TASK=SOURCE)" in _single_line_error(err)

    code, err = _stage(monkeypatch, capsys, *args, "--student-of", "lee-sts=topics")
    assert code == 0, err
    out = base / "results" / "lee"
    table = json.loads((out / "table.json").read_text())
    assert table["student_of"] == {"lee-sts": "topics"}
    assert read_manifest(out / "table.json")["config"]["student_of"] == ["lee-sts=topics"]
    assert "lee-sts: the per-task rows ({task} in the spec) used the models of topics (--student-of)." \
        in (out / "table.md").read_text()
    assert set(table["models"][0]["scores"]) == {"topics", "lee-sts"}


@pytest.mark.parametrize("pairs, message", [
    (["lee-sts"], "bad --student-of 'lee-sts': expected TASK=SOURCE"),
    (["news=topics"], "--student-of news=topics: news is not one of the evaluated tasks (topics, lee-sts)"),
    (["lee-sts=no-such-task"], "--student-of lee-sts=no-such-task: unknown task 'no-such-task'"),
    (["lee-sts=topics", "lee-sts=topics"], "--student-of names the task lee-sts twice"),
    (["topics=topics"], "--student-of topics=topics: a task uses its own models without it"),
])
def test_bad_student_of_is_one_line(pairs, message, per_task_models):
    from embdistill.evaluation.specs import parse_student_of

    tasks = [resolve_task(per_task_models["task"]), resolve_evaluation_task("lee-sts")]
    with pytest.raises(UserError, match="^" + re.escape(message)):
        parse_student_of(pairs, tasks)


def test_bad_student_of_exits_2_from_the_command_line(per_task_models, monkeypatch, capsys):
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(per_task_models["base"]), "--task",
                       per_task_models["task"], "--tasks", "lee-sts", "--run", "bad", "--student-of", "lee-sts",
                       "--models", per_task_models["spec"])
    assert code == 2 and "expected TASK=SOURCE" in _single_line_error(err)


# ------------------------------------------------------------------------- gain over untrained


def test_each_student_shows_its_gain_over_the_untrained_row_of_its_mode(tmp_path):
    from embdistill.evaluation.table import ModelRow, build_table, format_markdown

    def row(label, kind, accuracy, clustering, *, dictionary_values=0, untrained=False):
        files = {"t": _result_file(tmp_path / f"{label}.json", [[accuracy]]),
                 "c": _result_file(tmp_path / f"{label}-c.json", [[clustering]])}
        return ModelRow(label, kind, f"{label}={kind}:x", 10, dictionary_values, 1.0, 128, files, untrained=untrained)

    rows = [row("teacher", "teacher", 0.9, 0.8), row("untrained", "untrained", 0.6, 0.5, untrained=True),
            row("untrained-replace", "replace", 0.8, 0.7, dictionary_values=5, untrained=True),
            row("skd", "st", 0.7, 0.4), row("mse", "st", 0.5, 0.5),
            row("skd-replace", "st", 0.9, 0.7, dictionary_values=5)]
    protocols = {"t": {"type": "Classification", "main_score": "accuracy", "eval_splits": ["test"]},
                 "c": {"type": "Clustering", "main_score": "accuracy", "eval_splits": ["test"]}}
    table = build_table("r", rows, protocols, tmp_path)
    gains = {m["label"]: m["vs_untrained"] for m in table["models"]}
    assert gains["teacher"] is gains["untrained"] is gains["untrained-replace"] is None
    assert gains["skd"]["row"] == gains["mse"]["row"] == "untrained"
    assert gains["skd"]["gain"] == pytest.approx(0.0) and gains["mse"]["gain"] == pytest.approx(-0.05)
    assert gains["skd-replace"] == {"row": "untrained-replace", "gain": pytest.approx(0.05)}
    assert table["models"][5]["mean_over_families"] == pytest.approx(0.8)
    lines = format_markdown(table).splitlines()
    assert lines[0].endswith("| mean over tasks | mean over families | vs teacher | vs untrained | params | tokens "
                             "| texts/s |")
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:8]}
    assert cells["teacher"][8] == cells["untrained"][8] == ""
    assert cells["skd"][8] == "+0.0" and cells["mse"][8] == "-5.0 ▼" and cells["skd-replace"][8] == "+5.0"
