"""Balanced Aggregation reference math (hf_ext.losses.ba) against hand-computed values and the paper's properties."""

import pytest
import torch

from hf_ext.losses.ba import ba_aggregate, ba_group_metrics, ba_row_weights, balanced_aggregation


GARBAGE = 1e3  # written into padded positions: any leak of padding into the loss is visible


def padded(rows: list[list[float]], width: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_token_loss, mask) from ragged rows, right-padded with GARBAGE."""
    loss = torch.full((len(rows), width), GARBAGE, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        loss[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = 1
    return loss, mask


def both_forms(per_token_loss, mask, advantages, num_generations):
    """The paper's group formula and the per-row form the trainer uses."""
    group_form = balanced_aggregation(per_token_loss, mask, advantages, num_generations)
    row_form = ba_aggregate(per_token_loss, mask, ba_row_weights(mask.sum(-1), advantages, num_generations))
    return group_form.item(), row_form.item()


# Each case: token losses per row (ragged), advantages, group size, BA value computed by hand.
HAND_CASES = {
    # S+ = {0}: 1/3 * 3/1 = 1.  S- = {1, 2}: 2/3 * (1+2 + 1+1+1+1)/6 = 7/9.
    "mixed_signs_very_different_lengths": ([[3.0], [1.0, 2.0], [1.0, 1.0, 1.0, 1.0]], [1.0, -0.5, -0.5], 3, 16 / 9),
    # one subset holding the whole group: a plain token mean, 12/6 = 2
    "all_positive": ([[1.0, 3.0], [2.0, 2.0, 2.0, 2.0]], [0.5, 2.0], 2, 2.0),
    "all_negative": ([[1.0, 3.0], [2.0, 2.0, 2.0, 2.0]], [-0.5, -2.0], 2, 2.0),
    # no signal: every row is a tie, nothing is aggregated
    "all_zero_advantage": ([[1.0, 3.0], [2.0, 2.0, 2.0]], [0.0, 0.0], 2, 0.0),
    # a truncated (fully masked) positive row leaves n+ = 1 but G stays 3: 1/3 * 4/2 + 1/3 * 6/1 = 8/3
    "masked_row": ([[], [1.0, 3.0], [6.0]], [1.0, 1.0, -2.0], 3, 8 / 3),
    # two groups of two: the batch loss is their mean, (2.5 + 1.5) / 2
    "two_groups": ([[2.0, 4.0], [1.0], [3.0], [1.0, 1.0]], [1.0, -1.0, 1.0, -1.0], 2, 2.0),
    # |A| below the tolerance is a tie even when its sign is negative: 1/2 * 5/1 = 2.5
    "tie_residue": ([[5.0], [7.0, 7.0, 7.0]], [1.0, -3e-17], 2, 2.5),
}


@pytest.mark.parametrize("case", HAND_CASES, ids=list(HAND_CASES))
def test_ba_matches_hand_computed_value(case):
    rows, advantages, num_generations, expected = HAND_CASES[case]
    per_token_loss, mask = padded(rows)
    advantages = torch.tensor(advantages, dtype=torch.float64)
    group_form, row_form = both_forms(per_token_loss, mask, advantages, num_generations)
    assert group_form == pytest.approx(expected, rel=1e-12)
    assert row_form == pytest.approx(expected, rel=1e-12)


def random_batch(num_groups, num_generations, width, seed, equal_lengths_within_sign=False):
    generator = torch.Generator().manual_seed(seed)
    rows = num_groups * num_generations
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    advantages[torch.rand(rows, generator=generator) < 0.15] = 0.0
    lengths = torch.randint(0, width + 1, (rows,), generator=generator)
    if equal_lengths_within_sign:
        per_group = torch.randint(1, width + 1, (num_groups, 2), generator=generator)
        sign_index = (advantages.view(num_groups, num_generations) < 0).long()
        lengths = per_group.gather(1, sign_index).flatten()
    mask = (torch.arange(width)[None, :] < lengths[:, None]).double()
    per_token_loss = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    return per_token_loss, mask, advantages


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_generations", [2, 5, 8])
def test_row_form_equals_group_formula(seed, num_generations):
    per_token_loss, mask, advantages = random_batch(6, num_generations, 11, seed)
    group_form, row_form = both_forms(per_token_loss, mask, advantages, num_generations)
    assert row_form == pytest.approx(group_form, rel=1e-12, abs=1e-14)


def grpo_aggregate(per_token_loss, mask):
    """TRL's `grpo` aggregation: mean over rows of the row's token mean."""
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


@pytest.mark.parametrize("seed", range(5))
def test_ba_equals_grpo_when_lengths_are_equal_within_each_sign(seed):
    per_token_loss, mask, advantages = random_batch(5, 6, 9, seed, equal_lengths_within_sign=True)
    per_token_loss.requires_grad_(True)
    ba = balanced_aggregation(per_token_loss, mask, advantages, 6)
    zero_adv = advantages.abs() <= 1e-6  # ties weigh nothing in BA; grpo counts them, so compare signed rows only
    grpo = grpo_aggregate(per_token_loss * (~zero_adv)[:, None], mask)
    (ba_grad,) = torch.autograd.grad(ba, per_token_loss)
    (grpo_grad,) = torch.autograd.grad(grpo, per_token_loss)
    assert ba.item() == pytest.approx(grpo.item(), rel=1e-12)
    torch.testing.assert_close(ba_grad, grpo_grad, rtol=1e-12, atol=1e-15)


def test_ba_differs_from_grpo_and_token_mean_when_lengths_differ():
    rows, advantages, num_generations, expected = HAND_CASES["mixed_signs_very_different_lengths"]
    per_token_loss, mask = padded(rows)
    token_mean = (per_token_loss * mask).sum() / mask.sum()
    assert grpo_aggregate(per_token_loss, mask).item() == pytest.approx(11 / 6)
    assert token_mean.item() == pytest.approx(10 / 7)
    assert expected not in (pytest.approx(11 / 6), pytest.approx(10 / 7))


def test_ba_weight_ignores_length_within_sign():
    """Sign-share property: gradient mass per sign is n±/G, spread evenly over that sign's tokens."""
    num_generations = 4
    lengths = [3, 3, 40, 40]  # short positives, long negatives
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    mask = (torch.arange(40)[None, :] < torch.tensor(lengths)[:, None]).double()
    logps = torch.zeros(4, 40, dtype=torch.float64, requires_grad=True)
    per_token_loss = -advantages[:, None] * torch.exp(logps - logps.detach())  # ratio 1, as in on-policy GRPO
    ba = balanced_aggregation(per_token_loss, mask, advantages, num_generations)
    (grad,) = torch.autograd.grad(ba, logps, retain_graph=True)
    positive_grad, negative_grad = grad[:2][mask[:2].bool()], grad[2:][mask[2:].bool()]
    assert positive_grad.abs().sum().item() == pytest.approx(2 / 4)
    assert negative_grad.abs().sum().item() == pytest.approx(2 / 4)
    assert torch.allclose(positive_grad, positive_grad[0]) and torch.allclose(negative_grad, negative_grad[0])
    token_mean_grad = torch.autograd.grad((per_token_loss * mask).sum() / mask.sum(), logps)[0]
    assert token_mean_grad[:2].abs().sum().item() == pytest.approx(6 / 86)  # L+/(L+ + L-): what BA removes


def test_group_metrics_hand_values():
    # group 1: +,+,- with lengths 2,4,10; group 2: all ties
    lengths = torch.tensor([2.0, 4.0, 10.0, 5.0, 5.0, 5.0])
    advantages = torch.tensor([1.0, 0.5, -1.5, 0.0, 0.0, 0.0])
    metrics = ba_group_metrics(lengths, advantages, 3)
    assert metrics["pos_weight"] == pytest.approx(2 / 3)
    assert metrics["neg_weight"] == pytest.approx(1 / 3)
    assert metrics["token_agg_pos_share"] == pytest.approx(6 / 16)
    assert metrics["len_gap"] == pytest.approx(3 - 10)
    assert metrics["no_signal_frac"] == pytest.approx(1 / 2)


def test_row_lengths_reject_incomplete_groups():
    with pytest.raises(ValueError, match="num_generations=4"):
        ba_row_weights(torch.ones(6), torch.ones(6), 4)
