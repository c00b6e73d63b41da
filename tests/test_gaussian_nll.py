"""The Gaussian-kernel NLL (arXiv 2510.18680) against torch.distributions, and its gradients."""

import math

import pytest
import torch
from torch.distributions import Normal

from embdistill.losses.gaussian_nll import (GaussianKernelNLLLoss, gaussian_kernel_log_prob,
                                           gaussian_kernel_terms)


def random_case(batch, dim, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    mu, target = (torch.randn(batch, dim, generator=generator, dtype=dtype) for _ in range(2))
    rho = 3 * torch.randn(batch, dim, generator=generator, dtype=dtype)  # tanh well into saturation
    return mu, rho, target


def reference_log_prob(mu, rho, target):
    """log N(t; mu, sigma = 1/lambda) summed over dimensions, lambda = exp(tanh(rho))."""
    precision = torch.exp(torch.tanh(rho))
    return Normal(mu, 1.0 / precision).log_prob(target).sum(-1)


def test_log_prob_is_the_diagonal_normal_with_precision_exp_tanh_rho():
    mu, rho, target = random_case(5, 7, seed=0)
    expected = reference_log_prob(mu, rho, target)
    assert torch.allclose(gaussian_kernel_log_prob(mu, rho, target), expected, rtol=1e-12, atol=1e-12)


def test_precision_is_bounded_by_e():
    mu = torch.zeros(1, 4, dtype=torch.float64)
    target = torch.full((1, 4), 0.5, dtype=torch.float64)
    for rho, precision in ((1e4, math.e), (-1e4, 1 / math.e)):
        value = gaussian_kernel_log_prob(mu, torch.full_like(mu, rho), target)
        expected = Normal(0.0, 1.0 / precision).log_prob(torch.tensor(0.5, dtype=torch.float64)) * 4
        assert torch.allclose(value, expected.reshape(1), atol=1e-9)


def test_gradcheck_in_double_precision():
    mu, rho, target = (x.requires_grad_() for x in random_case(2, 3, seed=1))
    rho.data *= 0.3  # away from tanh's flat tails, where finite differences say little
    assert torch.autograd.gradcheck(gaussian_kernel_log_prob, (mu, rho, target))


@pytest.mark.parametrize("normalize_by_dim", [False, True])
def test_loss_sums_each_teachers_mean_nll(normalize_by_dim):
    dims = {"wide": 12, "narrow": 3}
    predictions, targets, expected = {}, {}, 0.0
    for k, (name, dim) in enumerate(dims.items()):
        mu, rho, target = random_case(4, dim, seed=10 + k)
        predictions[name], targets[name] = (mu, rho), target
        nll = -reference_log_prob(mu, rho, target).mean()
        expected += nll / dim if normalize_by_dim else nll
    loss, metrics = GaussianKernelNLLLoss(normalize_by_dim)(predictions, targets)
    assert torch.allclose(loss, torch.as_tensor(expected), rtol=1e-12)
    for name, dim in dims.items():  # logged per dimension whatever the weighting
        mu, rho = predictions[name]
        assert metrics[f"nll/{name}"] == pytest.approx(-reference_log_prob(mu, rho, targets[name]).mean().item() / dim)


def test_the_logged_parts_are_log_lambda_and_the_weighted_squared_error():
    mu, rho, target = random_case(6, 5, seed=4)
    log_lambda, squared_error = gaussian_kernel_terms(mu, rho, target)
    precision = torch.exp(torch.tanh(rho))
    assert torch.allclose(log_lambda, torch.log(precision).sum(-1), rtol=1e-12)
    assert torch.allclose(squared_error, 0.5 * (precision * (target - mu)).pow(2).sum(-1), rtol=1e-12)
    _, metrics = GaussianKernelNLLLoss()({"t": (mu, rho)}, {"t": target})
    assert metrics["log_lambda/t"] == pytest.approx(log_lambda.mean().item() / 5)
    assert metrics["sq_err/t"] == pytest.approx(squared_error.mean().item() / 5)
    assert metrics["nll/t"] == pytest.approx(0.5 * math.log(2 * math.pi) - metrics["log_lambda/t"]
                                             + metrics["sq_err/t"])


def test_minimising_learns_mean_and_precision():
    """Fitting a constant (mu, rho) to noisy targets recovers their mean and, since the true
    spread (sigma 0.5, precision 2) lies inside [1/e, e], their precision."""
    torch.manual_seed(0)
    target = torch.tensor([1.0, -2.0]) + 0.5 * torch.randn(4096, 2)
    mu = torch.zeros(2, requires_grad=True)
    rho = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([mu, rho], lr=0.05)
    loss_fn = GaussianKernelNLLLoss()
    for _ in range(400):
        optimizer.zero_grad()
        loss, _ = loss_fn({"t": (mu.expand_as(target), rho.expand_as(target))}, {"t": target})
        loss.backward()
        optimizer.step()
    assert torch.allclose(mu.detach(), target.mean(0), atol=0.02)
    assert torch.allclose(torch.exp(torch.tanh(rho.detach())), 1 / target.std(0), atol=0.05)


def test_low_precision_inputs_are_summed_in_float32():
    mu, rho, target = (x.to(torch.bfloat16) for x in random_case(3, 64, seed=2, dtype=torch.float32))
    value = gaussian_kernel_log_prob(mu, rho, target)
    assert value.dtype == torch.float32
    assert torch.allclose(value, reference_log_prob(mu.float(), rho.float(), target.float()), rtol=1e-5)


def test_mismatched_shapes_and_teachers_are_refused():
    mu, rho, target = random_case(2, 3, seed=3)
    with pytest.raises(ValueError, match="same"):
        gaussian_kernel_log_prob(mu, rho, target[:, :2])
    with pytest.raises(ValueError, match="teachers differ"):
        GaussianKernelNLLLoss()({"a": (mu, rho)}, {"b": target})
