"""The clipped policy-gradient surrogate of PPO (arXiv 1707.06347) as GRPO uses it (arXiv 2402.03300), with the
two-sided clip of arXiv 2505.22617 (``delta``) and GSPO's sequence-level ratio (arXiv 2507.18071).

Per token, with the importance ratio rho = pi_theta / pi_old and the advantage A,

    l = -min(min(rho, delta) * A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) * A)

where ``delta`` (None: no cap) bounds the unclipped ratio from above. At the token level rho_{i,t} is each token's
ratio; at the sequence level every token of row i shares rho_i = exp(mean_t log(pi_theta / pi_old)) over the row's
loss tokens. This is the one copy every hf_ext loss that clips a ratio uses; it equals the corresponding branch of
TRL's GRPO loss on the same tensors (``tests/trainers/test_grpo_clipped.py``).
"""

import torch


IMPORTANCE_LEVELS = ("token", "sequence")


def log_importance_weights(
    per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """log rho: (B, T) at the token level, (B, 1) at the sequence level (the row's masked mean log-ratio).

    Args:
        per_token_logps: (B, T) float, log pi_theta of each completion token (differentiable).
        old_per_token_logps: (B, T) float, log pi_old of the same tokens.
        mask: (B, T) 0/1, the loss tokens.
        level: ``"token"`` or ``"sequence"``.
    """
    log_ratio = per_token_logps - old_per_token_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(
        f"importance_sampling_level={level!r} is not known; allowed values: {', '.join(IMPORTANCE_LEVELS)}."
    )


def clipped_surrogate(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
    level: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss and the (capped) ratio it used.

    Args:
        per_token_logps: (B, T) float, log pi_theta (differentiable).
        old_per_token_logps: (B, T) float or None; None means on-policy (pi_old = pi_theta detached: rho = 1 in
            value, its gradient that of log pi_theta).
        advantages: (B,) per row or (B, T) per token.
        mask: (B, T) 0/1 loss tokens (only the sequence-level ratio reads it).
        epsilon_low, epsilon_high: the clip range [1 - epsilon_low, 1 + epsilon_high].
        delta: upper cap of the unclipped ratio, or None.
        level: ``"token"`` or ``"sequence"`` importance ratio.

    Returns:
        ``(per_token_loss, ratio)``: the loss (B, T) (unmasked), and rho after the ``delta`` cap, (B, T) or (B, 1),
        from which clip fractions are read.
    """
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(log_importance_weights(per_token_logps, old_per_token_logps, mask, level))
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def row_mean_aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of each row's masked token mean (GRPO's aggregation; a row without loss tokens counts 0).

    Args:
        per_token_loss: (B, T) or (B, 1) (broadcast over the row's tokens).
        mask: (B, T) 0/1.

    Returns:
        0-d tensor.
    """
    mask = mask.to(per_token_loss.dtype)
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate exp(r) - r - 1 with r = log pi_ref - log pi_theta (Schulman's k3,
    as GRPO, arXiv 2402.03300, equation (4)); (B, T), >= 0."""
    log_ratio = ref_per_token_logps - per_token_logps
    return torch.exp(log_ratio) - log_ratio - 1
