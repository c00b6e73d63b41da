"""The model2vec baseline (scripts/07_model2vec.py): model2vec's distillation of a teacher
folder, offline, written as a SentenceTransformer folder that the evaluation reads as st:;
finished work is skipped, changed options redo it; bad options and a missing model2vec extra
are one line. The distillation runs on the tiny random BERT (MiniLM's vocabulary), not MiniLM."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from embdistill.artifacts import read_manifest
from helpers import run_stage

STAGE = "scripts/07_model2vec.py"


def _one_error_line(capsys) -> str:
    """The one error line, the last on stderr (log lines may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, lines
    return lines[-1]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_bert_dir):
    base = tmp_path_factory.mktemp("model2vec")
    assert run_stage(STAGE, "--teacher", tiny_bert_dir, "--pca-dims", "16", "--base-dir", base) == 0
    return base, base / "baselines" / "model2vec" / tiny_bert_dir.name


def test_static_model_loads_and_embeds(distilled, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    from embdistill.evaluation.models import load_encoder
    from embdistill.evaluation.specs import parse_model_spec

    _, folder = distilled
    texts = ["The team won the match.", "Stocks rallied as markets cheered.", "The team won the match."]
    embeddings = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert embeddings.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-3)
    np.testing.assert_allclose(embeddings[0], embeddings[2])
    assert not np.allclose(embeddings[0], embeddings[1])
    encoder = load_encoder(parse_model_spec(f"model2vec=st:{folder}"), {}, device="cpu", batch_size=2, max_length=64)
    # one 16-d vector per token the tokenizer keeps (MiniLM's vocabulary less its [unused] entries)
    assert encoder.n_parameters % 16 == 0 and 20_000 < encoder.n_parameters // 16 < 30_522
    manifest = read_manifest(folder)
    assert manifest["config"]["teacher"] == str(tiny_bert_dir) and manifest["config"]["pca_dims"] == 16
    assert manifest["extra"]["seconds"] > 0 and manifest["inputs"]["teacher"]


def test_static_model_is_cut_to_the_runs_length_unless_read_whole(distilled):
    """model2vec reads up to its tokenizer's own cut (model2vec saves 512; whole texts without
    one); as an st: row it reads the run's --max-length, its own length only as
    st:MODEL@own-length."""
    from sentence_transformers import SentenceTransformer

    from embdistill.evaluation.models import WHOLE_TEXT, cut_to_length, load_encoder
    from embdistill.evaluation.specs import parse_model_spec

    _, folder = distilled
    text, first_four_words = "the team won the match in the final minute", "the team won the"
    reference = SentenceTransformer(str(folder), device="cpu")
    own_cut = (reference[0].tokenizer.truncation or {}).get("max_length", WHOLE_TEXT)
    cut = load_encoder(parse_model_spec(f"st:{folder}"), {}, device="cpu", batch_size=2, max_length=4)
    own = load_encoder(parse_model_spec(f"st:{folder}@own-length"), {}, device="cpu", batch_size=2, max_length=4)
    assert (cut.tokens, own.tokens) == (4, own_cut)
    np.testing.assert_allclose(cut.embed([text], "t"), reference.encode([first_four_words]), atol=1e-6)
    np.testing.assert_allclose(own.embed([text], "t"), reference.encode([text]), atol=1e-6)
    assert not np.allclose(reference.encode([text]), reference.encode([first_four_words]))
    reference[0].tokenizer.no_truncation()  # a static model without any cut reads whole texts
    assert cut_to_length(reference, None, "m2v") == WHOLE_TEXT
    assert cut_to_length(reference, 4, "m2v") == 4
    np.testing.assert_allclose(reference.encode([text]), reference.encode([first_four_words]), atol=1e-6)


def test_finished_work_is_skipped_and_changed_options_redo_it(distilled, tiny_bert_dir, capsys):
    base, folder = distilled
    written = read_manifest(folder)
    assert run_stage(STAGE, "--teacher", tiny_bert_dir, "--pca-dims", "16", "--base-dir", base) == 0
    assert "up to date" in capsys.readouterr().err and read_manifest(folder) == written
    assert run_stage(STAGE, "--teacher", tiny_bert_dir, "--pca-dims", "8", "--base-dir", base) == 0
    assert read_manifest(folder)["config"]["pca_dims"] == 8
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(folder), device="cpu").encode(["a text"]).shape == (1, 8)


@pytest.mark.parametrize("options, message", [
    (["--sif-coefficient", "1.5"], "argument --sif-coefficient: expected a number in (0, 1), got '1.5'"),
    (["--pca-dims", "64"], "--pca-dims 64 is more than the teacher's 32 dimensions"),
])
def test_bad_options_are_one_line(tmp_path, tiny_bert_dir, capsys, options, message):
    assert run_stage(STAGE, "--teacher", tiny_bert_dir, *options, "--base-dir", tmp_path) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "baselines").exists()


def test_missing_distill_extra_is_one_line(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "model2vec.distill", None)  # import fails as without skeletoken
    assert run_stage(STAGE, "--teacher", tiny_bert_dir, "--base-dir", tmp_path) == 2
    assert "install 'model2vec>=0.10' and 'skeletoken>=0.6,<0.7'" in _one_error_line(capsys)
