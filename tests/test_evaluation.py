"""The evaluation stage: model specs, our mteb encoder, a whole run through mteb on a tiny local
task (table == mteb's result files), skipping finished runs, and bad input (exit 2)."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embdistill.artifacts import read_manifest, save_pickle
from embdistill.errors import UserError
from embdistill.evaluation.specs import parse_model_spec, parse_model_specs
from embdistill.paths import Paths
from embdistill.tasks import resolve_task
from embdistill.texts import write_texts
from helpers import run_stage

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "scripts" / "06_evaluate.py"

SPORT = "team won lost game sport".split()
MONEY = "market price bank money".split()
FILLER = "the a of in is on this that it news".split()


def _write_task(folder: Path, name: str, rows: list[dict]) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def _topic_rows(n: int = 48, seed: int = 0) -> list[dict]:
    """Two topics told apart by their words (tiny BERT's vocabulary), labels as strings."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("sport", "money")[i % 2]
        words = rng.sample(SPORT if label == "sport" else MONEY, 3) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return rows


def _stage0(base: Path, task_file: Path) -> None:
    """What scripts/00_texts.py does: eval.json (train/test split) under base/text_train/."""
    task = resolve_task(str(task_file))
    write_texts(task, Paths(base, task.slug), task.load_splits(seed=0), config={"test": True})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bert_dir):
    """A base folder with a labelled two-topic task, and a sense dictionary for tiny BERT."""
    base = tmp_path_factory.mktemp("evaluation")
    task_file = _write_task(base, "topics", _topic_rows())
    _stage0(base, task_file)
    rng = np.random.default_rng(0)
    dictionary = {token: rng.normal(size=(int(rng.integers(1, 4)), 32)).astype(np.float16)
                  for token in range(5, 45)}  # the tiny vocabulary's words
    save_pickle(dictionary, base / "tiny.kmeanspkl")
    return {"base": base, "task": str(task_file), "dict": base / "tiny.kmeanspkl",
            "dict_values": sum(v.size for v in dictionary.values())}


# ---------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("text, label, kind, target, extra", [
    ("teacher:minilm", "minilm", "teacher", "minilm", None),
    ("student:runs/bbc-news/skd/export/hf", "skd", "student", "runs/bbc-news/skd/export/hf", None),
    ("st:runs/bbc-news/skd/export/st", "skd-st", "st", "runs/bbc-news/skd/export/st", None),
    ("untrained:minilm@3", "minilm-first3", "untrained", "minilm", 3),
    ("replace:runs/t/skd/export/hf@sense_dict/t/minilm.kmeanspkl", "skd-replace", "replace",
     "runs/t/skd/export/hf", "sense_dict/t/minilm.kmeanspkl"),
    ("ceiling=replace:minilm@d.kmeanspkl", "ceiling", "replace", "minilm", "d.kmeanspkl"),
    ("replace:minilm@2@d.kmeanspkl", "minilm-first2-replace", "replace", "minilm", "d.kmeanspkl"),
    ("st:sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers__all-MiniLM-L6-v2-st", "st",
     "sentence-transformers/all-MiniLM-L6-v2", None),
    ("st:baselines/model2vec/minilm@own-length", "baselines__model2vec__minilm-st-own-length", "st", "baselines/model2vec/minilm", None),
])
def test_model_spec_syntax(text, label, kind, target, extra, tmp_path, monkeypatch):
    # a label names an existing local folder by its own name (slug): none of these may exist
    # here, as baselines/model2vec/minilm does in a checkout where the demo has run
    monkeypatch.chdir(tmp_path)
    spec = parse_model_spec(text)
    assert (spec.label, spec.kind, spec.target) == (label, kind, target)
    assert (spec.n_layers if kind == "untrained" else spec.sense_dict) == extra
    assert spec.n_layers == (2 if label == "minilm-first2-replace" else 3 if kind == "untrained" else None)
    assert spec.own_length == text.endswith("@own-length")
    assert parse_model_spec(spec.text) == spec  # the canonical text parses back


@pytest.mark.parametrize("text, message", [
    ("minilm", "expected \\[LABEL=\\]KIND:TARGET"),
    ("teachr:minilm", "KIND one of"),
    ("replace:minilm", "replace needs replace:MODEL@DICT"),
    ("untrained:minilm@x", "positive integer"),
    ("replace:minilm@0@d.kmeanspkl", "positive integer"),
    ("bad label=teacher:minilm", "bad model label"),
])
def test_bad_model_specs(text, message):
    with pytest.raises(UserError, match=message):
        parse_model_spec(text)


def test_specs_are_checked_before_any_model_loads(tmp_path):
    with pytest.raises(UserError, match="two models are labelled 'minilm'"):
        parse_model_specs(["teacher:minilm", "minilm=st:x/y"])
    with pytest.raises(UserError, match="no such folder"):
        parse_model_specs([f"student:{tmp_path}/runs/t/skd/export/hf"])
    with pytest.raises(UserError, match="no sense dictionary"):
        parse_model_specs([f"replace:minilm@{tmp_path}/missing.kmeanspkl"])


# ------------------------------------------------------------------------------- encoders


def test_our_encoder_embeds_instruction_formatted_text(tiny_bert_dir):
    """Through mteb's own dataloader, our encoder gives Teacher.encode of
    format_example(instruction, text): the text tokens pooled, the instruction read."""
    from datasets import Dataset
    from mteb._create_dataloaders import create_dataloader

    from embdistill.evaluation.local_tasks import local_task
    from embdistill.evaluation.models import load_encoder
    from embdistill.teachers import load_teacher
    from embdistill.input_format import format_example

    texts = ["the team won the game", "the market price of money", "a good movie", "hello world"]
    task = resolve_task("bbc-news")
    split = {"train": {"text": texts, "label": [0, 1, 0, 1]}, "test": {"text": texts, "label": [0, 1, 0, 1]}}
    mteb_task = local_task(task, split, samples_per_label=2, n_experiments=1, seed=0)
    encoder = load_encoder(parse_model_spec(f"teacher:{tiny_bert_dir}"), {"bbc-news": "sort by topic"},
                           device="cpu", batch_size=3, max_length=64)
    loader = create_dataloader(Dataset.from_dict({"text": texts}), task_metadata=mteb_task.metadata,
                               input_column="text", batch_size=3)
    embedded = encoder.encode(loader, task_metadata=mteb_task.metadata, hf_split="test", hf_subset="default")

    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    expected = teacher.encode([format_example("sort by topic", t) for t in texts], max_length=64)
    np.testing.assert_allclose(embedded, expected, rtol=1e-5, atol=1e-6)
    other_instruction = teacher.encode([format_example("other words", t) for t in texts], max_length=64)
    assert not np.allclose(embedded, other_instruction, atol=1e-4)


# ------------------------------------------------------------------------------ a whole run


@pytest.fixture(scope="module")
def finished_run(workspace, tiny_bert_dir):
    from embdistill.evaluation.run import EvaluationConfig, evaluate

    config = EvaluationConfig(
        run="tiny", tasks=(workspace["task"],),
        models=(f"teacher:{tiny_bert_dir}", f"untrained:{tiny_bert_dir}@1",
                f"replace:{tiny_bert_dir}@{workspace['dict']}", f"st:{tiny_bert_dir}"),
        samples_per_label=4, n_experiments=3, batch_size=8, max_length=64, throughput_texts=8,
    )
    table = evaluate(config, workspace["base"], device="cpu")
    return {"config": config, "table": table, "dir": workspace["base"] / "results" / "tiny"}


def test_run_writes_table_from_mteb_result_files(finished_run, workspace, tiny_bert_dir):
    from mteb.results import TaskResult
    from transformers import AutoModel

    from embdistill.evaluation.table import format_markdown

    out, table = finished_run["dir"], finished_run["table"]
    assert json.loads((out / "table.json").read_text()) == json.loads(json.dumps(table))
    assert read_manifest(out / "table.json")["stage"] == "evaluate"
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "table.md").read_text()
    assert markdown == format_markdown(table)
    assert table["throughput"] == {"task": "topics", "texts": 8, "batch_size": 8, "device": "cpu",
                                   "cpu_threads": torch.get_num_threads()}
    assert f"texts/s: 8 texts of topics embedded in batches of 8 on cpu ({torch.get_num_threads()} CPU threads" in markdown

    name = tiny_bert_dir.name
    assert [m["label"] for m in table["models"]] == [name, f"{name}-first1", f"{name}-replace", f"{name}-st"]
    assert table["tasks"] == {"topics": {"type": "Classification", "main_score": "accuracy", "eval_splits": ["test"],
                                         "samples_per_label": 4, "n_experiments": 3}}
    assert table["families"] == {"Classification": ["topics"]}
    for model in table["models"]:
        score = model["scores"]["topics"]
        path = out / score["result_file"]
        assert path.is_relative_to(out / "mteb" / "results")
        on_disk = json.loads(path.read_text())
        entry = on_disk["scores"]["test"][0]
        per_experiment = [e["accuracy"] for e in entry["scores_per_experiment"]]
        assert len(per_experiment) == 3
        assert score["score"] == entry["main_score"] == entry["accuracy"]
        assert score["per_experiment"] == per_experiment
        assert score["std"] == pytest.approx(np.std(per_experiment, ddof=1))
        assert f"{100 * score['score']:.1f} ± {100 * score['std']:.1f}" in markdown
        assert model["family_means"] == {"Classification": model["mean"]} == {"Classification": score["score"]}
        assert TaskResult.from_disk(path).task_name == "topics"  # mteb reads its own format back
        assert model["texts_per_second"] > 0
        assert model["relative_to_teacher"] == pytest.approx(
            model["mean"] / table["models"][0]["mean"])

    teacher, untrained, replace, st = table["models"]
    assert table["teacher"] == teacher["label"] and teacher["relative_to_teacher"] == 1.0
    n_parameters = sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert_dir).parameters())
    assert teacher["n_parameters"] == replace["n_parameters"] == st["n_parameters"] == n_parameters
    assert untrained["n_parameters"] < n_parameters
    assert replace["dictionary_values"] == workspace["dict_values"] and teacher["dictionary_values"] == 0
    assert "dict" in markdown.splitlines()[4]  # the replace row's params column


def test_finished_run_is_skipped_unless_overwrite(finished_run, workspace, monkeypatch):
    from embdistill.evaluation import run

    def fail(*args, **kwargs):
        raise AssertionError("re-evaluated a finished run")

    monkeypatch.setattr(run, "evaluate_models", fail)
    assert run.evaluate(finished_run["config"], workspace["base"], device="cpu") == finished_run["table"]
    with pytest.raises(AssertionError, match="re-evaluated"):
        run.evaluate(finished_run["config"], workspace["base"], device="cpu", overwrite=True)


@pytest.mark.parametrize("made_with", [{"sense_rule": "l2"}, {"k_rule": "mcl"}])
def test_a_finished_run_is_redone_when_a_dictionary_records_another_making(finished_run, workspace, monkeypatch,
                                                                            made_with):
    """How a dictionary was made is in its manifest, outside its fingerprint: the table's
    identity holds it, so a replace-mode result of a dot dictionary is not taken for an l2 one,
    nor one of a fixed-k dictionary for an mcl one of the same bytes."""
    from embdistill.artifacts import manifest_path, write_manifest
    from embdistill.evaluation import run

    def fail(*args, **kwargs):
        raise AssertionError("re-evaluated a finished run")

    monkeypatch.setattr(run, "evaluate_models", fail)
    write_manifest(workspace["dict"], stage="cluster", config=made_with)
    try:
        with pytest.raises(AssertionError, match="re-evaluated"):
            run.evaluate(finished_run["config"], workspace["base"], device="cpu")
    finally:
        manifest_path(workspace["dict"]).unlink()
    assert run.evaluate(finished_run["config"], workspace["base"], device="cpu") == finished_run["table"]


def test_st_rows_read_the_runs_max_length_unless_asked_for_their_own(workspace, tiny_bert_dir, tmp_path):
    """An st: folder saved with a longer max_seq_length than the run's is cut to the run's (the
    table says so, and scores it as the same folder saved at the run's length); @own-length
    keeps its own, labelled apart."""
    from sentence_transformers import SentenceTransformer

    from embdistill.evaluation.run import EvaluationConfig, evaluate

    saved_at_run_length = tmp_path / "st-8"
    model = SentenceTransformer(str(tiny_bert_dir), device="cpu")
    model.max_seq_length = 8  # the topic texts are 9 to 11 tokens: the cut shows
    model.save(str(saved_at_run_length))
    assert SentenceTransformer(str(tiny_bert_dir), device="cpu").max_seq_length == 128
    config = EvaluationConfig(
        run="cut", tasks=(workspace["task"],), samples_per_label=4, n_experiments=3, batch_size=8,
        max_length=8, throughput_texts=8,
        models=(f"long=st:{tiny_bert_dir}", f"short=st:{saved_at_run_length}", f"st:{tiny_bert_dir}@own-length"))
    table = evaluate(config, workspace["base"], device="cpu")
    long, short, own = table["models"]
    assert own["label"] == f"{tiny_bert_dir.name}-st-own-length"
    assert [long["tokens"], short["tokens"], own["tokens"]] == [8, 8, 128]
    assert long["scores"]["topics"]["per_experiment"] == short["scores"]["topics"]["per_experiment"]
    markdown = (workspace["base"] / "results" / "cut" / "table.md").read_text()
    assert markdown.splitlines()[0].endswith("| params | tokens | texts/s |")
    assert "| long | " in markdown and " | 8 | " in markdown.splitlines()[2]


def _result_file(path: Path, experiments_per_entry: list[list[float]]) -> Path:
    """An mteb classification result with one (split, subset) entry per list."""
    entries = [{"scores_per_experiment": [{"accuracy": a} for a in accuracies],
                "main_score": float(np.mean(accuracies)), "hf_subset": f"s{i}"}
               for i, accuracies in enumerate(experiments_per_entry)]
    path.write_text(json.dumps({"task_name": "t", "scores": {"test": entries}}))
    return path


def test_table_averages_entries_and_survives_a_zero_teacher(tmp_path):
    from embdistill.evaluation.table import ModelRow, build_table, format_markdown

    rows = [
        ModelRow("zero", "teacher", "zero=teacher:x", 10, 0, 1.0, 128,
                 {"t": _result_file(tmp_path / "zero.json", [[0.0, 0.0]])}),
        ModelRow("two", "student", "two=student:y", 5, 0, 2.0, "whole text",
                 {"t": _result_file(tmp_path / "two.json", [[0.5, 0.7], [0.9, 0.7]])}),
    ]
    table = build_table("r", rows, {"t": {"type": "Classification", "main_score": "accuracy",
                                          "eval_splits": ["test"], "samples_per_label": 2,
                                          "n_experiments": 2}}, tmp_path)
    two = table["models"][1]["scores"]["t"]
    assert two["score"] == pytest.approx(0.7)  # the mean of the entries' main scores
    assert two["per_experiment"] == pytest.approx([0.7, 0.7])  # experiment i: mean over entries
    assert two["std"] == 0.0 and two["result_file"] == "two.json"
    assert table["models"][1]["relative_to_teacher"] is None
    assert "| two | 70.0 ± 0.0 | 70.0 | n/a | 0.0M | whole text | 2.0 |" in format_markdown(table)


# ------------------------------------------------------------------------------- bad input


def _stage(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run scripts/06_evaluate.py in this process; (exit status, stderr)."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        code = run_stage("scripts/06_evaluate.py", *args)
    finally:  # the stage logs to this test's captured stderr, which closes with the test
        root.handlers[:] = handlers
    return code, capsys.readouterr().err


def _single_line_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_dictionary_of_another_teacher_exits_2(workspace, tiny_bert_dir, monkeypatch, capsys):
    other = workspace["base"] / "other_teacher.kmeanspkl"
    save_pickle({5: np.ones((2, 16), dtype=np.float16)}, other)
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(workspace["base"]), "--task",
                       workspace["task"], "--run", "bad", "--models", f"replace:{tiny_bert_dir}@{other}")
    assert code == 2
    assert "16-d but the model's hidden size is 32" in _single_line_error(err)


def test_a_student_in_replace_mode_refuses_a_dictionary_re_clustered_with_another_rule(
        workspace, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    """Re-clustering writes the same pickle with another manifest: the student learned the
    dot rule's senses, so its replace row with the l2 manifest is refused in one line (exit 2),
    and evaluated only when --allow-dictionary-mismatch says so."""
    from embdistill.artifacts import write_manifest
    from test_train_stage import make_inputs, train_script

    paths = make_inputs(tmp_path, tiny_bert_dir)  # train.json, a dictionary and its (dot) targets
    made_with = {"teacher": paths.teacher, "k_rule": "fixed"}
    write_manifest(paths.sense_dict, stage="cluster", config={**made_with, "sense_rule": "dot"})
    assert run_stage("scripts/05_train.py", *train_script(tmp_path, tiny_bert_dir, "--max-length", "32",
                                                          "--max-steps", "1", "--no-export-replace")) == 0
    write_manifest(paths.sense_dict, stage="cluster", config={**made_with, "sense_rule": "l2"})
    student = Paths(tmp_path, paths.task, paths.teacher, "skd").export_dir / "hf"
    evaluate = ["--base-dir", str(workspace["base"]), "--task", workspace["task"], "--run", "bound",
                "--max-length", "32", "--samples-per-label", "4", "--n-experiments", "2",
                "--throughput-texts", "8", "--models", f"replace:{student}@{paths.sense_dict}"]
    code, err = _stage(monkeypatch, capsys, *evaluate)
    assert code == 2
    error = _single_line_error(err)
    assert f"{paths.sense_dict} is not the dictionary student {student} learned: sense_rule l2 (learned: dot)" in error
    assert "--allow-dictionary-mismatch" in error
    assert not (workspace["base"] / "results" / "bound").exists()
    code, err = _stage(monkeypatch, capsys, *evaluate, "--allow-dictionary-mismatch")
    assert code == 0, err[-2000:]
    assert (workspace["base"] / "results" / "bound" / "table.json").is_file()


@pytest.mark.parametrize("rows, message", [
    ([{"text": f"text number {i}"} for i in range(20)], "has no labels"),
    ([{"text": f"text number {i}", "label": "a"} for i in range(20)], "single class"),
])
def test_unusable_task_exits_2(rows, message, tmp_path, tiny_bert_dir, monkeypatch, capsys):
    _stage0(tmp_path, _write_task(tmp_path, "unusable", rows))
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(tmp_path), "--task",
                       str(tmp_path / "unusable.jsonl"), "--models", f"teacher:{tiny_bert_dir}")
    assert code == 2 and message in _single_line_error(err)


def test_hub_task_offline_exits_2_naming_the_dataset(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    code, err = _stage(monkeypatch, capsys, "--base-dir", str(tmp_path), "--task", "2",
                       "--models", f"teacher:{tiny_bert_dir}")
    assert code == 2 and "could not download dataset mteb/banking77" in _single_line_error(err)


def test_unknown_model_path_exits_2_from_the_command_line(workspace, tmp_path):
    """The real command line: one line on stderr, exit status 2, nothing written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(STAGE), "--base-dir", str(workspace["base"]), "--task", workspace["task"],
         "--run", "missing", "--models", f"student:{tmp_path}/runs/t/skd/export/hf"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2
    assert _single_line_error(done.stderr) == f"error: model skd: no such folder {tmp_path}/runs/t/skd/export/hf"
    assert not (workspace["base"] / "results" / "missing").exists()


# ------------------------------------------------------------------------------ real MiniLM


@pytest.mark.slow
def test_real_minilm_separates_two_topics(workspace, minilm_dir):
    """The real teacher, as our model and as a sentence-transformers folder, through mteb."""
    from embdistill.evaluation.run import EvaluationConfig, evaluate

    config = EvaluationConfig(run="minilm", tasks=(workspace["task"],),
                              models=("teacher:minilm", f"st:{minilm_dir}"), samples_per_label=4,
                              n_experiments=3, batch_size=16, max_length=64, throughput_texts=16)
    table = evaluate(config, workspace["base"], device="cpu")
    for model in table["models"]:
        assert model["scores"]["topics"]["score"] >= 0.9, model


def test_task_placeholder_expands_per_task(tmp_path):
    for task in ("alpha", "beta"):
        (tmp_path / "runs" / task / "skd" / "export" / "hf").mkdir(parents=True)
    spec = parse_model_spec(f"student:{tmp_path}/runs/{{task}}/skd/export/hf")
    assert spec.per_task and spec.label == "skd"
    assert spec.for_task("beta").target == f"{tmp_path}/runs/beta/skd/export/hf"
    assert set(spec.local_inputs(["alpha", "beta"])) == {"skd.alpha.model", "skd.beta.model"}
    parse_model_specs([spec.text], ["alpha", "beta"])
    with pytest.raises(UserError, match="no such folder .*runs/gamma"):
        parse_model_specs([spec.text], ["alpha", "gamma"])
    with pytest.raises(UserError, match="needs the tasks"):
        parse_model_specs([spec.text])
