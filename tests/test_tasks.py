"""Task registry, local tasks, user files, splits, and the stage-0 script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embdistill.errors import UserError
from embdistill.paths import Paths
from embdistill.tasks import TASKS, resolve_task
from embdistill.text import SEPARATOR, split_example

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
