"""The int8 student (scripts/08_quantize.py, embdistill/quantize.py): the unquantised ONNX
export embeds exactly as the fp32 SentenceTransformer folder does; the int8 folder, loaded the
way users load it, embeds real texts close to it and tokenizes identically, and a text the same
alone as in any batch; a folder further from fp32 than the threshold is refused at export; the
stage skips finished work and redoes it when its input or threshold changes; a missing or
corrupt input, or a student whose graph cannot be built, is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embdistill.artifacts import read_manifest
from embdistill.errors import UserError
from embdistill.tasks import resolve_task
from embdistill.teachers import load_teacher
from helpers import run_stage
from test_export import TEXTS, export, st_encode

STAGE = "scripts/08_quantize.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir):
    """A base folder whose runs/bbc-news/skd/export holds a 2-layer MiniLM student's export,
    with stage 0's bbc-news training texts (what the export is checked on)."""
    base = tmp_path_factory.mktemp("quantize")
    export(load_teacher(str(minilm_dir), device="cpu"), base / "runs" / "bbc-news" / "skd", 2)
    assert run_stage("scripts/00_texts.py", "--task", "bbc-news", "--max-train", "64", "--max-test", "4",
                     "--base-dir", base) == 0
    return base


@pytest.fixture(scope="module")
def int8_dir(workspace):
    assert run_stage(STAGE, "--task", "bbc-news", "--base-dir", workspace) == 0
    return workspace / "runs" / "bbc-news" / "skd" / "export" / "st-int8"


@pytest.fixture(scope="module")
def news_texts():
    """Held-out bbc-news articles (the package's data, offline), longer than max_seq_length."""
    return resolve_task("bbc-news").load_splits(max_train=1, max_test=24).test_texts


@pytest.fixture(scope="module")
def fp32_onnx_dir(workspace):
    assert run_stage(STAGE, "--task", "bbc-news", "--weight-type", "none", "--base-dir", workspace) == 0
    return workspace / "runs" / "bbc-news" / "skd" / "export" / "st-onnx"


def test_unquantised_onnx_embeds_as_torch(workspace, fp32_onnx_dir, news_texts):
    export_dir = fp32_onnx_dir.parent
    texts = TEXTS + news_texts[:6]
    expected = st_encode(export_dir / "st", texts)
    got = st_encode(export_dir / "st-onnx", texts)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(st_encode(export_dir / "st-onnx", TEXTS[:1]), expected[:1], atol=1e-4, rtol=0)


def test_the_fused_graph_reads_the_attention_mask_as_given(fp32_onnx_dir, news_texts):
    """Padding on the left too: onnxruntime's BERT fusion by default reduces the mask to each
    text's length, right for right padding only."""
    import onnxruntime
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(fp32_onnx_dir.parent / "st"), device="cpu")[0]
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(TEXTS + news_texts[:2], padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert not batch["attention_mask"][:, 0].all()  # some texts are padded on the left
    session = onnxruntime.InferenceSession(str(fp32_onnx_dir / "0_OnnxEncoder" / "model.onnx"))
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {name: batch[name].numpy() for name in names})[0]
    with torch.inference_mode():
        expected = model.auto_model(**{name: batch[name] for name in names}).last_hidden_state.numpy()
    attended = batch["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(got[attended], expected[attended], atol=1e-4, rtol=0)


def test_int8_folder_is_close_to_fp32(int8_dir, news_texts):
    from sentence_transformers import SentenceTransformer

    fp32_dir = int8_dir.parent / "st"
    texts = TEXTS + news_texts
    expected, got = st_encode(fp32_dir, texts), st_encode(int8_dir, texts)
    cosine = (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.99
    assert not np.allclose(got, expected, atol=1e-4)  # the weights are quantised: not the fp32 model
    assert json.loads((int8_dir / "modules.json").read_text())[0]["type"] == "embdistill.st_modules.OnnxEncoder"

    fp32 = SentenceTransformer(str(fp32_dir), device="cpu")
    int8 = SentenceTransformer(str(int8_dir), device="cpu", trust_remote_code=True)
    assert int8.prompts == fp32.prompts and int8.default_prompt_name == fp32.default_prompt_name
    prompt = fp32.prompts[fp32.default_prompt_name]
    ours, theirs = int8.preprocess(texts, prompt=prompt), fp32.preprocess(texts, prompt=prompt)
    assert ours["prompt_length"] == theirs["prompt_length"] > 0
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours[name].tolist() == theirs[name].tolist()
    assert ours["input_ids"].shape[1] == fp32.max_seq_length  # a long article is cut as fp32 cuts it


def test_an_int8_text_embeds_the_same_alone_and_in_a_batch(int8_dir, news_texts):
    """A dynamically quantised graph scales activations per run: run on a whole batch, a text's
    embedding moved with its batch-mates (by up to 0.04)."""
    from sentence_transformers import SentenceTransformer

    int8 = SentenceTransformer(str(int8_dir), device="cpu", trust_remote_code=True)
    texts = TEXTS + news_texts
    in_a_batch = int8.encode(texts, batch_size=len(texts))
    alone = np.concatenate([int8.encode(texts[i : i + 1], batch_size=1) for i in range(len(texts))])
    np.testing.assert_allclose(alone, in_a_batch, atol=1e-6, rtol=0)


def test_the_export_was_checked_alone_and_in_a_batch(int8_dir):
    from embdistill.quantize import CHECK_TEXTS, MIN_COSINE

    cosine = read_manifest(int8_dir)["extra"]["cosine_to_fp32"]
    assert set(cosine) == {"batch 1", f"batch {CHECK_TEXTS}"} and min(cosine.values()) >= MIN_COSINE


def test_a_folder_below_the_threshold_is_refused_and_not_written(workspace, int8_dir, capsys):
    """The int8 folder's lowest cosine to fp32 on these texts is about 0.998: asking 0.9999
    refuses it; the threshold is in the stage's identity (the folder of the default one is not
    taken as done), and the folder there stays the previous, complete one."""
    written = read_manifest(int8_dir)
    assert run_stage(STAGE, "--task", "bbc-news", "--min-cosine", "0.9999", "--base-dir", workspace) == 2
    line = _one_error_line(capsys)
    assert "pooled cosine 0.99" in line and "--min-cosine 0.9999" in line, line
    assert read_manifest(int8_dir) == written and not list(int8_dir.parent.glob(".st-int8*"))


@pytest.fixture(scope="module")
def deberta_workspace(tmp_path_factory, workspace, tiny_bert_dir):
    """A base folder whose runs/bbc-news/skd/export/st is the tiny BERT's folder (MiniLM's
    tokenizer, which gives token_type_ids) with a random 2-layer DeBERTa-v2 as its model, and
    the workspace's training texts."""
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    base = tmp_path_factory.mktemp("deberta")
    shutil.copytree(workspace / "text_train", base / "text_train")
    folder = shutil.copytree(tiny_bert_dir, base / "runs" / "bbc-news" / "skd" / "export" / "st")
    torch.manual_seed(0)
    DebertaV2Model(DebertaV2Config(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    return base


def test_a_student_whose_graph_cannot_be_built_is_one_line(deberta_workspace, capsys):
    assert run_stage(STAGE, "--task", "bbc-news", "--base-dir", deberta_workspace) == 2
    line = _one_error_line(capsys)
    assert "DebertaV2Model" in line and "token_type_ids" in line, line
    assert not list((deberta_workspace / "runs" / "bbc-news" / "skd" / "export").glob("*st-int8*"))


def test_int8_graph_has_fused_quantised_attention(int8_dir):
    """The speed comes from onnxruntime's fused ops: each layer's attention one QAttention."""
    import onnx

    graph = onnx.load(str(int8_dir / "0_OnnxEncoder" / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QAttention") == 2 and "SkipLayerNormalization" in ops
    assert "Softmax" not in ops and "Where" not in ops  # no unfused attention left
    assert read_manifest(int8_dir)["extra"]["fused_ops"]["Attention"] == 2


def test_int8_row_counts_the_exported_parameters(int8_dir):
    from embdistill.evaluation.models import load_encoder
    from embdistill.evaluation.specs import parse_model_spec

    def parameters(folder):
        return load_encoder(parse_model_spec(f"st:{folder}"), {}, device="cpu", batch_size=4,
                            max_length=64).n_parameters

    assert parameters(int8_dir) == parameters(int8_dir.parent / "st") > 0


def test_stage_skips_finished_work_and_redoes_changed_input(workspace, int8_dir, capsys):
    manifest = read_manifest(int8_dir)
    assert manifest["config"]["weight_type"] == "qint8" and manifest["extra"]["seconds"] > 0
    onnx_file = int8_dir / "0_OnnxEncoder" / "model.onnx"
    assert manifest["extra"]["bytes"] == onnx_file.stat().st_size
    written = onnx_file.stat().st_mtime_ns
    assert run_stage(STAGE, "--task", "bbc-news", "--base-dir", workspace) == 0
    assert onnx_file.stat().st_mtime_ns == written and "up to date" in capsys.readouterr().err
    # the fp32 folder changes (a retrained student): the int8 copy is redone
    config = int8_dir.parent / "st" / "config_sentence_transformers.json"
    config.write_text(config.read_text() + " ")
    assert run_stage(STAGE, "--task", "bbc-news", "--base-dir", workspace) == 0
    assert read_manifest(int8_dir)["created_at"] >= manifest["created_at"]
    assert read_manifest(int8_dir)["inputs"]["st"] != manifest["inputs"]["st"]


def _one_error_line(capsys) -> str:
    """stderr's one line, besides transformers' progress bar of a model it loaded first."""
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_missing_student_is_one_line(tmp_path, capsys):
    assert run_stage(STAGE, "--task", "bbc-news", "--base-dir", tmp_path) == 2
    assert "no SentenceTransformer folder" in _one_error_line(capsys)
    assert not (tmp_path / "runs" / "bbc-news" / "skd" / "export" / "st-int8").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_onnx_file_is_one_line(int8_dir, tmp_path, damage):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "st-int8"
    shutil.copytree(int8_dir, folder)
    onnx_file = folder / "0_OnnxEncoder" / "model.onnx"
    if damage == "missing":
        onnx_file.unlink()
    else:
        onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{'missing ONNX model' if damage == 'missing' else 'corrupt ONNX model'}"):
        SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
