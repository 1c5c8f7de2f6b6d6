"""Balanced Aggregation (BA) of GRPO token losses — Zeng et al., arXiv 2605.04077.

Within each group of G completions of one prompt, split the rows by the sign of their advantage,
S+ = {i : A_i > tol} and S- = {i : A_i < -tol}, with n_s rows and L_s loss tokens each. Then

    L_BA(q) = (n+/G) * (1/L+) * sum_{i in S+} sum_t l_{i,t}  +  (n-/G) * (1/L-) * sum_{i in S-} sum_t l_{i,t}

a token mean inside each sign subset, the two subsets weighted by their share of the group (an empty subset's
term is dropped). The batch loss is the mean of L_BA over groups. Equivalently, per row,

    L_BA(q) = (1/G) * sum_{i in S+ or S-} (1/Lbar_{s(i)}) * sum_t l_{i,t},     Lbar_s = L_s / n_s,

i.e. TRL's ``grpo`` aggregation with each row's own length replaced by the mean length of its same-sign
peers. Rows with no loss tokens or with |A_i| <= tol belong to no subset: weight 0, but G still counts them.

Pure torch, no TRL import: ``balanced_aggregation`` is the group-wise formula (the test oracle),
``ba_row_weights`` + ``ba_aggregate`` the per-row form the trainer uses, ``ba_group_metrics`` what it logs.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SignSplit:
    """Per-group sign subsets. Shapes: masks (Q, G), counts and token totals (Q,)."""

    positive: torch.Tensor
    negative: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_pos(self) -> torch.Tensor:
        return self.positive.sum(1)

    @property
    def num_neg(self) -> torch.Tensor:
        return self.negative.sum(1)

    @property
    def tokens_pos(self) -> torch.Tensor:
        return (self.lengths * self.positive).sum(1)

    @property
    def tokens_neg(self) -> torch.Tensor:
        return (self.lengths * self.negative).sum(1)


def split_by_sign(lengths: torch.Tensor, advantages: torch.Tensor, num_generations: int, sign_tolerance: float):
    """Group the rows into (Q, G) and mark each row's sign subset: S+ = {A_i > tol}, S- = {A_i < -tol}.

    Rows with no loss tokens (length 0) belong to neither subset.

    Args:
        lengths: (N,) int or float, loss-token count of each row; N must be a multiple of G.
        advantages: (N,) float, the advantage A_i of each row.
        num_generations: G, the group size; rows are grouped consecutively in runs of G.
        sign_tolerance: tol, |A_i| <= tol counts as no sign.

    Returns:
        ``SignSplit`` with bool masks ``positive``, ``negative`` (Q, G) and the float64 ``lengths`` (Q, G).

    Raises:
        ValueError: if ``lengths`` and ``advantages`` are not equal-shaped 1-D tensors, or N is not a multiple of G.
    """
    if lengths.shape != advantages.shape or lengths.dim() != 1:
        raise ValueError(f"lengths {tuple(lengths.shape)} and advantages {tuple(advantages.shape)} must be equal 1-D")
    if lengths.numel() % num_generations != 0:
        raise ValueError(f"{lengths.numel()} rows do not split into groups of num_generations={num_generations}")
    lengths = lengths.double().view(-1, num_generations)
    advantages = advantages.double().view(-1, num_generations)
    alive = lengths > 0
    return SignSplit(
        positive=(advantages > sign_tolerance) & alive,
        negative=(advantages < -sign_tolerance) & alive,
        lengths=lengths,
    )


def ba_row_weights(
    lengths: torch.Tensor, advantages: torch.Tensor, num_generations: int, sign_tolerance: float = 1e-6
) -> torch.Tensor:
    """Per-row BA weight 1/Lbar_s = n_s / L_s of the row's same-sign subset in its group; 0 outside S+ and S-.

    Args:
        lengths: (N,) int or float, loss-token count of each row.
        advantages: (N,) float, the advantage A_i of each row.
        num_generations: G; rows are grouped consecutively in runs of G.
        sign_tolerance: tol, |A_i| <= tol counts as no sign (weight 0).

    Returns:
        (N,) float64 row weights, for ``ba_aggregate``.

    Raises:
        ValueError: as ``split_by_sign`` (unequal or non-1-D inputs, N not a multiple of G).
    """
    split = split_by_sign(lengths, advantages, num_generations, sign_tolerance)
    inv_mean_pos = split.num_pos / split.tokens_pos.clamp(min=1)
    inv_mean_neg = split.num_neg / split.tokens_neg.clamp(min=1)
    weights = torch.where(split.positive, inv_mean_pos[:, None], 0.0) + torch.where(
        split.negative, inv_mean_neg[:, None], 0.0
    )
    return weights.flatten()


def ba_aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Per-row form of BA: (1/N) * sum_i w_i * sum_t m_{i,t} * l_{i,t}.

    With ``row_weights`` from ``ba_row_weights`` over whole groups this equals ``balanced_aggregation``.

    Args:
        per_token_loss: (N, T) float, the token losses l.
        mask: (N, T) 0/1 (bool, int or float), the loss tokens m.
        row_weights: (N,) float, the weights w (cast to the dtype of the masked row sums).

    Returns:
        0-d float tensor, the dtype of ``per_token_loss * mask``.
    """
    row_sums = (per_token_loss * mask).sum(-1)
    return (row_sums * row_weights.to(row_sums.dtype)).mean()


def balanced_aggregation(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    num_generations: int,
    sign_tolerance: float = 1e-6,
) -> torch.Tensor:
    """Group-wise BA of the paper: mean over groups of (n+/G)/L+ * sum_{S+} + (n-/G)/L- * sum_{S-} (test oracle).

    An empty subset's term is dropped; a group with neither subset contributes 0 but counts in the mean.

    Args:
        per_token_loss: (N, T) float, the token losses l_{i,t}.
        mask: (N, T) 0/1 (bool, int or float), the loss tokens; its row sums are the lengths.
        advantages: (N,) float, the advantage A_i of each row.
        num_generations: G; rows are grouped consecutively in runs of G.
        sign_tolerance: tol, |A_i| <= tol counts as no sign.

    Returns:
        0-d float tensor, the dtype of ``per_token_loss * mask``.

    Raises:
        ValueError: if ``mask`` is not 2-D with one row per entry of ``advantages``, or N is not a multiple of G.
    """
    lengths = mask.sum(-1)
    split = split_by_sign(lengths, advantages, num_generations, sign_tolerance)
    row_sums = (per_token_loss * mask).sum(-1).view(-1, num_generations)
    group_loss = row_sums.new_zeros(row_sums.shape[0])
    for subset, count, tokens in (
        (split.positive, split.num_pos, split.tokens_pos),
        (split.negative, split.num_neg, split.tokens_neg),
    ):
        weight = torch.where(count > 0, count / (num_generations * tokens.clamp(min=1)), 0.0)
        group_loss = group_loss + weight.to(row_sums.dtype) * (row_sums * subset).sum(1)
    return group_loss.mean()


def ba_group_metrics(
    lengths: torch.Tensor, advantages: torch.Tensor, num_generations: int, sign_tolerance: float = 1e-6
) -> dict[str, float]:
    """Diagnostics over one generation batch, with one device sync.

    Args:
        lengths: (N,) int or float, loss-token count of each row.
        advantages: (N,) float, the advantage A_i of each row.
        num_generations: G; rows are grouped consecutively in runs of G.
        sign_tolerance: tol, |A_i| <= tol counts as no sign.

    Returns:
        dict of Python floats. ``pos_weight``/``neg_weight``: mean n+/G and n-/G over groups with both signs (the
        weight BA gives each sign); ``token_agg_pos_share``: mean L+/(L+ + L-) over the same groups (what token
        aggregation would give); ``len_gap``: mean (Lbar+ - Lbar-) over them; these four are NaN when no group
        has both signs. ``no_signal_frac``: share of groups with no row in S+ or S-.

    Raises:
        ValueError: as ``split_by_sign`` (unequal or non-1-D inputs, N not a multiple of G).
    """
    split = split_by_sign(lengths, advantages, num_generations, sign_tolerance)
    mixed = ((split.num_pos > 0) & (split.num_neg > 0)).double()
    silent = ((split.num_pos == 0) & (split.num_neg == 0)).double()
    mean_pos = split.tokens_pos / split.num_pos.clamp(min=1)
    mean_neg = split.tokens_neg / split.num_neg.clamp(min=1)
    per_group = torch.stack(
        [
            split.num_pos / num_generations,
            split.num_neg / num_generations,
            split.tokens_pos / (split.tokens_pos + split.tokens_neg).clamp(min=1),
            mean_pos - mean_neg,
        ]
    )
    over_mixed = (per_group * mixed).sum(1) / mixed.sum()  # 0/0 = NaN when no group has both signs
    values = torch.cat([over_mixed, silent.mean()[None]]).tolist()  # one device sync
    names = ("pos_weight", "neg_weight", "token_agg_pos_share", "len_gap", "no_signal_frac")
    return dict(zip(names, values, strict=True))
