"""What we score is what we ship: an exported student's SentenceTransformer folders, loaded the
way users load them, give the embeddings the evaluation scored (plain and replace mode), for
a MiniLM student (a standard folder) and a tiny random LLM2Vec-style Llama student (our module,
bidirectional, llm2vec's Llama-3 chat input); a replace folder with a missing or corrupt
dictionary is refused in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from embdistill.artifacts import save_json
from embdistill.errors import UserError
from embdistill.evaluation.models import load_encoder
from embdistill.evaluation.specs import parse_model_spec
from embdistill.senses.dictionary import load_sense_dict
from embdistill.senses.packed import PackedSenses
from embdistill.students import build_student, export_student
from embdistill.teachers import BidirectionalLlamaModel, load_teacher
from embdistill.input_format import LLM2VEC_LLAMA3_CHAT, format_example
from helpers import save_dictionary
from test_train_stage import REPO, subprocess_env

TEXTS = ["The team won the match in the final minute.", "Stocks rallied as markets cheered the results.",
         "a cat sat", "Markets fell and stocks slid as investors worried about rates " * 6]
INSTRUCTION = "Classify user passages."
TASK = "SomeTask"


def st_encode(folder, texts):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
    return model.encode(texts, batch_size=3, convert_to_numpy=True)


def evaluated(spec: str, texts):
    """The embeddings the evaluation stage scores for a model spec."""
    encoder = load_encoder(parse_model_spec(spec), {TASK: INSTRUCTION}, device="cpu", batch_size=3, max_length=64)
    return encoder.embed(texts, TASK)


def a_dictionary(model, seed=0) -> dict[int, np.ndarray]:
    """Entries for every other token the texts use: k noisy copies of its states."""
    rng = np.random.default_rng(seed)
    batch = model.tokenize([format_example(INSTRUCTION, t) for t in TEXTS], 64)
    states = model.token_states(batch).numpy()
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy().astype(bool)
    dictionary = {}
    for token in np.unique(ids[mask]).tolist()[::2]:
        vectors = states[(ids == token) & mask]
        k = int(rng.integers(1, 4))
        dictionary[token] = (vectors[rng.integers(0, len(vectors), k)]
                             + rng.normal(scale=0.3, size=(k, vectors.shape[1]))).astype(np.float16)
    return dictionary


def export(teacher, tmp_path, layers, rule="dot"):
    torch.manual_seed(0)
    student = build_student(teacher, layers)
    with torch.no_grad():  # a trained student differs from the teacher's layers
        for parameter in student.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    dictionary = a_dictionary(teacher)
    save_dictionary(dictionary, tmp_path / "senses.kmeanspkl", rule)
    out = export_student(student, teacher.tokenizer, tmp_path / "export", normalize=teacher.normalize,
                         max_seq_length=64, input_format=teacher.input_format, instruction=INSTRUCTION,
                         senses=PackedSenses(dictionary, teacher.vocab_size, rule=rule))
    return out, tmp_path / "senses.kmeanspkl"


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory, minilm_dir):
    return export(load_teacher(str(minilm_dir), device="cpu"), tmp_path_factory.mktemp("minilm"), 2)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, tiny_lora_dir):
    teacher = load_teacher(str(tiny_lora_dir), device="cpu", input_format=LLM2VEC_LLAMA3_CHAT)
    return export(teacher, tmp_path_factory.mktemp("llama"), 1, rule="l2")  # not the default: carried


@pytest.mark.slow
def test_minilm_st_folder_is_standard_and_embeds_as_evaluated(minilm_export):
    from sentence_transformers import SentenceTransformer

    out, dictionary = minilm_export
    plain = SentenceTransformer(str(out / "st"), device="cpu")  # no trust_remote_code: standard modules
    assert plain.default_prompt_name == "task" and plain.prompts["task"] == INSTRUCTION + " "
    np.testing.assert_allclose(plain.encode(TEXTS), evaluated(f"student:{out / 'hf'}", TEXTS), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(st_encode(out / "st-replace", TEXTS),
                               evaluated(f"replace:{out / 'hf'}@{dictionary}", TEXTS), atol=1e-5, rtol=1e-5)
    # scored as a folder, its table row counts the dictionary as the replace: row does
    as_folder, as_mode = (load_encoder(parse_model_spec(spec), {TASK: INSTRUCTION}, device="cpu", batch_size=3,
                                       max_length=64) for spec in (f"st:{out / 'st-replace'}",
                                                                   f"replace:{out / 'hf'}@{dictionary}"))
    assert as_folder.dictionary_values == as_mode.dictionary_values > 0
    assert as_folder.n_parameters == as_mode.n_parameters
    # replace mode changes the embeddings (the test would not notice a module doing nothing)
    assert not np.allclose(st_encode(out / "st-replace", TEXTS), plain.encode(TEXTS), atol=1e-3)


def test_llama_student_loads_bidirectional_and_embeds_as_evaluated(llama_export):
    from sentence_transformers import SentenceTransformer

    out, dictionary = llama_export
    model = SentenceTransformer(str(out / "st"), device="cpu", trust_remote_code=True)
    assert isinstance(model[0].model, BidirectionalLlamaModel)
    assert all(not layer.self_attn.is_causal for layer in model[0].model.layers)
    expected = evaluated(f"student:{out / 'hf'}", TEXTS)
    np.testing.assert_allclose(model.encode(TEXTS, batch_size=3), expected, atol=1e-5, rtol=1e-5)
    examples = [format_example(INSTRUCTION, t) for t in TEXTS]
    hf = load_teacher(str(out / "hf"), device="cpu")
    assert hf.input_format == LLM2VEC_LLAMA3_CHAT  # carried in the folder
    np.testing.assert_allclose(hf.encode(examples, batch_size=3, max_length=64), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(st_encode(out / "st-replace", TEXTS),
                               evaluated(f"replace:{out / 'hf'}@{dictionary}", TEXTS), atol=1e-5, rtol=1e-5)


def test_the_replace_folder_carries_the_dictionary_s_rule(llama_export, tmp_path):
    """The folder was exported with an l2 dictionary: loaded, it replaces by l2, which here
    gives other embeddings than dot would."""
    from sentence_transformers import SentenceTransformer

    out, dictionary = llama_export
    model = SentenceTransformer(str(out / "st-replace"), device="cpu", trust_remote_code=True)
    assert [m.senses.rule for m in model if hasattr(m, "senses")] == ["l2"]
    as_dot = save_dictionary(load_sense_dict(dictionary), tmp_path / "dot.kmeanspkl")  # no rule recorded: dot
    assert not np.allclose(st_encode(out / "st-replace", TEXTS), evaluated(f"replace:{out / 'hf'}@{as_dot}", TEXTS),
                           atol=1e-4)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_replace_folder_without_its_dictionary_is_one_line(llama_export, tmp_path, damage):
    import shutil

    out, _ = llama_export
    folder = tmp_path / "st-replace"
    shutil.copytree(out / "st-replace", folder)
    senses = next(folder.rglob("senses.safetensors"))
    if damage == "missing":
        senses.unlink()
    else:
        senses.write_bytes(senses.read_bytes()[:100])
    with pytest.raises(UserError, match="sense dictionary"):
        load_encoder(parse_model_spec(f"st:{folder}"), {}, device="cpu", batch_size=2, max_length=32)
    split = {"text": TEXTS, "label": ["a", "b", "a", "b"]}
    save_json({"task": "bbc-news", "instruction": INSTRUCTION, "train": split, "test": split},
              tmp_path / "text_train" / "bbc-news" / "eval.json")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "06_evaluate.py"), "--task", "bbc-news", "--base-dir",
         str(tmp_path), "--models", f"st:{folder}"], capture_output=True, text=True, env=subprocess_env(),
        timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "sense dictionary" in last and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_hf_folder_reads_the_length_it_was_exported_at(minilm_export, tmp_path):
    """export/hf records the student's length (64 here): load_teacher takes it before a
    sentence-transformers config and the position limit (512), so the evaluation asked for 512
    reads 64; a folder exported before it was recorded keeps loading as it did."""
    import json
    import shutil

    out, _ = minilm_export
    folder = shutil.copytree(out / "hf", tmp_path / "hf")
    reading = json.loads((folder / "embdistill.json").read_text())
    assert reading["max_seq_length"] == 64
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 100}))
    assert load_teacher(str(folder), device="cpu").max_seq_length == 64
    encoder = load_encoder(parse_model_spec(f"student:{folder}"), {TASK: INSTRUCTION}, device="cpu",
                           batch_size=3, max_length=512)
    assert encoder.max_length == 64
    np.testing.assert_allclose(encoder.embed(TEXTS, TASK), evaluated(f"student:{out / 'hf'}", TEXTS), atol=1e-6)
    del reading["max_seq_length"]  # an older export
    (folder / "embdistill.json").write_text(json.dumps(reading))
    assert load_teacher(str(folder), device="cpu").max_seq_length == 100
    (folder / "sentence_bert_config.json").unlink()
    assert load_teacher(str(folder), device="cpu").max_seq_length == 512
    (folder / "embdistill.json").write_text(json.dumps({**reading, "max_seq_length": "long"}))
    with pytest.raises(UserError, match="max_seq_length must be a positive integer, got 'long'"):
        load_teacher(str(folder), device="cpu")


def test_a_model_folder_with_a_truncated_weights_file_is_one_line(tmp_path, tiny_bert_dir):
    """On main stage 6 and stage 8 ended in a SafetensorError traceback (issue 22, 6b)."""
    import os
    import shutil

    from embdistill.quantize import load_student
    from embdistill.st_modules import load_sentence_transformer
    from embdistill.teachers import load_teacher

    folder = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    for load, message in [(lambda: load_sentence_transformer(str(folder), "cpu"), "could not load sentence-transformers"),
                          (lambda: load_teacher(str(folder), device="cpu"), "could not load model"),
                          (lambda: load_student(folder), "could not load")]:
        with pytest.raises(UserError, match=message) as error:
            load()
        assert "\n" not in str(error.value)
