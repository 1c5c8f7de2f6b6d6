"""The one clipped surrogate (hf_ext.losses.surrogate) against hand-computed values: the clip acts only on the side
the advantage favours, ``delta`` caps the unclipped ratio, the sequence-level ratio is the row's mean log-ratio.
(That it equals TRL's own loss on the same tensors is tests/trainers/test_grpo_clipped.py.)"""

import math

import pytest
import torch

from hf_ext.losses.surrogate import clipped_surrogate, k3_kl, log_importance_weights


def surrogate(logps, advantages, **options):
    logps = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(logps)
    options = {"epsilon_low": 0.2, "epsilon_high": 0.2, **options}
    loss, ratio = clipped_surrogate(
        logps, torch.zeros_like(logps), torch.tensor(advantages, dtype=torch.float64), mask, **options
    )
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    return loss.detach(), ratio.detach(), grad


def test_clip_stops_the_gradient_only_where_the_advantage_pushes_further():
    loss, ratio, grad = surrogate([[math.log(1.5)], [math.log(1.5)]], [1.0, -1.0])
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [1.5]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[0.0], [1.5]], dtype=torch.float64))  # d(-rho*A)/dlogp = -rho*A
    torch.testing.assert_close(ratio, torch.full((2, 1), 1.5, dtype=torch.float64))


def test_delta_caps_the_unclipped_ratio_of_negative_advantages():
    loss, ratio, grad = surrogate([[math.log(1.5)]], [-1.0], delta=1.3)
    assert loss.item() == pytest.approx(1.3) and ratio.item() == pytest.approx(1.3)
    assert grad.item() == 0.0  # the cap is a constant


def test_asymmetric_clip_range():
    loss, _, _ = surrogate([[math.log(1.5)], [math.log(0.5)]], [1.0, -1.0], epsilon_low=0.1, epsilon_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.28], [0.9]], dtype=torch.float64))


def test_sequence_level_ratio_is_shared_by_the_row_s_tokens():
    logps = torch.tensor([[math.log(2.0), 0.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    log_weights = log_importance_weights(logps, torch.zeros_like(logps), mask, "sequence")
    assert log_weights.shape == (1, 1) and log_weights.item() == pytest.approx(math.log(2.0) / 2)
    loss, ratio = clipped_surrogate(
        logps, torch.zeros_like(logps), torch.tensor([1.0]), mask, 0.5, 0.5, level="sequence"
    )
    assert ratio.shape == (1, 1) and ratio.item() == pytest.approx(math.sqrt(2.0))
    assert loss.shape == (1, 1) and loss.item() == pytest.approx(-math.sqrt(2.0))
    with pytest.raises(ValueError, match="importance_sampling_level='tokens' is not known"):
        log_importance_weights(logps, logps, mask, "tokens")


def test_on_policy_ratio_is_one_with_the_gradient_of_the_log_probability():
    logps = torch.tensor([[-0.7, -1.1]], dtype=torch.float64, requires_grad=True)
    loss, ratio = clipped_surrogate(logps, None, torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.2)
    torch.testing.assert_close(ratio, torch.ones(1, 2, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    torch.testing.assert_close(grad, torch.full((1, 2), -2.0, dtype=torch.float64))


def test_k3_kl_hand_values():
    logps = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, math.log(2.0)]], dtype=torch.float64)
    torch.testing.assert_close(k3_kl(logps, ref), torch.tensor([[0.0, 1.0 - math.log(2.0)]], dtype=torch.float64))
