"""Task registry, local tasks, user files, splits, and the stage-0 script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embdistill.errors import UserError
from embdistill.paths import Paths
from embdistill.tasks import TASKS, resolve_task
from embdistill.input_format import SEPARATOR, split_example

REPO = Path(__file__).resolve().parents[1]


def run_stage0(tmp_path, *args, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "00_texts.py"), "--base-dir", str(tmp_path), *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300,
    )


def test_registry_matches_the_original_order():
    names = [TASKS[i].name for i in range(1, 17)]
    assert names[0] == "ArxivClassification" and names[13] == "TweetSentimentExtractionClassification"
    assert names[15] == "YelpReviewFullClassification" and len(set(names)) == 16
    assert TASKS[15].eval_split == "test_2021"
    assert TASKS[5].eval_split == TASKS[5].train_split == "train"  # train split only
    assert resolve_task("9").name == resolve_task("NewsClassification").name


def test_instructions_are_mtebs_prompts():
    """One source for the wording: mteb's task metadata (what its LLM2Vec wrapper passes), the
    classification default where a task has none; local tasks take their analogue's."""
    import mteb

    banking = mteb.get_task("Banking77Classification").metadata.prompt
    assert resolve_task("2").instruction == banking == "Given a online banking query, find the corresponding intents"
    assert resolve_task("9").instruction == "Classify user passages."  # no prompt in its metadata
    assert resolve_task("tweet-sentiment").instruction == resolve_task("14").instruction
    assert resolve_task("bbc-news").instruction == resolve_task("NewsClassification").instruction


@pytest.mark.parametrize("task", ["bbc-news", "tweet-sentiment"])
def test_local_splits_are_deterministic_and_disjoint(task):
    first = resolve_task(task).load_splits(seed=3, max_test=500)
    again = resolve_task(task).load_splits(seed=3, max_test=500)
    other = resolve_task(task).load_splits(seed=4, max_test=500)
    assert first.train_texts == again.train_texts and first.test_texts == again.test_texts
    assert first.test_texts != other.test_texts
    assert not set(first.train_texts) & set(first.test_texts)
    assert len(first.train_texts) == len(first.train_labels) > 1000
    assert len(set(first.test_labels)) >= 3


def test_user_files_with_renamed_columns(tmp_path):
    rows = [{"sentence": f"text number {i}", "y": i % 2} for i in range(20)]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    splits = resolve_task(str(jsonl), "sentence", "y").load_splits(seed=0, test_fraction=0.25)
    assert len(splits.test_texts) == 5 and set(splits.train_labels) == {0, 1}
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("text\nalpha\nbeta\ngamma\n")
    unlabelled = resolve_task(str(csv_file)).load_splits(seed=0)
    assert unlabelled.train_labels is None and len(unlabelled.train_texts) == 2


@pytest.mark.parametrize("arg, message", [
    ("0", "unknown task index 0: choose 1-16"),
    ("17", "unknown task index 17"),
    ("nosuch", "unknown task 'nosuch'"),
    ("missing.csv", "task file not found"),
])
def test_bad_task_names(arg, message):
    with pytest.raises(UserError, match=message):
        resolve_task(arg)


def test_stage0_writes_original_format_and_skips_reruns(tmp_path):
    result = run_stage0(tmp_path, "--task", "bbc-news", "--max-train", "300", "--max-test", "100")
    assert result.returncode == 0, result.stderr
    paths = Paths(tmp_path, "bbc-news")
    examples = json.loads(paths.train_json.read_text())
    instruction = resolve_task("bbc-news").instruction
    assert len(examples) == 300
    assert all(e.startswith(f"{instruction} {SEPARATOR}") for e in examples)
    evaluation = json.loads(paths.eval_json.read_text())
    assert [split_example(e)[1] for e in examples] == evaluation["train"]["text"]
    assert not set(evaluation["train"]["text"]) & set(evaluation["test"]["text"])
    assert len(evaluation["test"]["label"]) == 100
    mtime = paths.train_json.stat().st_mtime_ns
    rerun = run_stage0(tmp_path, "--task", "bbc-news", "--max-train", "300", "--max-test", "100")
    assert "up to date, skipping" in rerun.stderr and paths.train_json.stat().st_mtime_ns == mtime
    run_stage0(tmp_path, "--task", "bbc-news", "--max-train", "300", "--max-test", "100", "--overwrite")
    assert paths.train_json.stat().st_mtime_ns != mtime


@pytest.mark.parametrize("content, message", [
    (None, "task file not found"),
    ("", "the file has no rows"),
    ('{"txt": "a", "label": 1}\n', "no text column 'text' (columns: txt, label"),
    ('{"text": "a", "label": 1}\nnot json\n', "not valid JSON"),
])
def test_stage0_bad_files_fail_in_one_line(tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    result = run_stage0(tmp_path, "--task", str(data))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "text_train").exists()


def test_stage0_without_hub_names_the_dataset(tmp_path):
    result = run_stage0(tmp_path, "--task", "14", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not download dataset mteb/tweet_sentiment_extraction" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------
# no silent wrong results, one line for every bad input (issue 13, items 1, 15, 16, 17)


def test_stage0_redoes_its_work_when_the_data_file_or_the_columns_change(tmp_path):
    """On main: "up to date, skipping" with the old texts kept, and every later stage skipping."""
    data = tmp_path / "mine.jsonl"

    def write(texts):
        data.write_text("".join(json.dumps({"text": t, "title": f"title {t}", "label": i % 2}) + "\n"
                                for i, t in enumerate(texts)))

    def train_texts(*args):
        result = run_stage0(tmp_path, "--task", str(data), *args)
        assert result.returncode == 0, result.stderr
        return sorted(split_example(e)[1] for e in json.loads(Paths(tmp_path, "mine").train_json.read_text()))

    write([f"first version {i}" for i in range(10)])
    assert all(t.startswith("first") for t in train_texts())
    write([f"second version {i}" for i in range(10)])
    assert all(t.startswith("second") for t in train_texts())
    assert all(t.startswith("title second") for t in train_texts("--text-column", "title"))
    rerun = run_stage0(tmp_path, "--task", str(data), "--text-column", "title")
    assert "up to date, skipping" in rerun.stderr  # unchanged: still skipped


@pytest.mark.parametrize("arg, message", [
    ("²", "unknown task '²'"),  # str.isdigit() is true, int() fails
    ("--5", "unknown task '--5'"),
    ("٣", "unknown task '٣'"),  # an Arabic-Indic 3: not task 3
    ("", "the task is empty"),
    ("  ", "the task is empty"),
])
def test_task_names_that_are_not_ascii_indices(arg, message):
    with pytest.raises(UserError, match=message):
        resolve_task(arg)


def test_a_csv_with_a_long_field_loads(tmp_path, monkeypatch):
    """csv's default field limit is 128 KiB (a traceback on main): a whole book in one cell is
    a user's right, and a field over our own limit is one line naming the file and line."""
    import csv

    from embdistill import tasks

    path = tmp_path / "long.csv"
    path.write_text('text,label\nshort one,b\n"' + "word " * 400_000 + '",a\nanother one,a\n')
    splits = resolve_task(str(path)).load_splits(seed=0, test_fraction=0.34)
    assert max(len(t) for t in splits.train_texts + splits.test_texts) > 1_900_000
    monkeypatch.setattr(tasks, "CSV_FIELD_LIMIT", 1000)
    try:
        with pytest.raises(UserError, match=r"long.csv: not valid CSV after line 2 \(field larger than field limit"):
            resolve_task(str(path)).load_splits()
    finally:
        csv.field_size_limit(131072)


@pytest.mark.parametrize("row, message", [
    ({"text": 12, "label": "a"}, "row 2: 'text' is a int (12), expected str"),
    ({"text": {"title": "x"}, "label": "a"}, "row 2: 'text' is a dict"),
    ({"text": "fine", "label": ["a"]}, "row 2: 'label' is a list"),
])
def test_values_that_are_not_texts_are_refused_not_stringified(tmp_path, row, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "a text", "label": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_task(str(path)).load_splits()


@pytest.mark.parametrize("args, message", [
    (["--test-fraction", "nan"], "argument --test-fraction: expected a finite number, got 'nan'"),
    (["--max-train", "-1"], "argument --max-train: expected a positive integer, got '-1'"),
    (["--max-test", "0"], "argument --max-test: expected a positive integer, got '0'"),
    (["--log-level", "LOUD"], "argument --log-level: invalid choice: 'LOUD'"),
])
def test_bad_stage0_options_are_one_line_errors(args, message):
    from embdistill.drivers import stage_parser_of

    with pytest.raises(UserError, match=re.escape(message)):
        stage_parser_of("scripts/00_texts.py").parse_args(args)


def test_count_refuses_a_max_length_of_0():
    """On main 01_count.py --max-length 0 counted untruncated texts."""
    from embdistill.drivers import stage_parser_of

    with pytest.raises(UserError, match="argument --max-length: expected a positive integer, got '0'"):
        stage_parser_of("scripts/01_count.py").parse_args(["--max-length", "0"])


def test_bad_options_exit_2_in_one_line(tmp_path):
    result = run_stage0(tmp_path, "--task", "bbc-news", "--log-level", "LOUD")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: argument --log-level: invalid choice: 'LOUD'")
    with pytest.raises(UserError, match="--test-fraction must be between 0 and 1, got 1.5"):
        resolve_task("bbc-news").load_splits(test_fraction=1.5)


def test_stage0_warns_about_a_one_class_file(tmp_path, caplog):
    """Said at stage 0, not after gather, clustering and training (it can still be distilled on)."""
    from embdistill.texts import write_texts

    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": "only"}) + "\n" for i in range(10)))
    task = resolve_task(str(path))
    write_texts(task, Paths(tmp_path, task.slug), task.load_splits(), config={})
    assert "every training text has the label 'only'" in caplog.text
    assert Paths(tmp_path, task.slug).train_json.is_file()


# ------------------------------------------------------------------------------------------
# rows left out are counted and said; a text with two labels is refused (issue 22, 6a, 6g)


def test_stage0_counts_what_it_leaves_out_and_refuses_a_text_with_two_labels(tmp_path, capsys):
    """On main the file below became 6 texts without a word: the repeated row merged, the
    empty and null texts gone, and 'shared text' kept with one of its two labels."""
    from helpers import run_stage

    rows = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(6)]
    rows += [{"text": "text number 0", "label": "a"}, {"text": "  ", "label": "b"}, {"text": None, "label": "a"},
             {"text": "shared text", "label": "a"}, {"text": "shared text", "label": "b"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = ["--task", str(data), "--base-dir", str(tmp_path), "--test-fraction", "0.3"]
    assert run_stage("scripts/00_texts.py", *base) == 2
    assert capsys.readouterr().err.strip() == (
        "error: task rows: texts given different labels: 1 (e.g. 'shared text': 'a', 'b'); choose "
        "--conflicting-labels first (keep each text's first row) or drop (leave those texts out)")
    assert not (tmp_path / "text_train").exists()

    def written(rule):
        assert run_stage("scripts/00_texts.py", *base, "--conflicting-labels", rule) == 0
        paths = Paths(tmp_path, "rows")
        evaluation = json.loads(paths.eval_json.read_text())
        pairs = dict(zip(evaluation["train"]["text"] + evaluation["test"]["text"],
                         evaluation["train"]["label"] + evaluation["test"]["label"]))
        manifest = json.loads(Path(str(paths.eval_json) + ".manifest.json").read_text())
        return pairs, manifest["extra"]["dropped_rows"], capsys.readouterr().err

    pairs, dropped, log = written("first")
    assert pairs["shared text"] == "a" and len(pairs) == 7
    assert dropped == {"empty_text": 2, "duplicate": 1, "conflicting_label": 1}
    assert "task rows: rows with an empty or null text left out: 2" in log
    assert "task rows: rows repeating an earlier row's text and label merged into it: 1" in log
    pairs, dropped, _ = written("drop")
    assert "shared text" not in pairs and len(pairs) == 6 and dropped["conflicting_label"] == 2


@pytest.mark.parametrize("suffix, content", [
    (".csv", "text,label\nalpha one,a\nbeta two,b\ngamma three,a\n"),
    (".jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n"
                       for t, y in [("alpha one", "a"), ("beta two", "b"), ("gamma three", "a")])),
])
def test_a_utf8_file_with_a_byte_order_mark_reads_its_first_column(tmp_path, suffix, content):
    """On main the CSV's column was '\\ufefftext' ("no text column 'text'") and the JSONL's first
    line 'not valid JSON' (a BOM where JSON begins)."""
    data = tmp_path / f"bom{suffix}"
    data.write_text(content, encoding="utf-8-sig")
    splits = resolve_task(str(data)).load_splits(seed=0, test_fraction=0.34)
    assert sorted(splits.train_texts + splits.test_texts) == ["alpha one", "beta two", "gamma three"]
