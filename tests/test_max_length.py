"""One max length from gathering to evaluation: the dictionary's manifest records the max length
and input format its states were gathered with (gather -> combine -> cluster), and the stages
that use it (targets, training, replace-mode evaluation) refuse another in one line. The length
is the one used, --max-length cut to the model's limit: with the defaults (512) on MiniLM (256)
every artefact and export says 256, and the evaluation of a student reads what it was trained on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from embdistill.artifacts import read_manifest, save_json
from embdistill.errors import UserError
from embdistill.input_format import MaxLength
from embdistill.paths import slug
from embdistill.senses.combine import combine
from embdistill.senses.dictionary import SenseDictionary
from helpers import combine_to_dict
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
    meta = combine([ranks], 100, 0, folder / "combined.pkl", {"cap": 100}, {})
    assert meta["max_length"] == 8 and meta["input_format"] == "plain"
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
    SenseDictionary.open(dictionary).check_gathered_with(MaxLength.of(8, 128), "plain")
    with pytest.raises(UserError, match="gathered with --max-length 8, not 128 [(]--max-length 512 cut to the model's 128[)]"):
        SenseDictionary.open(dictionary).check_gathered_with(MaxLength.of(512, 128), "plain")
    SenseDictionary.open(dictionary).check_gathered_with(MaxLength.of(512, 128), "plain",
                                                         allow_max_length_mismatch=True)
    with pytest.raises(UserError, match="input format plain, the teacher now reads llm2vec"):
        SenseDictionary.open(dictionary).check_gathered_with(MaxLength.of(8, 128), "llm2vec",
                                                         allow_max_length_mismatch=True)


@pytest.mark.parametrize("recorded", [256, 512])  # 512: a dictionary recording the --max-length asked for
def test_the_guard_compares_the_lengths_used(tmp_path, recorded):
    """On a model that reads at most 256 tokens (MiniLM), --max-length 512 and 300 both use
    256: a dictionary gathered at either is accepted; --max-length 128 is another length."""
    path = tmp_path / "senses.kmeanspkl"
    save_json({"extra": {"max_length": recorded, "input_format": "plain"}}, str(path) + ".manifest.json")
    for asked in (512, 300, 256):
        SenseDictionary.open(path).check_gathered_with(MaxLength.of(asked, 256), "plain")
    with pytest.raises(UserError) as refused:
        SenseDictionary.open(path).check_gathered_with(MaxLength.of(128, 256), "plain")
    assert str(refused.value) == (f"{path} was gathered with --max-length 256, not 128; "
                                  "use --max-length 256, or --allow-max-length-mismatch")


def test_inputs_that_disagree_record_no_max_length(tmp_path):
    first = write_rank(tmp_path / "a", 0, {5: [1]}, world_size=1)
    other = write_rank(tmp_path / "b", 0, {5: [2]}, world_size=1)
    manifest = read_manifest(other)
    manifest["config"]["max_length"] = 16
    save_json(manifest, str(other) + ".manifest.json")
    _, meta = combine_to_dict([[first], [other]], cap=100, seed=0)
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


# ------------------------------------------------------------------------------------------
# the length actually used: min(--max-length, the model's limit), the same at every stage

INSTRUCTION = "Classify the topic of the given news article"
# news sentences, repeated into texts of 300 to 600 MiniLM tokens (longer than its 256)
NEWS = ["Shares in the bank fell sharply after it warned that profits would miss forecasts this year.",
        "The striker scored twice in the second half as the champions came from behind to win.",
        "Ministers said the new tax on fuel would raise billions to pay for schools and hospitals.",
        "The film festival opened with a premiere that drew crowds of fans and photographers.",
        "Mobile phone makers are racing to add faster chips and better cameras to their handsets.",
        "Oil prices rose again as traders worried about supplies during the cold winter months."]
LONG_TEXTS = [" ".join(NEWS[i:] + NEWS[:i]) * (3 + i % 3) for i in range(len(NEWS))]


@pytest.fixture(scope="module")
def default_length_run(tmp_path_factory):
    """Stages 1 to 5 with the real MiniLM teacher and their default --max-length (512, above
    MiniLM's 256) on texts longer than 256 tokens: a 1-layer student, 2 steps."""
    from embdistill.input_format import format_example
    from embdistill.paths import Paths
    from helpers import run_stage

    base = tmp_path_factory.mktemp("default-length")
    paths = Paths(base, "bbc-news", "minilm", "skd")
    save_json([format_example(INSTRUCTION, text) for text in LONG_TEXTS], paths.train_json)
    common = ["--task", "bbc-news", "--base-dir", base]
    for stage, *options in (["scripts/01_count.py"], ["scripts/02_gather.py", "--batch-size", "6"],
                            ["a0_generate_combinepkl.py"], ["scripts/03_cluster.py", "--senses", "2"],
                            ["scripts/04_targets.py"],
                            ["scripts/05_train.py", "--loss", "sense", "--student-layers", "1", "--epochs", "1", "--max-steps", "2",
                             "--batch-size", "3"]):
        assert run_stage(stage, *common, *options) == 0, stage
    return paths


@pytest.mark.slow
def test_default_options_use_minilms_256_tokens_everywhere(default_length_run):
    """Every artefact records the 256 tokens MiniLM reads, not the 512 asked for, and the
    `student:` evaluation of the export embeds as its SentenceTransformer folder does."""
    from sentence_transformers import SentenceTransformer

    from embdistill.artifacts import load_json
    from embdistill.evaluation.models import load_encoder
    from embdistill.evaluation.specs import parse_model_spec
    from embdistill.teachers import load_tokenizer

    paths = default_length_run
    tokenizer = load_tokenizer("minilm")
    assert tokenizer.max_seq_length == 256
    assert min(len(ids) for ids in tokenizer.tokenizer(LONG_TEXTS)["input_ids"]) > 256
    # stage 6 at its default --max-length 512 embeds the student with the 256 it was trained at
    encoder = load_encoder(parse_model_spec(f"student:{paths.export_dir / 'hf'}"), {"bbc-news": INSTRUCTION},
                           device="cpu", batch_size=3, max_length=512)
    assert encoder.max_length == 256 and encoder.model.max_seq_length == 256
    shipped = SentenceTransformer(str(paths.export_dir / "st"), device="cpu")
    assert shipped.prompts["task"] == INSTRUCTION + " "  # the export's default prompt
    np.testing.assert_allclose(encoder.embed(LONG_TEXTS, "bbc-news"), shipped.encode(LONG_TEXTS, batch_size=3),
                               atol=1e-5, rtol=1e-5)

    recorded = {
        "counts": read_manifest(paths.counts)["config"]["max_length"],
        "gather": read_manifest(paths.gather_rank(0))["config"]["max_length"],
        "dictionary": read_manifest(paths.sense_dict)["extra"]["max_length"],
        "targets": read_manifest(paths.targets)["config"]["max_length"],
        "run": load_json(paths.run_dir / "config.json")["run"]["max_length"],
        "export": read_manifest(paths.export_dir)["config"]["run"]["max_length"],
        "hf": load_json(paths.export_dir / "hf" / "embdistill.json").get("max_seq_length"),
        "st": shipped.max_seq_length,
        "st-replace": SentenceTransformer(str(paths.export_dir / "st-replace"), device="cpu",
                                          trust_remote_code=True).max_seq_length,
    }
    assert recorded == dict.fromkeys(recorded, 256)


@pytest.mark.slow
def test_a_later_stage_asking_another_length_of_the_same_effect_reuses_the_work(default_length_run, capsys):
    """--max-length 300 on MiniLM is 256 again: the targets are up to date; 128 is refused."""
    from helpers import run_stage

    paths = default_length_run
    common = ["--task", "bbc-news", "--base-dir", paths.base]
    written = paths.targets.stat().st_mtime_ns
    assert run_stage("scripts/04_targets.py", *common, "--max-length", "300") == 0
    assert paths.targets.stat().st_mtime_ns == written
    capsys.readouterr()
    assert run_stage("scripts/04_targets.py", *common, "--max-length", "128") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "gathered with --max-length 256, not 128" in last
