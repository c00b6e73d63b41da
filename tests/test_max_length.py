"""One max length from gathering to evaluation: the dictionary's manifest records the max length
and input format its states were gathered with (gather -> combine -> cluster), and the stages
that use it (targets, training, replace-mode evaluation) refuse another in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embdistill.artifacts import read_manifest, save_json
from embdistill.errors import UserError
from embdistill.paths import slug
from embdistill.senses.combine import combine, write_combined
from embdistill.senses.dictionary import check_gathered_with
from test_combine import write_rank
from test_train_stage import REPO, subprocess_env

DIM = 32  # the tiny BERT's width


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory, tiny_bert_dir):
    """A dictionary of the tiny BERT's, clustered from two ranks gathered at max length 8
    (test_combine's layout)."""
    folder = tmp_path_factory.mktemp("gathered")
    teacher = slug(str(tiny_bert_dir))
    ranks = [write_rank(folder, 0, {5: list(range(1, 40, 2)), 7: [2]}, hidden_size=DIM, teacher=teacher),
             write_rank(folder, 1, {5: list(range(41, 80, 2)), 9: [10, 11]}, hidden_size=DIM, teacher=teacher)]
    combined, meta = combine([ranks], cap=100, seed=0)
    assert meta["max_length"] == 8 and meta["input_format"] == "plain"
    write_combined(combined, meta, folder / "combined.pkl", {"cap": 100}, {})
    out = folder / "senses.kmeanspkl"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "03_cluster.py"), "--base-dir", str(folder),
                             "--teacher", str(tiny_bert_dir), "--input", str(folder / "combined.pkl"),
                             "--output", str(out)],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_the_dictionary_records_what_its_states_were_gathered_with(dictionary):
    extra = read_manifest(dictionary)["extra"]
    assert (extra["max_length"], extra["input_format"]) == (8, "plain")
    check_gathered_with(dictionary, max_length=8, input_format="plain")
    with pytest.raises(UserError, match="gathered with --max-length 8, not 512"):
        check_gathered_with(dictionary, max_length=512, input_format="plain")
    check_gathered_with(dictionary, max_length=512, input_format="plain", allow_max_length_mismatch=True)
    with pytest.raises(UserError, match="input format plain, the teacher now reads llm2vec"):
        check_gathered_with(dictionary, max_length=8, input_format="llm2vec", allow_max_length_mismatch=True)


def test_inputs_that_disagree_record_no_max_length(tmp_path):
    first = write_rank(tmp_path / "a", 0, {5: [1]}, world_size=1)
    other = write_rank(tmp_path / "b", 0, {5: [2]}, world_size=1)
    manifest = read_manifest(other)
    manifest["config"]["max_length"] = 16
    save_json(manifest, str(other) + ".manifest.json")
    _, meta = combine([[first], [other]], cap=100, seed=0)
    assert meta["max_length"] is None and meta["input_format"] == "plain"


@pytest.mark.parametrize("script", ["04_targets.py", "06_evaluate.py"])
def test_targets_and_replace_mode_refuse_another_max_length_in_one_line(dictionary, tiny_bert_dir, tmp_path, script):
    split = {"text": ["the cat sat", "stocks fell", "a dog ran", "prices rose"], "label": ["a", "b", "a", "b"]}
    save_json({"task": "bbc-news", "instruction": "Classify:", "train": split, "test": split},
              tmp_path / "text_train" / "bbc-news" / "eval.json")
    save_json(["Classify: !@#$%^&*()the cat sat"], tmp_path / "text_train" / "bbc-news" / "train.json")
    options = {"04_targets.py": ["--teacher", str(tiny_bert_dir), "--sense-dict", str(dictionary)],
               "06_evaluate.py": ["--models", f"replace:{tiny_bert_dir}@{dictionary}"]}[script]
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--task", "bbc-news", "--base-dir",
                             str(tmp_path), "--max-length", "16", *options],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "gathered with --max-length 8, not 16" in last
    assert "Traceback" not in result.stderr
