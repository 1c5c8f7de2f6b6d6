"""GTPO reference math (hf_ext.losses.gtpo) against hand-computed values, a per-position loop oracle and gradients."""

import math

import pytest
import torch

from hf_ext.losses import gtpo
from hf_ext.losses.gtpo import (
    conflict_runs,
    conflict_weights,
    entropy_filter,
    gtpo_metrics,
    mean_entropy,
    shaped_advantages,
)
from hf_ext.losses.surrogate import clipped_surrogate, row_mean_aggregate


EOS = 2  # the hand-built rows end with token 2, and padding is written with the same id
GARBAGE = 1e3


def batch(rows: list[list[int]], advantages: list[float], width: int | None = None, pad_id: int = EOS):
    """(completion_ids, completion_mask, advantages) from ragged rows, right-padded with ``pad_id``."""
    width = width or max(len(row) for row in rows) + 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask, torch.tensor(advantages, dtype=torch.float64)


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return out


def conflict_weights_loop(
    completion_ids,
    completion_mask,
    advantages,
    num_generations,
    conflict_weight=2.0,
    combine="product",
    sign_tolerance=1e-6,
):
    """Test oracle: the definition of spec 4.3 walked per row and per position in plain Python."""
    ids, mask, adv = completion_ids.tolist(), completion_mask.tolist(), advantages.tolist()
    width = completion_ids.shape[1]
    ends = [max((t + 1 for t in range(width) if mask[i][t] != 0), default=0) for i in range(len(ids))]
    signs = [(a > sign_tolerance) - (a < -sign_tolerance) if end > 0 else 0 for a, end in zip(adv, ends, strict=True)]

    def token(row, k, from_end):
        t = ends[row] - 1 - k if from_end else k
        return (t, ids[row][t]) if 0 <= t < width and mask[row][t] != 0 else (t, None)

    def run(i, from_end):
        first = i - i % num_generations
        members, positions = range(first, first + num_generations), set()
        for k in range(width):
            t, own = token(i, k, from_end)
            if own is None or not {1, -1} <= {signs[j] for j in members if token(j, k, from_end)[1] == own}:
                break
            positions.add(t)
        return positions

    weights = []
    for i in range(len(ids)):
        row = [float(m) for m in mask[i]]
        if signs[i] != 0:
            run_weight = conflict_weight if signs[i] > 0 else 0.0
            prefix, suffix = run(i, False), run(i, True)
            for t in range(width):
                if combine == "product":
                    factor = (run_weight if t in prefix else 1.0) * (run_weight if t in suffix else 1.0)
                else:
                    factor = run_weight if t in prefix | suffix else 1.0
                row[t] = factor * mask[i][t]
        weights.append(row)
    return torch.tensor(weights, dtype=torch.float64).reshape(completion_ids.shape)


def both_implementations(ids, mask, advantages, num_generations, **kwargs):
    vectorised = conflict_weights(ids, mask, advantages, num_generations, **kwargs)
    loop = conflict_weights_loop(ids, mask, advantages, num_generations, **kwargs)
    return vectorised, loop


# One positive and two negative rows.
HAND_ROWS = [[7, 8, 9, 1, 2], [7, 8, 5, 1, 2], [7, 6, 9, 3, 1, 2]]
HAND_ADVANTAGES = [1.0, -0.5, -0.5]
HAND_LAMBDA = {
    "product": [[2, 2, 2, 4, 4], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0]],
    "union": [[2, 2, 2, 2, 2], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0]],
}


@pytest.mark.parametrize("combine", ["product", "union"])
def test_hand_group_lambda_matches_spec(combine):
    ids, mask, advantages = batch(HAND_ROWS, HAND_ADVANTAGES, width=8)
    vectorised, loop = both_implementations(ids, mask, advantages, 3, combine=combine)
    expected = padded(HAND_LAMBDA[combine], 8)
    torch.testing.assert_close(vectorised, expected, rtol=0, atol=0)
    torch.testing.assert_close(loop, expected, rtol=0, atol=0)


# Each case: rows, advantages, expected lambda (product, W = 2), computed by hand.
RUN_CASES = {
    # token 9 at position 2 is shared by both rows but comes after the first mismatch: weight 1
    "prefix_run_breaks_at_first_mismatch": ([[5, 1, 9, 4], [5, 3, 9, 6]], [1.0, -1.0], [[2, 1, 1, 1], [0, 1, 1, 1]]),
    "start_only": ([[3, 4, 5], [3, 4, 6]], [1.0, -1.0], [[2, 2, 1], [0, 0, 1]]),
    "end_only": ([[1, 4, 9], [3, 4, 9]], [1.0, -1.0], [[1, 2, 2], [1, 0, 0]]),
    # suffix positions are counted from each row's own end, so rows of different lengths still align
    "end_only_different_lengths": ([[1, 8, 9], [5, 3, 8, 9]], [1.0, -1.0], [[1, 2, 2], [1, 1, 0, 0]]),
    "both_ends": ([[3, 1, 9], [3, 4, 9]], [1.0, -1.0], [[2, 1, 2], [0, 1, 0]]),
    "none": ([[1, 3, 5], [4, 5, 6]], [1.0, -1.0], [[1, 1, 1], [1, 1, 1]]),
    "identical_rows_are_in_both_runs": ([[6, 5], [6, 5]], [1.0, -1.0], [[4, 4], [0, 0]]),
    "length_one_rows": ([[7], [7]], [0.5, -0.5], [[4], [0]]),
    # partners may change per position: token 8 is shared with N1 only, token 9 with N2 only
    "per_position_union_of_partners": (
        [[7, 8, 9, 1], [7, 8, 4, 5], [7, 3, 9, 6]],
        [1.0, -1.0, -1.0],
        [[2, 2, 2, 1], [0, 0, 1, 1], [0, 1, 1, 1]],
    ),
    "one_sign_only_has_no_conflicts": ([[1, 3, 5], [1, 3, 5]], [1.0, 2.0], [[1, 1, 1], [1, 1, 1]]),
    # ties are neither partners nor weighted: the tie row matches both others but changes nothing
    "zero_advantage_rows": ([[4, 5], [4, 5], [6, 4]], [1.0, 0.0, -1.0], [[1, 1], [1, 1], [1, 1]]),
    "tie_residue_is_zero": ([[4, 5], [4, 5]], [1.0, -3e-17], [[1, 1], [1, 1]]),
}


@pytest.mark.parametrize("case", RUN_CASES, ids=list(RUN_CASES))
def test_conflict_runs_hand_cases(case):
    rows, advantages, expected = RUN_CASES[case]
    ids, mask, advantages = batch(rows, advantages, width=6)
    vectorised, loop = both_implementations(ids, mask, advantages, len(rows))
    torch.testing.assert_close(vectorised, padded(expected, 6), rtol=0, atol=0)
    torch.testing.assert_close(loop, padded(expected, 6), rtol=0, atol=0)


def test_padding_ids_never_matter_even_when_pad_equals_eos():
    # With pad == eos, treating ids != pad as validity would drop every real eos; treating padding as tokens
    # would shift the suffix alignment. Lambda must only depend on the mask.
    rows, advantages = [[4, 2], [4, 3, 2], [5, 2]], [1.0, -1.0, -1.0]
    expected = padded([[2, 4], [0, 1, 0], [1, 0]], 5)
    for pad_id in (EOS, 0, 4, 3):
        ids, mask, adv = batch(rows, advantages, width=5, pad_id=pad_id)
        torch.testing.assert_close(conflict_weights(ids, mask, adv, 3), expected, rtol=0, atol=0)
    ids[:, 3:] = torch.randint(0, 6, (3, 2))
    torch.testing.assert_close(conflict_weights(ids, mask, adv, 3), expected, rtol=0, atol=0)


def test_masked_truncated_rows_are_not_partners():
    ids, mask, advantages = batch([[4, 5, 6], [4, 5, 6]], [1.0, -1.0])
    torch.testing.assert_close(conflict_weights(ids, mask, advantages, 2), padded([[4, 4, 4], [0, 0, 0]], 4))
    mask[1] = 0  # mask_truncated_completions: same ids, but the negative row no longer counts
    torch.testing.assert_close(conflict_weights(ids, mask, advantages, 2), padded([[1, 1, 1], []], 4))


def test_zero_weight_skips_conflicts_of_positive_rows_too():
    ids, mask, advantages = batch(HAND_ROWS, HAND_ADVANTAGES)
    weights = conflict_weights(ids, mask, advantages, 3, conflict_weight=0.0)
    assert weights[0, :5].tolist() == [0.0] * 5
    assert conflict_weights(ids, mask, advantages, 3, conflict_weight=1.0)[0, :5].tolist() == [1.0] * 5


def random_groups(num_groups, num_generations, width, seed, holes=False):
    """Small vocabulary (many conflicts), pad == eos, empty rows, ties and tie residues."""
    generator = torch.Generator().manual_seed(seed)
    rows = num_groups * num_generations
    ids = torch.randint(0, 3, (rows, width), generator=generator)
    lengths = torch.randint(0, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    if holes:
        mask = mask * (torch.rand(rows, width, generator=generator) > 0.1)
    ids = torch.where(mask.bool(), ids, EOS)
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    draw = torch.rand(rows, generator=generator)
    advantages[draw < 0.15] = 0.0
    advantages[(draw >= 0.15) & (draw < 0.2)] = -1e-9
    return ids, mask, advantages


@pytest.mark.parametrize("combine", ["product", "union"])
@pytest.mark.parametrize("holes", [False, True], ids=["right_padded", "mask_holes"])
@pytest.mark.parametrize("num_generations", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", range(3))
def test_vectorised_equals_loop_oracle_on_random_groups(seed, num_generations, holes, combine):
    ids, mask, advantages = random_groups(4, num_generations, 7, seed, holes)
    vectorised, loop = both_implementations(
        ids, mask, advantages, num_generations, combine=combine, conflict_weight=3.0
    )
    torch.testing.assert_close(vectorised, loop, rtol=0, atol=0)


def test_random_groups_do_have_conflicts():
    """Guards the oracle comparison against a vacuous pass (no conflicts at all)."""
    ids, mask, advantages = random_groups(4, 8, 7, 0)
    prefix, suffix = conflict_runs(ids, mask, advantages, 8)
    assert prefix.sum() > 5 and suffix.sum() > 5
    weights = conflict_weights(ids, mask, advantages, 8)
    assert {0.0, 2.0, 4.0} <= set(weights[mask.bool()].tolist())


def test_chunking_and_batch_composition_do_not_change_lambda(monkeypatch):
    ids, mask, advantages = random_groups(5, 4, 6, 7)
    whole = conflict_weights(ids, mask, advantages, 4)
    per_group = torch.cat(
        [conflict_weights(ids[i : i + 4], mask[i : i + 4], advantages[i : i + 4], 4) for i in range(0, 20, 4)]
    )
    monkeypatch.setattr(gtpo, "PAIR_BUDGET", 1)  # one group per chunk
    torch.testing.assert_close(conflict_weights(ids, mask, advantages, 4), whole, rtol=0, atol=0)
    torch.testing.assert_close(per_group, whole, rtol=0, atol=0)


def test_conflict_weights_reject_bad_arguments():
    ids, mask, advantages = batch(HAND_ROWS, HAND_ADVANTAGES)
    with pytest.raises(ValueError, match="combine='sum'"):
        conflict_weights(ids, mask, advantages, 3, combine="sum")
    with pytest.raises(ValueError, match="conflict_weight=-1"):
        conflict_weights(ids, mask, advantages, 3, conflict_weight=-1.0)
    with pytest.raises(ValueError, match="conflict_weight=nan"):
        conflict_weights(ids, mask, advantages, 3, conflict_weight=float("nan"))
    with pytest.raises(ValueError, match="num_generations=2"):
        conflict_weights(ids, mask, advantages, 2)
    with pytest.raises(ValueError, match="completion_mask"):
        conflict_weights(ids, mask[:, :-1], advantages, 3)


def test_mean_entropy_is_a_detached_masked_row_mean():
    entropies = torch.tensor([[0.5, 1.5, float("nan")], [9.0, 9.0, 9.0], [0.2, 0.4, 0.9]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    hbar = mean_entropy(entropies, mask)
    torch.testing.assert_close(hbar, torch.tensor([1.0, 0.0, 0.5]))
    assert not hbar.requires_grad


LN2 = math.log(2)


def test_entropy_filter_switches_rows_off_and_on():
    advantages = torch.tensor([1.0, -1.0, 0.0, 1.0])
    hbar = torch.tensor([0.9, 0.9, 0.9, LN2])  # the last row sits on the threshold: kept
    assert entropy_filter(advantages, hbar).tolist() == [True, True, True, False]
    assert entropy_filter(advantages, hbar, filter_on=False).tolist() == [False] * 4
    assert entropy_filter(advantages, hbar, threshold=1.0).tolist() == [False] * 4
    assert entropy_filter(advantages, hbar, only_negative=True).tolist() == [False, True, False, False]
    shaped = shaped_advantages(advantages, hbar, entropy_penalty=0.0)
    assert shaped.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert shaped_advantages(advantages, hbar, entropy_penalty=0.0, filter_on=False).tolist() == [1.0, -1.0, 0.0, 1.0]


def test_shaping_hand_values_with_sign_flip_and_ties():
    advantages = torch.tensor([1.0, 0.05, 0.0, -1.0], dtype=torch.float64)
    hbar = torch.tensor([0.5, 0.6, 0.4, 0.3], dtype=torch.float64)
    shaped = shaped_advantages(advantages, hbar, entropy_penalty=0.1)
    torch.testing.assert_close(shaped, torch.tensor([0.95, -0.01, -0.04, -1.03], dtype=torch.float64))
    no_tie_shaping = shaped_advantages(advantages, hbar, entropy_penalty=0.1, shape_zero_advantage=False)
    torch.testing.assert_close(no_tie_shaping, torch.tensor([0.95, -0.01, 0.0, -1.03], dtype=torch.float64))


def test_sign_flip_keeps_positive_conflict_weight():
    # A = 0.05 > 0 gives the row weight 2 on its shared first token; shaping turns A' negative (0.05 - 0.1 * 0.6),
    # so the conflict token is pushed down twice as hard: A_tok = 2 * (-0.01).
    ids, mask, advantages = batch([[4, 5, 6], [4, 7, 8]], [0.05, -1.0])
    weights = conflict_weights(ids, mask, advantages, 2)
    shaped = shaped_advantages(advantages, torch.tensor([0.6, 0.3], dtype=torch.float64), filter_on=False)
    token_advantages = shaped[:, None] * weights
    torch.testing.assert_close(token_advantages[0], torch.tensor([-0.02, -0.01, -0.01, 0.0], dtype=torch.float64))


def surrogate_gradient(token_advantages, mask, old_logps=None, logps=None, epsilon=0.2):
    logps = torch.zeros(mask.shape, dtype=torch.float64) if logps is None else logps
    logps.requires_grad_(True)
    old = None if old_logps is None else old_logps
    per_token_loss, _ = clipped_surrogate(logps, old, token_advantages, mask, epsilon, epsilon)
    loss = row_mean_aggregate(per_token_loss, mask)
    return loss, torch.autograd.grad(loss, logps)[0]


def test_gradient_at_ratio_one_is_minus_shaped_advantage_times_lambda_over_rows_and_length():
    ids, mask, advantages = batch(HAND_ROWS, HAND_ADVANTAGES, width=7)
    weights = conflict_weights(ids, mask, advantages, 3)
    hbar = torch.tensor([0.3, 0.9, 0.2], dtype=torch.float64)  # row 1 is filtered out (0.9 > ln 2)
    shaped = shaped_advantages(advantages, hbar)  # [0.97, 0, -0.52]
    _, grad = surrogate_gradient(shaped[:, None] * weights, mask)
    lengths = mask.sum(-1, keepdim=True)
    torch.testing.assert_close(grad, -shaped[:, None] * weights / (3 * lengths))
    assert grad[0, 3].item() == pytest.approx(-0.97 * 4 / 15)
    assert grad[2, 1].item() == pytest.approx(0.52 / 18)
    assert grad[1].abs().sum().item() == 0.0 and grad[:, 6].abs().sum().item() == 0.0
    _, unfiltered = surrogate_gradient(shaped_advantages(advantages, hbar, filter_on=False)[:, None] * weights, mask)
    assert unfiltered[1, 2].item() == pytest.approx((0.5 + 0.09) / 15)  # A' = -0.59, lambda 1, |o| = 5


def test_degenerate_group_pushes_down_in_proportion_to_entropy():
    ids, mask, advantages = batch([[4, 5], [4, 6, 7]], [0.0, 0.0])
    weights = conflict_weights(ids, mask, advantages, 2)
    torch.testing.assert_close(weights, mask.double())
    hbar = torch.tensor([0.2, 0.6], dtype=torch.float64)
    _, grad = surrogate_gradient(shaped_advantages(advantages, hbar)[:, None] * weights, mask)
    torch.testing.assert_close(grad, 0.1 * hbar[:, None] * mask / (2 * mask.sum(-1, keepdim=True)))
    silent = shaped_advantages(advantages, hbar, shape_zero_advantage=False)
    assert surrogate_gradient(silent[:, None] * weights, mask)[1].abs().sum().item() == 0.0


def test_clipping_stops_gradient_only_on_the_side_the_advantage_favours():
    mask = torch.ones(2, 1)
    token_advantages = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    logps = torch.full((2, 1), math.log(1.5), dtype=torch.float64)
    loss, grad = surrogate_gradient(token_advantages, mask, torch.zeros(2, 1, dtype=torch.float64), logps)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)  # -min(1.5, 1.2) and -min(-1.5, -1.2)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [0.75]], dtype=torch.float64))


def test_aggregate_is_mean_of_row_token_means_with_empty_rows_counted():
    per_token_loss = torch.tensor([[1.0, 3.0, GARBAGE], [GARBAGE] * 3, [6.0, GARBAGE, GARBAGE]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert row_mean_aggregate(per_token_loss, mask).item() == pytest.approx((2.0 + 0.0 + 6.0) / 3)


def test_metrics_hand_values():
    rows = HAND_ROWS + [[1, 2], [1, 2], []]  # a second group of ties, one of them empty
    ids, mask, advantages = batch(rows, HAND_ADVANTAGES + [0.0, 0.0, 0.0])
    weights = conflict_weights(ids, mask, advantages, 3)
    filtered = torch.tensor([False, True, False, False, False, False])
    metrics = gtpo_metrics(weights, mask, advantages, filtered)
    assert metrics["conflict_token_frac"] == pytest.approx(12 / 20)
    assert metrics["conflict_token_frac_pos"] == pytest.approx(1.0)
    assert metrics["conflict_token_frac_neg"] == pytest.approx(7 / 11)
    assert metrics["filtered_frac"] == pytest.approx(1 / 6)
    no_negatives = gtpo_metrics(weights[3:], mask[3:], advantages[3:], filtered[3:])
    assert no_negatives["conflict_token_frac"] == 0.0 and math.isnan(no_negatives["conflict_token_frac_neg"])
