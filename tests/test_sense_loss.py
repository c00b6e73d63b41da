"""The losses against independent computations: the sense loss and its targets, under each
sense rule, against a plain per-token loop with ``torch.nn.functional.cross_entropy`` over
multi-sense tokens; the packed dictionary's float32 scoring under bf16 autocast; the masked MSE
against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.bench_replace import reference_scores
from embdistill.errors import UserError
from embdistill.losses import SenseLoss, masked_mse
from embdistill.senses.packed import SENSE_RULES, PackedSenses

VOCAB, DIM = 40, 8


def _random_dictionary(seed: int = 0) -> dict[int, np.ndarray]:
    """Entries for half the vocabulary, with k from 1 to 9 (float16, as stored on disk)."""
    rng = np.random.default_rng(seed)
    tokens = rng.choice(VOCAB, size=VOCAB // 2, replace=False)
    return {int(t): rng.normal(size=(int(rng.integers(1, 10)), DIM)).astype(np.float16) for t in tokens}


def _reference(dictionary, student, teacher, input_ids, mask, rule="dot"):
    """Loss, accuracy and count by a loop over the multi-sense tokens, one cross-entropy per
    token; and each text token's target with an entry, (b, t) -> sense."""
    losses, hits, targets = [], [], {}
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            token = int(input_ids[b, t])
            if not mask[b, t] or token not in dictionary:
                continue
            senses = torch.tensor(dictionary[token], dtype=torch.float32)
            targets[b, t] = target = int(reference_scores(senses, teacher[b, t], rule).argmax())
            if len(senses) == 1:
                continue
            logits = reference_scores(senses, student[b, t], rule)
            losses.append(F.cross_entropy(logits[None], torch.tensor([target])))
            hits.append(int(logits.argmax()) == target)
    return torch.stack(losses).mean(), sum(hits) / len(hits), len(losses), targets


def _batch(seed: int, batch: int = 4, length: int = 11):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = (torch.rand(batch, length, generator=generator) > 0.3).long()
    teacher = torch.randn(batch, length, DIM, generator=generator)
    # the student near the teacher, so that some but not all argmaxes agree
    student = teacher + 0.8 * torch.randn(batch, length, DIM, generator=generator)
    return input_ids, mask, teacher, student


# the last case cuts the scored tokens into chunks of 5 (k is at most 9), in order of k
@pytest.mark.parametrize("rule", SENSE_RULES)
@pytest.mark.parametrize("seed, chunk_elements", [(0, 1 << 25), (1, 1 << 25), (2, 1 << 25), (0, 9 * DIM * 5)])
def test_sense_loss_equals_a_per_token_loop_with_mixed_k(seed, chunk_elements, rule):
    dictionary = _random_dictionary(seed)
    assert len({len(v) for v in dictionary.values()}) > 3  # really mixed k
    input_ids, mask, teacher, student = _batch(seed)
    student_fast = student.clone().requires_grad_(True)
    student_loop = student.clone().requires_grad_(True)

    senses = PackedSenses(dictionary, VOCAB, rule=rule, chunk_elements=chunk_elements)
    targets = senses.targets(teacher, input_ids, mask)
    loss, accuracy, count = SenseLoss(senses)(student_fast, input_ids, targets)
    entries = senses.entries(input_ids)[targets >= 0]
    entries = entries[senses.sizes[entries] > 1]
    chunks = list(senses.chunks(entries))
    assert sorted(torch.cat(chunks).tolist()) == list(range(count))
    assert len(chunks) == (1 if chunk_elements == 1 << 25 else -(-count // 5))
    expected_loss, expected_accuracy, expected_count, expected_targets = _reference(
        dictionary, student_loop, teacher, input_ids, mask, rule)
    assert {tuple(p): int(targets[tuple(p)]) for p in (targets >= 0).nonzero().tolist()} == expected_targets
    assert count == expected_count
    # tokens outside the mask or without an entry are skipped, and there are both kinds here
    has_entry = torch.tensor([[int(t) in dictionary for t in row] for row in input_ids])
    assert 0 < count < int(mask.sum()) and count < int(has_entry.sum())
    assert torch.equal(targets < 0, ~(mask.bool() & has_entry))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert float(accuracy) == pytest.approx(expected_accuracy)
    assert 0 < expected_accuracy < 1

    loss.backward()
    expected_loss.backward()
    torch.testing.assert_close(student_fast.grad, student_loop.grad, rtol=1e-5, atol=1e-7)
    # skipped positions get no gradient
    skipped = ~(mask.bool() & has_entry)
    assert student_fast.grad[skipped].abs().sum() == 0


def test_the_rules_pick_different_senses_and_an_unknown_rule_is_refused():
    """The parametrised test above would not notice a rule being ignored unless the rules
    disagree on its data: they do, on the same states and senses."""
    dictionary = _random_dictionary(0)
    input_ids, mask, teacher, _ = _batch(0)
    targets = {rule: PackedSenses(dictionary, VOCAB, rule=rule).targets(teacher, input_ids, mask)
               for rule in SENSE_RULES}
    for first, second in [("dot", "l2"), ("dot", "cos"), ("l2", "cos")]:
        assert not torch.equal(targets[first], targets[second]), (first, second)
    with pytest.raises(UserError, match="unknown sense rule 'nearest': choose one of dot, l2, cos"):
        PackedSenses(dictionary, VOCAB, rule="nearest")


@pytest.mark.parametrize("rule", SENSE_RULES)
def test_single_sense_tokens_are_left_out_of_loss_and_accuracy(rule):
    """With single-sense tokens among the targets, loss, accuracy and count equal those of
    the same batch whose single-sense positions carry no target; counted, they would have
    lowered the loss and raised the accuracy."""
    dictionary = _random_dictionary(1)
    input_ids, mask, teacher, student = _batch(1)
    senses = PackedSenses(dictionary, VOCAB, rule=rule)
    targets = senses.targets(teacher, input_ids, mask)
    single = (targets >= 0) & (senses.sizes[senses.entries(input_ids).clamp(min=0)] == 1)
    assert 0 < int(single.sum()) < int((targets >= 0).sum())
    loss, accuracy, count = SenseLoss(senses)(student, input_ids, targets)
    multi_only = targets.masked_fill(single, -1)
    assert (loss, accuracy, count) == SenseLoss(senses)(student, input_ids, multi_only)
    assert count == int((multi_only >= 0).sum())
    with_single = (loss * count) / (count + int(single.sum()))  # their cross-entropy is 0
    assert with_single < loss and float(accuracy) < 1

    only_single = PackedSenses({int(t): v[:1] for t, v in dictionary.items()}, VOCAB, rule=rule)
    student = student.clone().requires_grad_(True)
    loss, accuracy, count = SenseLoss(only_single)(student, input_ids, only_single.targets(teacher, input_ids, mask))
    assert count == 0 and loss.item() == 0.0 and accuracy.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sense_scores_stay_float32_under_bf16_autocast():
    """4096-d states of norm ~100 against close senses: bf16 dot products would flip many
    targets (checked below on the same data); the packed dictionary scores in float32
    whatever the caller's autocast, so targets and logits are those without autocast."""
    generator = torch.Generator().manual_seed(0)
    dim, k, n = 4096, 8, 256
    centre = torch.randn(dim, generator=generator)
    dictionary = {7: (centre + 0.05 * torch.randn(k, dim, generator=generator)).numpy().astype(np.float16)}
    senses = PackedSenses(dictionary, VOCAB)
    states = (centre + 0.05 * torch.randn(1, n, dim, generator=generator)) * 1.6  # norm ~100
    input_ids, mask = torch.full((1, n), 7), torch.ones(1, n, dtype=torch.long)

    plain_targets = senses.targets(states, input_ids, mask)
    entries = senses.entries(input_ids)[0]
    plain_logits = senses.logits(states[0], entries)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_targets = senses.targets(states, input_ids, mask)
        autocast_logits = senses.logits(states[0], entries)
        rounded = torch.einsum("nkd,nd->nk", senses.centroids[:k].float()[None].expand(n, k, dim), states[0])
    assert autocast_logits.dtype == torch.float32 and torch.equal(autocast_logits, plain_logits)
    assert torch.equal(autocast_targets, plain_targets)
    assert rounded.dtype == torch.bfloat16  # what an autocast einsum gives: other targets
    assert (rounded.argmax(-1) != plain_targets[0]).float().mean() > 0.05
    loss, _, count = SenseLoss(senses)(states.clone().requires_grad_(True), input_ids, plain_targets)
    assert count == n and loss.dtype == torch.float32


def test_sense_loss_with_no_scored_token_is_zero_and_differentiable():
    senses = PackedSenses({3: np.ones((2, DIM), np.float16)}, VOCAB)
    input_ids = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1, 1, 0]])  # token 3 has an entry but is not text
    targets = senses.targets(torch.randn(1, 3, DIM), input_ids, mask)
    assert targets.tolist() == [[-1, -1, -1]]
    student = torch.randn(1, 3, DIM, requires_grad=True)
    loss, accuracy, count = SenseLoss(senses)(student, input_ids, targets)
    assert count == 0 and loss.item() == 0.0 and accuracy.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sense_loss_refuses_targets_of_another_dictionary():
    senses = PackedSenses({3: np.ones((2, DIM), np.float16)}, VOCAB)
    with pytest.raises(ValueError, match="another dictionary"):
        SenseLoss(senses)(torch.randn(1, 2, DIM), torch.tensor([[3, 4]]), torch.tensor([[0, 1]]))


def test_packed_dictionary_refuses_a_dictionary_of_another_tokenizer():
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        PackedSenses({VOCAB + 5: np.ones((2, DIM), np.float16)}, VOCAB)
    with pytest.raises(UserError, match="empty"):
        PackedSenses({}, VOCAB)
    with pytest.raises(UserError, match="one d"):
        PackedSenses({1: np.ones((2, DIM)), 2: np.ones((2, DIM + 1))}, VOCAB)


def test_packed_dictionary_holds_every_entry_once_and_round_trips():
    dictionary = _random_dictionary()
    packed = PackedSenses(dictionary, VOCAB)
    assert packed.hidden_size == DIM and packed.entry_of_token.shape == (VOCAB,)
    assert packed.centroids.dtype == torch.float16  # as stored on disk
    assert packed.centroids.shape == (sum(len(v) for v in dictionary.values()), DIM)  # no padding
    for token in range(VOCAB):
        entry = int(packed.entry_of_token[token])
        if token not in dictionary:
            assert entry == -1
            continue
        start, size = int(packed.offsets[entry]), int(packed.sizes[entry])
        assert torch.equal(packed.centroids[start : start + size], torch.from_numpy(dictionary[token]))
    again = PackedSenses.from_tensors(packed.to_tensors(), VOCAB)
    for name in ("centroids", "offsets", "sizes", "entry_of_token"):
        assert torch.equal(getattr(again, name), getattr(packed, name))
    broken = {**packed.to_tensors(), "sizes": packed.sizes + 1}
    with pytest.raises(UserError, match="do not fit"):
        PackedSenses.from_tensors(broken, VOCAB)


def test_masked_mse_matches_its_formula():
    generator = torch.Generator().manual_seed(0)
    predicted = torch.randn(3, 5, DIM, generator=generator, requires_grad=True)
    target = torch.randn(3, 5, DIM, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])

    loss, count = masked_mse(predicted, target, mask)
    selected = [(b, t) for b in range(3) for t in range(5) if mask[b, t]]
    expected = sum(((predicted[b, t] - target[b, t]) ** 2).sum() / DIM for b, t in selected) / len(selected)
    assert count == len(selected) == 5
    torch.testing.assert_close(loss, expected)

    # without a mask: every vector (the multi-teacher use, one vector per text)
    loss_all, count_all = masked_mse(predicted[:, 0], target[:, 0])
    assert count_all == 3
    torch.testing.assert_close(loss_all, F.mse_loss(predicted[:, 0], target[:, 0]))

    empty, none = masked_mse(predicted, target, torch.zeros(3, 5))
    assert none == 0 and empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError):
        masked_mse(predicted, target[:, :2])
