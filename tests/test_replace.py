"""Replace mode: the batched version against the original's per-token loop under each sense
rule, replace mode inside a model's encode (tiny random BERT), and the rule a dictionary
records being the one replace mode uses (evaluation spec, exported SenseReplace folder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embdistill.errors import UserError
from bench.bench_replace import reference_scores, replace_reference_loop
from helpers import save_dictionary
from embdistill.evaluation.models import load_encoder
from embdistill.evaluation.replace import ReplaceModeModel
from embdistill.evaluation.specs import parse_model_spec
from embdistill.senses.packed import SENSE_RULES, PackedSenses
from embdistill.st_modules import SENSES_FILE, SenseReplace
from embdistill.teachers import load_teacher, mean_pool
from embdistill.input_format import format_example

VOCAB, DIM, PAD = 30, 8, 0


def _dictionary(seed: int) -> dict[int, np.ndarray]:
    """Entries for tokens 0..19 (the pad id 0 included), k from 1 to 6; 20..29 have none."""
    rng = np.random.default_rng(seed)
    return {t: rng.normal(size=(int(rng.integers(1, 7)), DIM)).astype(np.float16) for t in range(20)}


def _batch(seed: int, dtype: torch.dtype):
    """Token ids drawn from all 30 (so some have no entry), ragged lengths padded with PAD, a
    text mask that also leaves out a few real tokens (instruction / special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (4, 12), generator=generator)
    lengths = torch.tensor([12, 9, 5, 1])
    padding = torch.arange(12)[None] >= lengths[:, None]
    input_ids[padding] = PAD
    text_mask = (~padding & (torch.rand(4, 12, generator=generator) > 0.2)).long()
    states = torch.randn(4, 12, DIM, generator=generator).to(dtype)
    return states, input_ids, text_mask, padding


@pytest.mark.parametrize("rule", SENSE_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 25])  # one token per chunk / all at once
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_replace_equals_the_per_token_loop(seed, chunk_elements, dtype, rule):
    dictionary = _dictionary(seed)
    states, input_ids, text_mask, padding = _batch(seed, dtype)

    packed = PackedSenses(dictionary, VOCAB, rule=rule, chunk_elements=chunk_elements)
    batched = packed.replace(states, input_ids, text_mask)
    looped = replace_reference_loop(states, input_ids, text_mask, dictionary, rule)

    assert batched.dtype == dtype
    assert torch.equal(batched, looped)
    # the case covers every branch: replaced tokens, text tokens without an entry, padding
    # (whose id has an entry) and masked-out tokens, all of which keep their states
    has_entry = input_ids < 20
    replaced = text_mask.bool() & has_entry
    kept = ~replaced
    assert replaced.sum() > 5 and (text_mask.bool() & ~has_entry).sum() > 0 and padding.sum() > 0
    assert torch.equal(batched[kept], states[kept])
    assert not torch.equal(batched[replaced], states[replaced])
    # a replaced state is one of its token's senses: the one of largest score under the rule
    for b, t in replaced.nonzero().tolist():
        senses = torch.tensor(dictionary[int(input_ids[b, t])], dtype=torch.float32)
        best = int(torch.argmax(reference_scores(senses, states[b, t].float(), rule)))
        assert torch.equal(batched[b, t], senses[best].to(dtype))


def test_replace_leaves_a_batch_without_entries_unchanged():
    dictionary = {25: np.ones((2, DIM), dtype=np.float16)}
    states, input_ids, text_mask, _ = _batch(0, torch.float32)
    input_ids[input_ids == 25] = 26
    out = PackedSenses(dictionary, VOCAB).replace(states, input_ids, text_mask)
    assert torch.equal(out, states) and out is not states


def test_packing_refuses_token_ids_outside_the_vocabulary():
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        PackedSenses({VOCAB + 3: np.ones((2, DIM), dtype=np.float16)}, VOCAB)


TEXTS = ["the team won the game", "the market price of money", "a good movie review",
         "hello world, the cat sat on the mat"]
INSTRUCTION = "classify the topic"


def _model_dictionary(model, examples, seed=0) -> dict[int, np.ndarray]:
    """Senses for the text tokens of ``examples``: a few noisy copies of real states, so that
    the nearest sense differs from token to token."""
    rng = np.random.default_rng(seed)
    batch = model.tokenize(examples, 64)
    states = model.token_states(batch).float().numpy()
    ids, mask = batch["input_ids"].numpy(), batch["embed_mask"].numpy().astype(bool)
    dictionary = {}
    for token in np.unique(ids[mask]).tolist()[::2]:  # every other token gets an entry
        vectors = states[(ids == token) & mask]
        k = int(rng.integers(1, 4))
        dictionary[token] = (vectors[rng.integers(0, len(vectors), k)]
                             + rng.normal(scale=0.5, size=(k, vectors.shape[1]))).astype(np.float16)
    return dictionary


def test_replace_mode_model_pools_the_replaced_text_token_states(tiny_bert_dir):
    model = load_teacher(str(tiny_bert_dir), device="cpu")
    examples = [format_example(INSTRUCTION, text) for text in TEXTS]
    dictionary = _model_dictionary(model, examples)
    replace_model = ReplaceModeModel(model, PackedSenses(dictionary, model.vocab_size))

    embedded = replace_model.encode(examples, batch_size=3, max_length=64)

    batch = model.tokenize(examples, 64)
    replaced = replace_reference_loop(model.token_states(batch), batch["input_ids"],
                                      batch["embed_mask"], dictionary)
    expected = mean_pool(replaced, batch["embed_mask"])
    if model.normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    np.testing.assert_allclose(embedded, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(embedded, model.encode(examples, batch_size=3, max_length=64), atol=1e-3)
    assert replace_model.senses.n_values == sum(v.size for v in dictionary.values())


def test_replace_mode_with_no_matching_entry_is_plain_mode(tiny_bert_dir):
    model = load_teacher(str(tiny_bert_dir), device="cpu")
    examples = [format_example(INSTRUCTION, text) for text in TEXTS]
    unused = model.tokenizer.convert_tokens_to_ids("bank")  # in the vocabulary, not in TEXTS
    replace_model = ReplaceModeModel(model, PackedSenses({unused: np.ones((3, model.hidden_size), np.float16)},
                                                         model.vocab_size))
    np.testing.assert_array_equal(replace_model.encode(examples, max_length=64),
                                  model.encode(examples, max_length=64))


def test_replace_mode_refuses_a_dictionary_of_another_width(tiny_bert_dir):
    model = load_teacher(str(tiny_bert_dir), device="cpu")
    with pytest.raises(UserError, match="hidden size 16"):
        ReplaceModeModel(model, PackedSenses({5: np.ones((2, 16), dtype=np.float16)}, model.vocab_size))


def test_an_exported_replace_module_carries_its_rule(tmp_path):
    """SenseReplace's folder keeps the rule in the safetensors metadata and a loaded module
    replaces by it; a folder written before the rule was stored (no metadata) is dot."""
    from safetensors.torch import save_file

    dictionary = _dictionary(0)
    states, input_ids, text_mask, _ = _batch(0, torch.float32)
    features = lambda: {"token_embeddings": states.clone(), "input_ids": input_ids, "attention_mask": text_mask}
    outputs = {}
    for rule in SENSE_RULES:
        SenseReplace(PackedSenses(dictionary, VOCAB, rule=rule)).save(str(tmp_path / rule))
        loaded = SenseReplace.load(str(tmp_path / rule))
        assert loaded.senses.rule == rule
        outputs[rule] = loaded(features())["token_embeddings"]
        assert torch.equal(outputs[rule], replace_reference_loop(states, input_ids, text_mask, dictionary, rule))
    assert not torch.equal(outputs["dot"], outputs["l2"]) and not torch.equal(outputs["dot"], outputs["cos"])

    old = tmp_path / "l2"
    save_file(PackedSenses(dictionary, VOCAB).to_tensors(), str(old / SENSES_FILE))  # no metadata
    assert SenseReplace.load(str(old)).senses.rule == "dot"
    save_file(PackedSenses(dictionary, VOCAB).to_tensors(), str(old / SENSES_FILE), metadata={"sense_rule": "far"})
    with pytest.raises(UserError, match="unknown sense rule 'far'"):
        SenseReplace.load(str(old))


def _large_sense_dictionary(model, examples) -> dict[int, np.ndarray]:
    """Two senses per text token: a real state of it, and 4 x its states' mean plus noise (no
    cosine ties). The large one wins by dot product for most states, never by distance: dot
    and l2 pick differently."""
    rng = np.random.default_rng(0)
    batch = model.tokenize(examples, 64)
    states = model.token_states(batch).float().numpy()
    ids, mask = batch["input_ids"].numpy(), batch["embed_mask"].numpy().astype(bool)
    dictionary = {}
    for token in np.unique(ids[mask]).tolist():
        own = states[(ids == token) & mask]
        large = 4 * own.mean(0) + rng.normal(scale=0.5, size=own.shape[1])
        dictionary[token] = np.stack([own[0], large]).astype(np.float16)
    return dictionary


def test_replace_spec_uses_the_rule_its_dictionary_records(tiny_bert_dir, tmp_path):
    """The evaluation's replace:MODEL@DICT reads the rule from DICT's manifest (none: dot)."""
    model = load_teacher(str(tiny_bert_dir), device="cpu")
    examples = [format_example(INSTRUCTION, text) for text in TEXTS]
    dictionary = _large_sense_dictionary(model, examples)
    batch = model.tokenize(examples, 64)
    embedded = {}
    for rule in (None, *SENSE_RULES):
        path = save_dictionary(dictionary, tmp_path / f"{rule}.kmeanspkl", rule)
        encoder = load_encoder(parse_model_spec(f"replace:{tiny_bert_dir}@{path}"), {"T": INSTRUCTION},
                               device="cpu", batch_size=3, max_length=64)
        assert encoder.model.senses.rule == (rule or "dot")
        embedded[rule] = encoder.embed(TEXTS, "T")
        replaced = replace_reference_loop(model.token_states(batch), batch["input_ids"], batch["embed_mask"],
                                          dictionary, rule or "dot")
        expected = mean_pool(replaced, batch["embed_mask"])
        if model.normalize:
            expected = torch.nn.functional.normalize(expected, dim=-1)
        np.testing.assert_allclose(embedded[rule], expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(embedded[None], embedded["dot"])
    assert not np.allclose(embedded["dot"], embedded["l2"], atol=1e-3)


def test_under_l2_a_state_takes_the_sense_k_means_put_it_in():
    """The dictionary's senses are k-means centroids, and k-means puts a state in the cluster
    of its nearest centroid: l2 picks exactly that one. dot favours senses of large norm, so
    states of a small-norm cluster move to another sense; every rule substitutes the centroid
    itself (under cos too: not rescaled to the state's norm)."""
    from embdistill.senses.kmeans import _assign, _sq_norms, kmeans

    rng = np.random.default_rng(0)
    tokens, k, per_cluster, dim = [3, 7, 11], 3, 40, 16
    points = []
    for _ in tokens:  # k clusters around centres of norm 1, 3 and 6 in random directions
        directions = rng.normal(size=(k, dim))
        centres = directions / np.linalg.norm(directions, axis=1, keepdims=True) * np.array([[1.0], [3.0], [6.0]])
        points.append(np.concatenate([c + rng.normal(scale=0.15, size=(per_cluster, dim)) for c in centres]))
    results = kmeans([p.astype(np.float32) for p in points], [k] * len(tokens), backend="torch", seed=0)
    dictionary = {token: result.centroids for token, result in zip(tokens, results)}  # float32: no rounding
    states = torch.from_numpy(np.concatenate(points)).float()
    input_ids = torch.tensor([t for t, p in zip(tokens, points) for _ in p])
    assigned = []
    for p, result in zip(points, results):  # k-means's own assignment rule on its final centroids
        x, centres = torch.from_numpy(p).float()[None], torch.from_numpy(result.centroids)[None]
        assigned.append(_assign(x, _sq_norms(x), torch.ones(x.shape[:2], dtype=torch.bool), centres,
                                torch.ones(1, k, dtype=torch.bool))[1][0])
    assigned = torch.cat(assigned)
    chosen = {}
    for rule in SENSE_RULES:
        senses = PackedSenses(dictionary, VOCAB, rule=rule)
        chosen[rule] = senses.targets(states[None], input_ids[None], torch.ones(1, len(states)))[0]
        replaced = senses.replace(states[None], input_ids[None], torch.ones(1, len(states)))[0]
        centroids = torch.stack([torch.from_numpy(dictionary[int(t)][int(j)]) for t, j in zip(input_ids, chosen[rule])])
        assert torch.equal(replaced, centroids), rule
    assert torch.equal(chosen["l2"], assigned)
    assert (chosen["dot"] != assigned).float().mean() > 0.1, {r: float((c != assigned).float().mean()) for r, c in chosen.items()}
