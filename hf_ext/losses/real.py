"""REAL, Rewards as Labels: RLVR as classification of rollouts — Zhai et al., arXiv 2602.05630.

Each completion gets a sequence score, its mean log-ratio to the behaviour (old) policy over loss tokens,

    s_i = (1/|o_i|) * sum_t ( logp_theta(o_{i,t}) - logp_old(o_{i,t}) ),

and rewards are used as class labels, not weights: positives O+ and negatives O- of one group (here by the sign
of the advantage, which equals r = 1 / r = 0 for binary rewards in a mixed group). Per group (equation (8)),

    L_REAL(q) = log(1 + sum_{i in O+} exp(-s_i/tau)) + log(1 + sum_{j in O-} exp(s_j/tau)),

two cross-entropies against an anchor class of fixed logit 0 (the old policy, s = 0): positives are pushed above
it, negatives below it. A group needs both a positive and a negative; other groups contribute 0 but count in
the mean over groups. The gradient weight of a row is monotone in s_k and bounded by 1/tau:

    |dL/ds_k| = (1/tau) / (1 + C+ e^{ s_k/tau})  (positive),   (1/tau) / (1 + C- e^{-s_k/tau})  (negative),

with C± = 1 + the sum over the row's same-label peers, so at s = 0 it is 1/(tau(1+n+)) and 1/(tau(1+n-)).

Variants from the official code: ``product`` (anchor-free pairwise ranking),
log(1 + sum_{i in O+, j in O-} e^{(s_j - s_i)/tau}), and ``bce``, where each row is classified alone:
BCE-with-logits(s_i/tau, [A_i is the group's best]), averaged over rows of groups whose advantages differ.

Pure torch, no TRL import. Rows are grouped consecutively in runs of ``num_generations``. ``real_group_loss`` is
the group-aligned form (every group whole in one tensor), ``real_onpolicy_coefficients`` the per-row constants
whose surrogate has the exact REAL gradient at s = 0 under any row layout, ``real_group_metrics`` what is logged.
"""

import torch
import torch.nn.functional as F


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau={tau} must be > 0 (REAL divides the sequence scores by it; the paper uses 0.5)")


def _check_groups(num_rows: int, num_generations: int) -> None:
    if num_generations < 1 or num_rows % num_generations != 0:
        raise ValueError(
            f"{num_rows} rows do not split into groups of num_generations={num_generations}; "
            "REAL needs whole groups, stored consecutively"
        )


def _check_rows(name: str, tensor: torch.Tensor, num_rows: int) -> None:
    if tensor.shape != (num_rows,):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected one value per row: ({num_rows},)")


def _check_vector(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 1:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected one value per row: (N,)")


def _check_labels(scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, num_generations: int):
    _check_vector("scores", scores)
    _check_rows("positive", positive, scores.numel())
    _check_rows("negative", negative, scores.numel())
    _check_groups(scores.numel(), num_generations)


def _has_tokens(mask: torch.Tensor, num_rows: int) -> torch.Tensor:
    if mask.dim() != 2 or mask.shape[0] != num_rows:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the (N, T) loss-token mask with N={num_rows}")
    return mask.sum(-1) > 0


def sequence_scores(
    per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """s_i = (1/|o_i|) * sum_t (logp - logp_old), the masked mean log-ratio of each row; 0 for rows without tokens.

    Args:
        per_token_logps: (N, T) float, log pi_theta of each completion token (differentiable).
        old_per_token_logps: (N, T) float, log pi_old of the same tokens; None means on-policy (old = current,
            detached): s = 0 in value, with the gradient of the masked mean logp.
        mask: (N, T) 0/1 (bool, int or float), the loss tokens.

    Returns:
        (N,) float, the dtype of ``per_token_logps``. Rows need not form whole groups.
    """
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    mask = mask.to(per_token_logps.dtype)
    log_ratio = (per_token_logps - old_per_token_logps) * mask
    return log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)


def real_labels(
    advantages: torch.Tensor, mask: torch.Tensor, sign_tolerance: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """("advantage" label mode) positive iff A_i > tol, negative iff A_i < -tol; rows without loss tokens are neither.

    Args:
        advantages: (N,) float, the advantage A_i of each row.
        mask: (N, T) 0/1 (bool, int or float), the loss tokens.
        sign_tolerance: tol; rows with |A_i| <= tol get neither label.

    Returns:
        ``(positive, negative)``: two bool (N,) tensors, the labels O+ and O-.

    Raises:
        ValueError: if ``advantages`` is not 1-D or ``mask`` is not (N, T) with the same N.
    """
    _check_vector("advantages", advantages)
    has_tokens = _has_tokens(mask, advantages.numel())
    return (advantages > sign_tolerance) & has_tokens, (advantages < -sign_tolerance) & has_tokens


def real_binary_labels(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """("binary" label mode, the official code's) positive iff r_i == 1, negative iff r_i == 0; rows without loss
    tokens are neither.

    Args:
        rewards: (N,) float, each row's reward (the weighted sum over reward functions), each 0 or 1.
        mask: (N, T) 0/1 (bool, int or float), the loss tokens.

    Returns:
        ``(positive, negative)``: two bool (N,) tensors, the labels O+ and O-.

    Raises:
        ValueError: if a reward is neither 0 nor 1 (naming the first such row), or the shapes disagree.
    """
    _check_vector("rewards", rewards)
    has_tokens = _has_tokens(mask, rewards.numel())
    other = ((rewards != 0) & (rewards != 1)).nonzero()
    if len(other):
        row = other[0].item()
        raise ValueError(
            f"real_label_mode='binary' labels completions by rewards of exactly 0 or 1, but completion {row} of the "
            f"generation batch has reward {rewards[row].item()!r} ({len(other)} such): use real_label_mode="
            "'advantage' (labels by the sign of the advantage), which takes any reward."
        )
    return (rewards == 1) & has_tokens, (rewards == 0) & has_tokens


def _grouped_logits(scores, positive, negative, num_generations, tau):
    """(S, P, N, valid): scores / tau and the labels as (Q, G), and which groups hold both labels (Q,)."""
    _check_labels(scores, positive, negative, num_generations)
    _check_tau(tau)
    logits = scores.view(-1, num_generations) / tau
    positive = positive.view(-1, num_generations)
    negative = negative.view(-1, num_generations)
    return logits, positive, negative, positive.any(1) & negative.any(1)


def real_group_loss(
    scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, num_generations: int, tau: float
) -> torch.Tensor:
    """Mean over groups of L_REAL(q) = log(1 + sum_{O+} e^{-s_i/tau}) + log(1 + sum_{O-} e^{s_j/tau}).

    Computed as L+ + L-, L+ = logsumexp({-s_i/tau : i in O+} ∪ {0}), L- = logsumexp({s_j/tau : j in O-} ∪ {0}).
    A group without both labels gives 0 but counts in the mean; every group is whole and contiguous in ``scores``.

    Args:
        scores: (N,) float, the sequence scores s (``sequence_scores``).
        positive, negative: (N,) bool, the labels O+ and O- (``real_labels``).
        num_generations: G; rows are grouped consecutively in runs of G.
        tau: the score temperature, > 0.

    Returns:
        0-d float tensor, the dtype of ``scores``.

    Raises:
        ValueError: if ``scores`` is not 1-D, a label is not (N,), N is not a multiple of G (or G < 1), or tau <= 0.
    """
    logits, positive, negative, valid = _grouped_logits(scores, positive, negative, num_generations, tau)
    anchor = logits.new_zeros(logits.shape[0], 1)
    loss_pos = torch.cat([logits.neg().masked_fill(~positive, -torch.inf), anchor], dim=1).logsumexp(1)
    loss_neg = torch.cat([logits.masked_fill(~negative, -torch.inf), anchor], dim=1).logsumexp(1)
    return torch.where(valid, loss_pos + loss_neg, 0.0).mean()


def real_product_group_loss(
    scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, num_generations: int, tau: float
) -> torch.Tensor:
    """Anchor-free pairwise variant: mean over groups of softplus(logsumexp_{O-}(s/tau) + logsumexp_{O+}(-s/tau)).

    That is log(1 + sum_{i in O+, j in O-} e^{(s_j - s_i)/tau}); a group without both labels gives 0 (with a finite
    gradient) but counts in the mean.

    Args:
        scores: (N,) float, the sequence scores s.
        positive, negative: (N,) bool, the labels O+ and O-.
        num_generations: G; rows are grouped consecutively in runs of G.
        tau: the score temperature, > 0.

    Returns:
        0-d float tensor, the dtype of ``scores``.

    Raises:
        ValueError: if ``scores`` is not 1-D, a label is not (N,), N is not a multiple of G (or G < 1), or tau <= 0.
    """
    logits, positive, negative, valid = _grouped_logits(scores, positive, negative, num_generations, tau)
    # Invalid groups get finite dummy logits: an all -inf logsumexp has a NaN gradient that torch.where would not stop.
    keep_pos = positive | ~valid[:, None]
    keep_neg = negative | ~valid[:, None]
    lse_pos = logits.neg().masked_fill(~keep_pos, -torch.inf).logsumexp(1)
    lse_neg = logits.masked_fill(~keep_neg, -torch.inf).logsumexp(1)
    return torch.where(valid, F.softplus(lse_pos + lse_neg), 0.0).mean()


REAL_VARIANTS = {"anchor": real_group_loss, "product": real_product_group_loss}


def real_onpolicy_coefficients(
    positive: torch.Tensor, negative: torch.Tensor, num_generations: int, tau: float, variant: str = "anchor"
) -> torch.Tensor:
    """dL/ds_k at s = 0 times the number of groups, per row: (N,) float64, for L the ``variant``'s group loss.

    For ``"anchor"`` this is -1/(tau(1+n+)) for positives and +1/(tau(1+n-)) for negatives (n± the label counts of
    the row's group), 0 for other rows and for groups without both labels. When every s = 0 (theta unchanged since
    generation), ``(coef * s).sum() / num_groups`` has exactly the gradient of the group loss for any layout of the
    rows: the coefficients are constants, so the surrogate is separable and can be split over micro-batches and
    processes (its value is 0).

    Args:
        positive, negative: (N,) bool labels, rows grouped consecutively in runs of ``num_generations``.
        num_generations: G, the group size.
        tau: the score temperature, > 0.
        variant: a key of ``REAL_VARIANTS``: ``"anchor"`` (``real_group_loss``, default) or ``"product"``.

    Returns:
        (N,) float64 constants (no autograd graph).

    Raises:
        ValueError: if ``positive`` is not 1-D, ``negative`` is not (N,), N is not a multiple of G, or tau <= 0.
        KeyError: if ``variant`` is not a key of ``REAL_VARIANTS``.
    """
    _check_vector("positive", positive)
    scores = torch.zeros(positive.shape, dtype=torch.float64, device=positive.device, requires_grad=True)
    group_loss = REAL_VARIANTS[variant](scores, positive, negative, num_generations, tau)
    (coef,) = torch.autograd.grad(group_loss * (positive.numel() // num_generations), scores)
    return coef


def real_bce_targets(
    advantages: torch.Tensor, mask: torch.Tensor, num_generations: int, sign_tolerance: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE labels: y_i = 1 iff A_i >= (max of A over its group) - tol, else 0; valid iff the group's A spread.

    A row is valid iff its group's advantages spread by more than tol (max - min) and it has loss tokens. The group
    max/min run over all rows of the group, masked ones included (advantages do not depend on the mask).

    Args:
        advantages: (N,) float, the advantage A_i of each row.
        mask: (N, T) 0/1 (bool, int or float), the loss tokens.
        num_generations: G; rows are grouped consecutively in runs of G.
        sign_tolerance: tol, used by both the best-row and the spread test.

    Returns:
        ``(targets, valid)``: targets (N,) 1.0/0.0 in the dtype of ``advantages``, valid (N,) bool.

    Raises:
        ValueError: if ``advantages`` is not 1-D, ``mask`` is not (N, T) with the same N, or N is not a multiple of G.
    """
    _check_vector("advantages", advantages)
    has_tokens = _has_tokens(mask, advantages.numel())
    _check_groups(advantages.numel(), num_generations)
    grouped = advantages.view(-1, num_generations)
    best, worst = grouped.max(1, keepdim=True).values, grouped.min(1, keepdim=True).values
    targets = (grouped >= best - sign_tolerance).to(advantages.dtype).flatten()
    valid = (best - worst > sign_tolerance).expand_as(grouped).flatten() & has_tokens
    return targets, valid


def real_bce_loss(scores: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over valid rows of binary_cross_entropy_with_logits(s_i/tau, y_i); 0 (still differentiable) if none.

    Args:
        scores: (N,) float, the sequence scores s.
        targets: (N,) float 0/1 (or bool), the labels y (``real_bce_targets``).
        valid: (N,) bool, the rows that count.
        tau: the score temperature, > 0.

    Returns:
        0-d float tensor, the dtype of ``scores``.

    Raises:
        ValueError: if ``scores`` is not 1-D, ``targets`` or ``valid`` is not (N,), or tau <= 0.
    """
    _check_tau(tau)
    _check_vector("scores", scores)
    _check_rows("targets", targets, scores.numel())
    _check_rows("valid", valid, scores.numel())
    per_row = F.binary_cross_entropy_with_logits(scores / tau, targets.to(scores.dtype), reduction="none")
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def real_group_metrics(
    scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, num_generations: int
) -> dict[str, float]:
    """Diagnostics: mean score of positive rows and of negative rows (all groups), share of groups with both labels.

    Args:
        scores: (N,) float, the sequence scores s (read detached).
        positive, negative: (N,) bool, the labels O+ and O-.
        num_generations: G; rows are grouped consecutively in runs of G.

    Returns:
        dict of Python floats ``score_mean_pos``, ``score_mean_neg``, ``valid_group_frac``, with one device sync; a
        mean over an empty set is NaN.

    Raises:
        ValueError: if ``scores`` is not 1-D, a label is not (N,), or N is not a multiple of G (or G < 1).
    """
    _check_labels(scores, positive, negative, num_generations)
    scores = scores.detach().double()
    valid = positive.view(-1, num_generations).any(1) & negative.view(-1, num_generations).any(1)
    positive, negative = positive.double(), negative.double()
    values = torch.stack(
        [
            (scores * positive).sum() / positive.sum(),  # 0/0 = NaN when there is no positive row
            (scores * negative).sum() / negative.sum(),
            valid.double().mean(),  # NaN for an empty batch
        ]
    ).tolist()
    return dict(zip(("score_mean_pos", "score_mean_neg", "valid_group_frac"), values, strict=True))
