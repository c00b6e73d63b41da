"""The losses against independent computations: the sense loss against a plain per-token loop
with ``torch.nn.functional.cross_entropy``; the masked MSE against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embdistill.errors import UserError
from embdistill.losses import SenseLoss, masked_mse

VOCAB, DIM = 40, 8


def _random_dictionary(seed: int = 0) -> dict[int, np.ndarray]:
    """Entries for half the vocabulary, with k from 1 to 9 (float16, as stored on disk)."""
    rng = np.random.default_rng(seed)
    tokens = rng.choice(VOCAB, size=VOCAB // 2, replace=False)
    return {int(t): rng.normal(size=(int(rng.integers(1, 10)), DIM)).astype(np.float16) for t in tokens}


def _reference(dictionary, student, teacher, input_ids, mask):
    """Loss, accuracy and count by a loop over tokens, one cross-entropy per token."""
    losses, hits = [], []
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            token = int(input_ids[b, t])
            if not mask[b, t] or token not in dictionary:
                continue
            senses = torch.tensor(dictionary[token], dtype=torch.float32)
            target = int((senses @ teacher[b, t]).argmax())
            logits = senses @ student[b, t]
            losses.append(F.cross_entropy(logits[None], torch.tensor([target])))
            hits.append(int(logits.argmax()) == target)
    return torch.stack(losses).mean(), sum(hits) / len(hits), len(losses)


def _batch(seed: int, batch: int = 4, length: int = 11):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = (torch.rand(batch, length, generator=generator) > 0.3).long()
    teacher = torch.randn(batch, length, DIM, generator=generator)
    # the student near the teacher, so that some but not all argmaxes agree
    student = teacher + 0.8 * torch.randn(batch, length, DIM, generator=generator)
    return input_ids, mask, teacher, student


# the last case cuts the scored tokens into chunks of 5 (k is at most 9), in order of k
@pytest.mark.parametrize("seed, chunk_elements", [(0, 1 << 25), (1, 1 << 25), (2, 1 << 25), (0, 9 * DIM * 5)])
def test_sense_loss_equals_a_per_token_loop_with_mixed_k(seed, chunk_elements):
    dictionary = _random_dictionary(seed)
    assert len({len(v) for v in dictionary.values()}) > 3  # really mixed k
    input_ids, mask, teacher, student = _batch(seed)
    student_fast = student.clone().requires_grad_(True)
    student_loop = student.clone().requires_grad_(True)

    sense_loss = SenseLoss(dictionary, VOCAB, chunk_elements=chunk_elements)
    loss, accuracy, count = sense_loss(student_fast, teacher, input_ids, mask)
    entries = sense_loss.entry_of_token[input_ids][mask.bool() & (sense_loss.entry_of_token[input_ids] >= 0)]
    chunks = sense_loss.chunks_by_size(entries)
    assert sorted(torch.cat(chunks).tolist()) == list(range(count))
    assert len(chunks) == (1 if chunk_elements == 1 << 25 else -(-count // 5))
    expected_loss, expected_accuracy, expected_count = _reference(dictionary, student_loop, teacher,
                                                                  input_ids, mask)
    assert count == expected_count
    # tokens outside the mask or without an entry are skipped, and there are both kinds here
    has_entry = torch.tensor([[int(t) in dictionary for t in row] for row in input_ids])
    assert 0 < count < int(mask.sum()) and count < int(has_entry.sum())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert float(accuracy) == pytest.approx(expected_accuracy)
    assert 0 < expected_accuracy < 1

    loss.backward()
    expected_loss.backward()
    torch.testing.assert_close(student_fast.grad, student_loop.grad, rtol=1e-5, atol=1e-7)
    # skipped positions get no gradient
    skipped = ~(mask.bool() & has_entry)
    assert student_fast.grad[skipped].abs().sum() == 0


def test_sense_loss_with_no_scored_token_is_zero_and_differentiable():
    dictionary = {3: np.ones((2, DIM), np.float16)}
    input_ids = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1, 1, 0]])  # token 3 has an entry but is not text
    student = torch.randn(1, 3, DIM, requires_grad=True)
    loss, accuracy, count = SenseLoss(dictionary, VOCAB)(student, torch.randn(1, 3, DIM), input_ids, mask)
    assert count == 0 and loss.item() == 0.0 and accuracy.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sense_loss_refuses_a_dictionary_of_another_tokenizer():
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        SenseLoss({VOCAB + 5: np.ones((2, DIM), np.float16)}, VOCAB)
    with pytest.raises(UserError, match="empty"):
        SenseLoss({}, VOCAB)
    with pytest.raises(UserError, match="one d"):
        SenseLoss({1: np.ones((2, DIM)), 2: np.ones((2, DIM + 1))}, VOCAB)


def test_packed_dictionary_holds_every_entry_once():
    dictionary = _random_dictionary()
    loss = SenseLoss(dictionary, VOCAB)
    assert loss.hidden_size == DIM and loss.entry_of_token.shape == (VOCAB,)
    assert loss.centroids.shape == (sum(len(v) for v in dictionary.values()), DIM)  # no padding
    for token in range(VOCAB):
        entry = int(loss.entry_of_token[token])
        if token not in dictionary:
            assert entry == -1
            continue
        start, size = int(loss.offsets[entry]), int(loss.sizes[entry])
        expected = torch.tensor(dictionary[token], dtype=torch.float32)
        assert torch.equal(loss.centroids[start : start + size], expected)


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
