"""REAL reference math (hf_ext.losses.real) against hand values, explicit formulas and the paper's properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_ext.losses.real import (
    real_bce_loss,
    real_bce_targets,
    real_group_loss,
    real_group_metrics,
    real_labels,
    real_onpolicy_coefficients,
    real_product_group_loss,
    sequence_scores,
)


LN2 = math.log(2)
GARBAGE = 1e3  # written into padded positions: any leak of padding into a score is visible


def bools(*groups: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels written as '+', '-' or '.' (neither), one string per group -> (positive, negative) bool masks."""
    values = "".join(groups)
    return torch.tensor([c == "+" for c in values]), torch.tensor([c == "-" for c in values])


def doubles(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def padded(rows: list[list[float]], width: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_token values, mask) from ragged rows, right-padded with GARBAGE."""
    values = torch.full((len(rows), width), GARBAGE, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        values[i, : len(row)] = doubles(row)
        mask[i, : len(row)] = 1
    return values, mask


def random_labels(num_groups, num_generations, seed):
    """Labels with random proportions per group, so valid and invalid groups both occur."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(num_groups * num_generations, generator=generator)
    cut = torch.rand(num_groups, 2, generator=generator).sort(1).values.repeat_interleave(num_generations, 0)
    return draw < cut[:, 0], draw > cut[:, 1]


# ---- scores and labels -----------------------------------------------------------------------------------------


def test_sequence_score_is_masked_mean_log_ratio():
    logps, mask = padded([[-1.0, -2.0], [-0.3], [], [-0.5, -0.5, -2.0]])
    old, _ = padded([[-1.5, -1.5], [-1.0], [], [-1.0, -1.0, -1.0]])
    # (0.5 - 0.5)/2 = 0;  0.7/1;  empty row -> 0;  (0.5 + 0.5 - 1)/3 = 0
    torch.testing.assert_close(sequence_scores(logps, old, mask), doubles([0.0, 0.7, 0.0, 0.0]))


def test_sequence_score_on_policy_is_zero_with_mean_logp_gradient():
    logps, mask = padded([[-1.0, -2.0], [-0.3]])
    logps.requires_grad_(True)
    scores = sequence_scores(logps, None, mask)
    (grad,) = torch.autograd.grad(scores.sum(), logps)
    torch.testing.assert_close(scores.detach(), doubles([0.0, 0.0]))
    torch.testing.assert_close(grad, doubles([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))


def test_labels_follow_advantage_sign_and_ignore_ties_and_empty_rows():
    advantages = doubles([0.5, -0.5, 0.0, -3e-17, 2.0, -1.0])
    _, mask = padded([[1.0], [1.0], [1.0], [1.0], [], []])  # the last two rows have no loss token
    positive, negative = real_labels(advantages, mask)
    assert positive.tolist() == [True, False, False, False, False, False]
    assert negative.tolist() == [False, True, False, False, False, False]


# ---- REAL loss: hand values, anchor identity, product form ---------------------------------------------------

# Shared hand case, tau = 1/2, s = [0, ln2, 0, ln2] with labels + + - -, so e^{+-s/tau} is 1 or 4 or 1/4:
#   L+ = log(1 + e^0 + e^{-2 ln2}) = log(9/4),   L- = log(1 + e^0 + e^{2 ln2}) = log(6),   L = log(27/2)
#   product: log(1 + (1 + 4) * (1 + 1/4)) = log(29/4)
#   dL/ds: positives -(1/tau) e^{-s/tau} / (9/4) = -8/9, -2/9;  negatives (1/tau) e^{s/tau} / 6 = 1/3, 4/3
HAND_SCORES = [0.0, LN2, 0.0, LN2]
HAND_TAU = 0.5


def test_real_matches_hand_computed_value_and_gradient():
    scores = doubles(HAND_SCORES).requires_grad_(True)
    positive, negative = bools("++--")
    loss = real_group_loss(scores, positive, negative, 4, HAND_TAU)
    (grad,) = torch.autograd.grad(loss, scores)
    assert loss.item() == pytest.approx(math.log(27 / 2), rel=1e-12)
    torch.testing.assert_close(grad, doubles([-8 / 9, -2 / 9, 1 / 3, 4 / 3]))


def test_real_ignores_tie_rows_and_averages_over_groups():
    # group 1 is the hand case plus an ignored row with a large score; group 2 has a single +/- pair at s = 0:
    # log(1 + 1) + log(1 + 1) = log 4.  Mean over the two groups.
    scores = doubles([*HAND_SCORES, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]).requires_grad_(True)
    positive, negative = bools("++--.", "+-...")
    loss = real_group_loss(scores, positive, negative, 5, HAND_TAU)
    (grad,) = torch.autograd.grad(loss, scores)
    assert loss.item() == pytest.approx((math.log(27 / 2) + math.log(4)) / 2, rel=1e-12)
    # group 2 on-policy weights: 1/(tau (1 + 1)) = 1, halved by the mean over 2 groups
    torch.testing.assert_close(grad, doubles([-4 / 9, -1 / 9, 1 / 6, 2 / 3, 0, -0.5, 0.5, 0, 0, 0]))


def test_product_variant_matches_hand_computed_value():
    positive, negative = bools("++--")
    loss = real_product_group_loss(doubles(HAND_SCORES), positive, negative, 4, HAND_TAU)
    assert loss.item() == pytest.approx(math.log(29 / 4), rel=1e-12)


def explicit_real(scores, positive, negative, tau):
    """Equation (8) of one group, written with Python floats."""
    loss_pos = math.log(1 + sum(math.exp(-s / tau) for s, p in zip(scores, positive, strict=True) if p))
    loss_neg = math.log(1 + sum(math.exp(s / tau) for s, n in zip(scores, negative, strict=True) if n))
    return loss_pos + loss_neg


def explicit_pairwise(scores, positive, negative, tau):
    """log(1 + sum over (positive i, negative j) of e^{(s_j - s_i)/tau}) of one group."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, n in zip(scores, negative, strict=True) if n]
    return math.log(1 + sum(math.exp((sj - si) / tau) for si in pos for sj in neg))


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_anchor_identity_and_pairwise_form(tau, seed):
    """REAL = logsumexp([-s+/tau, 0]) + logsumexp([s-/tau, 0]); product = the anchor-free pairwise loss <= REAL."""
    num_groups, num_generations = 6, 5
    positive, negative = random_labels(num_groups, num_generations, seed)
    scores = torch.randn(num_groups * num_generations, generator=torch.Generator().manual_seed(seed)).double()
    real_terms, pairwise_terms = [], []
    for q in range(num_groups):
        rows = slice(q * num_generations, (q + 1) * num_generations)
        s, p, n = scores[rows].tolist(), positive[rows].tolist(), negative[rows].tolist()
        valid = any(p) and any(n)
        real_terms.append(explicit_real(s, p, n, tau) if valid else 0.0)
        pairwise_terms.append(explicit_pairwise(s, p, n, tau) if valid else 0.0)
    real = real_group_loss(scores, positive, negative, num_generations, tau).item()
    product = real_product_group_loss(scores, positive, negative, num_generations, tau).item()
    assert real == pytest.approx(sum(real_terms) / num_groups, rel=1e-12)
    assert product == pytest.approx(sum(pairwise_terms) / num_groups, rel=1e-12)
    assert product <= real  # log(1 + ab) <= log(1 + a) + log(1 + b)


# ---- gradient weights (paper Figure 1) --------------------------------------------------------------------------

PARTNERS_POS = [0.3, -0.7]  # the swept row's fixed same-label peers when it is a positive
PARTNERS_NEG = [0.2, -0.4, 1.1]  # and when it is a negative; the other label's rows are the other list


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("swept_label", ["+", "-"])
def test_gradient_weight_matches_closed_form_is_monotone_and_bounded(tau, swept_label):
    sweep = torch.linspace(-2.5, 2.5, 101, dtype=torch.float64)
    same, other = (PARTNERS_POS, PARTNERS_NEG) if swept_label == "+" else (PARTNERS_NEG, PARTNERS_POS)
    other_label = "-" if swept_label == "+" else "+"
    labels = swept_label * (1 + len(same)) + other_label * len(other)
    # one group per sweep point, the swept row first; the mean over groups is undone by * num_groups
    scores = torch.cat([sweep[:, None], doubles(same + other).expand(len(sweep), -1)], dim=1).flatten()
    scores.requires_grad_(True)
    positive, negative = bools(labels * len(sweep))
    loss = real_group_loss(scores, positive, negative, len(labels), tau)
    (grad,) = torch.autograd.grad(loss * len(sweep), scores)
    weight = grad.view(len(sweep), -1)[:, 0]

    if swept_label == "+":
        peers = 1 + sum(math.exp(-s / tau) for s in same)  # C+
        closed_form = (1 / tau) / (1 + peers * torch.exp(sweep / tau))
        assert (weight < 0).all()  # the update raises positives
        assert (weight.abs().diff() < 0).all()  # decreasing in s_k
    else:
        peers = 1 + sum(math.exp(s / tau) for s in same)  # C-
        closed_form = (1 / tau) / (1 + peers * torch.exp(-sweep / tau))
        assert (weight > 0).all()  # the update lowers negatives
        assert (weight.abs().diff() > 0).all()  # increasing in s_k
    torch.testing.assert_close(weight.abs(), closed_form, rtol=1e-12, atol=1e-15)
    assert (weight.abs() < 1 / tau).all()


# ---- on-policy coefficients (path (a)) ------------------------------------------------------------------------


def test_onpolicy_coefficients_hand_values():
    # group 1: n+ = 2, n- = 1 with one tie; group 2 all positive (invalid); tau = 1/2
    positive, negative = bools("++-.", "+++.")
    coef = real_onpolicy_coefficients(positive, negative, 4, 0.5)
    torch.testing.assert_close(coef, doubles([-2 / 3, -2 / 3, 1.0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("tau", [0.5, 1.0])
@pytest.mark.parametrize("num_generations", [2, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_onpolicy_coefficients_equal_autograd_at_zero(seed, num_generations, tau):
    num_groups = 7
    positive, negative = random_labels(num_groups, num_generations, seed)
    scores = torch.zeros(num_groups * num_generations, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(real_group_loss(scores, positive, negative, num_generations, tau), scores)
    coef = real_onpolicy_coefficients(positive, negative, num_generations, tau)
    torch.testing.assert_close(coef / num_groups, grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_onpolicy_surrogate_gradient_is_exact_under_any_row_layout(seed):
    """Path (a) == path (b): the surrogate split over shuffled micro-batches sums to the whole-group gradient."""
    num_groups, num_generations, tau = 6, 4, 0.5
    positive, negative = random_labels(num_groups, num_generations, seed)
    generator = torch.Generator().manual_seed(seed)
    logps = torch.randn(num_groups * num_generations, 3, generator=generator, dtype=torch.float64)
    logps.requires_grad_(True)
    mask = torch.ones_like(logps)
    scores = sequence_scores(logps, logps.detach(), mask)  # on-policy: s = 0, gradient of the mean logp

    group_loss = real_group_loss(scores, positive, negative, num_generations, tau)
    (expected,) = torch.autograd.grad(group_loss, logps, retain_graph=True)

    coef = real_onpolicy_coefficients(positive, negative, num_generations, tau)
    order = torch.randperm(len(coef), generator=generator)  # rows scattered over 5 micro-batches / processes
    surrogate = sum((coef[rows] * scores[rows]).sum() / num_groups for rows in order.tensor_split(5))
    (got,) = torch.autograd.grad(surrogate, logps)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_onpolicy_coefficients_permute_with_rows_within_a_group():
    positive, negative = bools("+--.+", "-+.--")
    coef = real_onpolicy_coefficients(positive, negative, 5, 0.5)
    within = torch.tensor([3, 0, 4, 1, 2, 7, 9, 5, 8, 6])  # a permutation of each group's own rows
    torch.testing.assert_close(real_onpolicy_coefficients(positive[within], negative[within], 5, 0.5), coef[within])


# ---- invalid groups and layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [real_group_loss, real_product_group_loss])
def test_invalid_groups_contribute_zero_but_count_in_the_mean(variant):
    # valid hand group, then: all positive, all negative, all ties, and a group whose only negative is masked
    advantages = doubles([1, 1, -1, -1] + [1, 2, 1, 1] + [-1, -1, -2, -1] + [0, 0, 0, 0] + [1, 1, 1, -3])
    lengths = torch.tensor([2] * 19 + [0])
    mask = (torch.arange(2)[None, :] < lengths[:, None]).double()
    positive, negative = real_labels(advantages, mask)
    scores = doubles(HAND_SCORES + [0.9, -1.3, 2.0, 0.1] * 4).requires_grad_(True)
    loss = variant(scores, positive, negative, 4, HAND_TAU)
    (grad,) = torch.autograd.grad(loss, scores)
    hand_value = math.log(27 / 2) if variant is real_group_loss else math.log(29 / 4)
    assert loss.item() == pytest.approx(hand_value / 5, rel=1e-12)
    assert torch.isfinite(grad).all()
    assert (grad[4:] == 0).all()
    metrics = real_group_metrics(scores, positive, negative, 4)
    assert metrics["valid_group_frac"] == pytest.approx(1 / 5)


def test_all_invalid_batch_gives_zero_loss_and_zero_gradient():
    positive, negative = bools("++", "--")
    scores = doubles([0.4, -0.2, 1.0, 3.0]).requires_grad_(True)
    for variant in (real_group_loss, real_product_group_loss):
        loss = variant(scores, positive, negative, 2, 0.5)
        (grad,) = torch.autograd.grad(loss, scores)
        assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("variant", [real_group_loss, real_product_group_loss])
def test_group_aligned_loss_splits_over_simulated_processes(variant):
    """Path (b): whole groups sharded over 2 processes, averaged as DDP does, give the 1-process loss."""
    num_groups, num_generations = 8, 4
    positive, negative = random_labels(num_groups, num_generations, seed=0)
    scores = torch.randn(num_groups * num_generations, generator=torch.Generator().manual_seed(1)).double()
    groups = torch.randperm(num_groups, generator=torch.Generator().manual_seed(2))
    rows = (groups[:, None] * num_generations + torch.arange(num_generations)).flatten()
    shards = [variant(scores[r], positive[r], negative[r], num_generations, 0.5) for r in rows.chunk(2)]
    full = variant(scores, positive, negative, num_generations, 0.5)
    assert (sum(shards) / 2).item() == pytest.approx(full.item(), rel=1e-12)


# ---- BCE variant --------------------------------------------------------------------------------------------------


def test_bce_targets_mark_the_group_best_and_skip_flat_groups():
    # non-binary: only the best rows are targets; a flat group and a row without tokens are invalid
    advantages = doubles([0.9, 0.9, 0.1, -1.9] + [0.0, 0.0, 0.0, 0.0] + [1.0, -1.0, 1.0 - 1e-9, -1.0])
    lengths = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1])
    mask = (torch.arange(1)[None, :] < lengths[:, None]).double()
    targets, valid = real_bce_targets(advantages, mask, 4)
    assert targets.tolist() == [1, 1, 0, 0] + [1, 1, 1, 1] + [1, 0, 1, 0]
    assert valid.tolist() == [True] * 4 + [False] * 4 + [True, False, True, True]


def test_bce_matches_hand_computed_value():
    # logits s/tau = [0, ln4, 0, ln4], targets [1, 1, 0, 0]:
    #   log 2 + log(1 + 1/4) + log 2 + log(1 + 4) = log(4 * 5/4 * 5) = log 25;  mean over 4 rows = ln(5)/2
    targets, valid = real_bce_targets(doubles([1, 1, -1, -1]), torch.ones(4, 1), 4)
    loss = real_bce_loss(doubles(HAND_SCORES), targets, valid, HAND_TAU)
    assert loss.item() == pytest.approx(math.log(5) / 2, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_bce_equals_torch_bce_with_logits_over_valid_rows(seed):
    num_groups, num_generations, tau = 6, 4, 0.5
    generator = torch.Generator().manual_seed(seed)
    advantages = torch.randint(0, 2, (num_groups * num_generations,), generator=generator).double() - 0.5
    lengths = torch.randint(0, 3, (num_groups * num_generations,), generator=generator)
    mask = (torch.arange(2)[None, :] < lengths[:, None]).double()
    scores = torch.randn(num_groups * num_generations, generator=generator, dtype=torch.float64)
    targets, valid = real_bce_targets(advantages, mask, num_generations)
    expected = F.binary_cross_entropy_with_logits(scores[valid] / tau, targets[valid])
    assert valid.any()
    assert real_bce_loss(scores, targets, valid, tau).item() == pytest.approx(expected.item(), rel=1e-12)


def test_bce_without_valid_rows_is_zero_with_zero_gradient():
    scores = doubles([0.3, -0.3]).requires_grad_(True)
    targets, valid = real_bce_targets(doubles([0.0, 0.0]), torch.ones(2, 1), 2)
    loss = real_bce_loss(scores, targets, valid, 0.5)
    (grad,) = torch.autograd.grad(loss, scores)
    assert loss.item() == 0.0 and (grad == 0).all()


# ---- metrics and errors -------------------------------------------------------------------------------------------


def test_group_metrics_hand_values_and_nan_when_undefined():
    positive, negative = bools("+-.", "++.")
    metrics = real_group_metrics(doubles([0.2, -0.6, 9.0, 0.4, 0.6, 9.0]), positive, negative, 3)
    assert metrics["score_mean_pos"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert metrics["score_mean_neg"] == pytest.approx(-0.6)
    assert metrics["valid_group_frac"] == pytest.approx(1 / 2)
    no_negative = real_group_metrics(doubles([0.1, 0.2]), *bools("++"), 2)
    assert math.isnan(no_negative["score_mean_neg"]) and no_negative["valid_group_frac"] == 0.0


def test_incomplete_groups_are_rejected():
    positive, negative = bools("+-+-+-")
    scores = torch.zeros(6)
    for call in (
        lambda: real_group_loss(scores, positive, negative, 4, 0.5),
        lambda: real_product_group_loss(scores, positive, negative, 4, 0.5),
        lambda: real_onpolicy_coefficients(positive, negative, 4, 0.5),
        lambda: real_group_metrics(scores, positive, negative, 4),
        lambda: real_bce_targets(scores, torch.ones(6, 1), 4),
    ):
        with pytest.raises(ValueError, match="num_generations=4"):
            call()


@pytest.mark.parametrize("tau", [0.0, -0.5])
def test_non_positive_tau_is_rejected(tau):
    positive, negative = bools("+-", "+-")
    scores = torch.zeros(4)
    for call in (
        lambda: real_group_loss(scores, positive, negative, 2, tau),
        lambda: real_product_group_loss(scores, positive, negative, 2, tau),
        lambda: real_onpolicy_coefficients(positive, negative, 2, tau),
        lambda: real_bce_loss(scores, scores, positive, tau),
    ):
        with pytest.raises(ValueError, match=f"tau={tau}"):
            call()


def test_mismatched_shapes_are_rejected():
    positive, negative = bools("+-+-")
    with pytest.raises(ValueError, match="negative"):
        real_group_loss(torch.zeros(4), positive, negative[:2], 2, 0.5)
    with pytest.raises(ValueError, match="mask"):
        real_labels(torch.zeros(4), torch.ones(3, 2))
    with pytest.raises(ValueError, match="scores"):
        real_bce_loss(torch.zeros(4, 1), torch.zeros(4), positive, 0.5)
