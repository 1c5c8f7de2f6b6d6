"""GTPO, Group-relative Trajectory-based Policy Optimization — Simoni et al., arXiv 2508.03772.

For a group of G completions o_i of one prompt with advantages A_i (latest objective, maximised; the loss is -J):

    J_GTPO = (1/G) * sum_i  delta_i * (A_i - gamma * Hbar_i) / |o_i| * sum_t rho_{i,t} * lambda_{i,t}

- rho_{i,t} = pi_theta / pi_old of token t (clipped PPO-style when it differs from 1: ``hf_ext.losses.surrogate``).
- Hbar_i = (1/|o_i|) * sum_t H_{i,t}, the detached mean token entropy of o_i; gamma the shaping coefficient.
- delta_i = 0 if the filter is on and Hbar_i > threshold (ln 2), else 1. The trainer decides "filter on" (the
  paper: initial model entropy H_ini < ln 2); ``only_negative`` restricts the filter to rows with A_i < 0.
- lambda_{i,t}, conflict weights from the sign of the unshaped A_i. Active rows: P = {A_i > tol}, N = {A_i < -tol},
  each with at least one valid token. Token (i, t) of an active row is a raw conflict when its id sits at the same
  position t in some valid row of P and in some valid row of N of the group (row i counts for its own sign; the
  partners may change from one position to the next). The prefix run is the unbroken run of raw conflicts from
  t = 0; the suffix run the same with positions counted from each row's own last valid token. A run token weighs
  W (= 2) in a positive row and 0 in a negative row; ``product`` multiplies the prefix and suffix factors
  (W^2 in both runs), ``union`` applies W once; all other valid tokens weigh 1 and padding 0.

Validity always comes from the completion mask, never from pad ids (pad may equal eos). A masked position inside a
row is not a valid token: it breaks a run, and a row's end is its last valid position.

Pure torch, no TRL import. ``conflict_weights`` (vectorised over groups, O(Q*G*G*T) booleans, chunked) runs at
generation on the gathered batch; ``mean_entropy`` and ``shaped_advantages`` at loss time, before
the shared clipped surrogate and its row-mean aggregation (``hf_ext.losses.surrogate``); ``gtpo_metrics`` is what
the trainer logs.
"""

import math

import torch


COMBINES = ("product", "union")
PAIR_BUDGET = 2**27  # elements per chunk of the (groups, G, G, T) bool comparison: 128 MB per tensor, ~3 alive


def _check_batch(completion_ids, completion_mask, advantages, num_generations: int) -> None:
    if completion_ids.dim() != 2 or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} and completion_mask {tuple(completion_mask.shape)} "
            "must be equal (N, T) tensors"
        )
    if advantages.shape != completion_ids.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (N,) = ({completion_ids.shape[0]},)")
    if num_generations < 1 or completion_ids.shape[0] % num_generations != 0:
        raise ValueError(
            f"{completion_ids.shape[0]} rows do not split into groups of num_generations={num_generations}: "
            "pass whole groups, rows grouped consecutively"
        )


def _active_rows(valid: torch.Tensor, advantages: torch.Tensor, sign_tolerance: float):
    """(positive, negative) row masks (N,): sign beyond the tolerance and at least one valid token."""
    has_tokens = valid.any(-1)
    return (advantages > sign_tolerance) & has_tokens, (advantages < -sign_tolerance) & has_tokens


def _reversal_index(valid: torch.Tensor) -> torch.Tensor:
    """(N, T) gather index reversing each row inside [0, end), end = last valid position + 1; an involution."""
    positions = torch.arange(valid.shape[-1], device=valid.device)
    ends = torch.where(valid, positions + 1, 0).amax(-1, keepdim=True)
    return torch.where(positions < ends, ends - 1 - positions, positions)


def _group_leading_runs(ids, valid, positive, negative) -> torch.Tensor:
    """Leading runs of raw conflicts for whole groups. ids, valid: (Q, G, T); positive, negative: (Q, G)."""
    same = (ids[:, :, None, :] == ids[:, None, :, :]) & valid[:, :, None, :] & valid[:, None, :, :]  # row, partner
    with_positive = (same & positive[:, None, :, None]).any(2)
    with_negative = (same & negative[:, None, :, None]).any(2)
    raw = with_positive & with_negative & (positive | negative)[:, :, None]
    return raw.cumprod(-1).bool()


def _leading_runs(ids, valid, positive, negative, num_generations: int) -> torch.Tensor:
    """(N, T) leading runs, computed in chunks of groups so the pairwise comparison stays within PAIR_BUDGET."""
    width = ids.shape[-1]
    grouped = [x.reshape(-1, num_generations, *x.shape[1:]) for x in (ids, valid, positive, negative)]
    step = max(1, PAIR_BUDGET // (num_generations * num_generations * width))
    chunks = [
        _group_leading_runs(*(x[start : start + step] for x in grouped))
        for start in range(0, grouped[0].shape[0], step)
    ]
    return torch.cat(chunks).reshape(-1, width)


def conflict_runs(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    num_generations: int,
    sign_tolerance: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in the unbroken run of raw conflicts from t = 0 (prefix) and from each row's last valid token (suffix).

    Only active rows have runs. ``(prefix | suffix).sum(-1)`` is the code's per-completion n_conflict.

    Args:
        completion_ids: (N, T) int, the completion token ids (pad ids never matter).
        completion_mask: (N, T) 0/1 (bool, int or float), the valid tokens (nonzero = valid).
        advantages: (N,) float, the unshaped A_i (their sign picks the active rows P and N).
        num_generations: G; rows are grouped consecutively in runs of G.
        sign_tolerance: tol; rows with |A_i| <= tol are not active.

    Returns:
        ``(prefix, suffix)``: two bool (N, T) tensors.

    Raises:
        ValueError: if ``completion_ids`` and ``completion_mask`` are not equal (N, T) tensors, ``advantages`` is not
            (N,), or N is not a multiple of G (or G < 1).
    """
    _check_batch(completion_ids, completion_mask, advantages, num_generations)
    valid = completion_mask != 0
    if valid.numel() == 0:
        return valid.clone(), valid.clone()
    positive, negative = _active_rows(valid, advantages, sign_tolerance)
    prefix = _leading_runs(completion_ids, valid, positive, negative, num_generations)
    flip = _reversal_index(valid)
    suffix = _leading_runs(
        completion_ids.gather(-1, flip), valid.gather(-1, flip), positive, negative, num_generations
    )
    return prefix, suffix.gather(-1, flip)


def conflict_weights(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    num_generations: int,
    conflict_weight: float = 2.0,
    combine: str = "product",
    sign_tolerance: float = 1e-6,
    runs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """lambda_{i,t}: W / 0 on run tokens of positive / negative rows, 1 on other valid tokens, 0 on padding.

    Args:
        completion_ids: (N, T) int, the completion token ids (pad ids never matter).
        completion_mask: (N, T) 0/1 (bool, int or float), the valid tokens (nonzero = valid).
        advantages: (N,) float, the unshaped A_i (their sign picks the active rows P and N).
        num_generations: G; rows are grouped consecutively in runs of G.
        conflict_weight: W, the run weight of positive rows, >= 0 (default 2.0, the paper's).
        combine: ``"product"`` (the prefix and suffix factors multiply, W^2 on tokens in both runs, as the code) or
            ``"union"`` (W once).
        sign_tolerance: tol; rows with |A_i| <= tol are not active.
        runs: ``conflict_runs`` of the same arguments, when the caller has them already.

    Returns:
        (N, T) float in the dtype of ``advantages`` (the default float dtype if they are not floating point).

    Raises:
        ValueError: if ``combine`` is unknown or ``conflict_weight`` is not >= 0; as ``conflict_runs`` otherwise.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {COMBINES}; use 'product' (the code's W^2) or 'union'")
    if not conflict_weight >= 0:
        raise ValueError(f"conflict_weight={conflict_weight} must be >= 0 (the paper uses 2.0)")
    if runs is None:
        runs = conflict_runs(completion_ids, completion_mask, advantages, num_generations, sign_tolerance)
    prefix, suffix = runs
    dtype = advantages.dtype if advantages.is_floating_point() else torch.get_default_dtype()
    run_weight = torch.where(advantages > sign_tolerance, conflict_weight, 0.0).to(dtype)[:, None]
    one = torch.ones((), dtype=dtype, device=run_weight.device)
    if combine == "product":
        weights = torch.where(prefix, run_weight, one) * torch.where(suffix, run_weight, one)
    else:
        weights = torch.where(prefix | suffix, run_weight, one)
    return weights * completion_mask.to(dtype)


def mean_entropy(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hbar_i = (1/|o_i|) * sum_t H_{i,t}, the detached masked mean token entropy of row i; 0 for rows without tokens.

    Args:
        entropies: (N, T) float, the token entropies H (rows need not form whole groups).
        mask: (N, T) 0/1 (bool, int or float), the loss tokens.

    Returns:
        (N,) float, the dtype of ``entropies``, without gradient.
    """
    weights = mask.to(entropies.dtype)
    total = torch.where(mask != 0, entropies.detach() * weights, 0.0).sum(-1)
    return total / weights.sum(-1).clamp(min=1)


def entropy_filter(
    advantages: torch.Tensor,
    mean_entropy: torch.Tensor,
    threshold: float = math.log(2),
    filter_on: bool = True,
    only_negative: bool = False,
    sign_tolerance: float = 1e-6,
) -> torch.Tensor:
    """True where delta_i = 0: the filter is on and Hbar_i > threshold (and A_i < -tol if ``only_negative``).

    Args:
        advantages: (N,) float, the unshaped A_i.
        mean_entropy: (N,) float, Hbar_i (``mean_entropy``).
        threshold: the entropy threshold (default ln 2).
        filter_on: whether the filter applies at all (False: no row is filtered).
        only_negative: restrict the filter to rows with A_i < -tol.
        sign_tolerance: tol.

    Returns:
        (N,) bool.

    Raises:
        ValueError: if ``advantages`` and ``mean_entropy`` are not equal-shaped 1-D tensors.
    """
    if advantages.shape != mean_entropy.shape or advantages.dim() != 1:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and mean_entropy {tuple(mean_entropy.shape)} must be equal 1-D"
        )
    filtered = (mean_entropy > threshold) & filter_on
    if only_negative:
        filtered = filtered & (advantages < -sign_tolerance)
    return filtered


def shaped_advantages(
    advantages: torch.Tensor,
    mean_entropy: torch.Tensor,
    entropy_penalty: float = 0.1,
    threshold: float = math.log(2),
    filter_on: bool = True,
    only_negative: bool = False,
    shape_zero_advantage: bool = True,
    sign_tolerance: float = 1e-6,
) -> torch.Tensor:
    """A'_i = delta_i * (A_i - gamma * Hbar_i), with Hbar_i detached.

    A small positive A_i may turn negative here while its conflict weights (from the unshaped sign) stay W.

    Args:
        advantages: (N,) float, the unshaped A_i.
        mean_entropy: (N,) float, Hbar_i (``mean_entropy``).
        entropy_penalty: gamma, the shaping coefficient.
        threshold, filter_on, only_negative, sign_tolerance: the entropy filter, as ``entropy_filter``.
        shape_zero_advantage: if False, ties (|A_i| <= tol) keep A' = 0 instead of -gamma * Hbar_i.

    Returns:
        (N,) float, the dtype of ``advantages``.

    Raises:
        ValueError: if ``advantages`` and ``mean_entropy`` are not equal-shaped 1-D tensors.
    """
    filtered = entropy_filter(advantages, mean_entropy, threshold, filter_on, only_negative, sign_tolerance)
    shaped = advantages - entropy_penalty * mean_entropy.detach().to(advantages.dtype)
    if not shape_zero_advantage:
        shaped = torch.where(advantages.abs() <= sign_tolerance, 0.0, shaped)
    return torch.where(filtered, 0.0, shaped)


def gtpo_metrics(
    token_weights: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    filtered: torch.Tensor,
    sign_tolerance: float = 1e-6,
) -> dict[str, float]:
    """Diagnostics over one batch, with one device sync.

    A conflict token is a valid token whose weight is not 1 (so with conflict_weight == 1 the no-op conflicts of
    positive rows are not counted).

    Args:
        token_weights: (N, T) float, lambda from ``conflict_weights`` (W/0 on conflicts, 1 elsewhere, times ``mask``).
        mask: (N, T) 0/1 (bool, int or float), the valid tokens.
        advantages: (N,) float, the unshaped A_i.
        filtered: (N,) bool, from ``entropy_filter``.
        sign_tolerance: tol.

    Returns:
        dict of Python floats. ``conflict_token_frac``: conflict share of all valid tokens; ``_pos`` / ``_neg``: of
        the valid tokens of rows with A > tol / A < -tol; ``filtered_frac``: share of rows with delta = 0. A fraction
        with an empty denominator is NaN (0/0).
    """
    valid = mask != 0
    conflict = valid & (token_weights != mask.to(token_weights.dtype))
    positive = (advantages > sign_tolerance)[:, None]
    negative = (advantages < -sign_tolerance)[:, None]
    counts = torch.stack(
        [
            conflict.sum(),
            valid.sum(),
            (conflict & positive).sum(),
            (valid & positive).sum(),
            (conflict & negative).sum(),
            (valid & negative).sum(),
            filtered.sum(),
            torch.tensor(filtered.numel(), device=filtered.device),
        ]
    ).double()
    values = (counts[0::2] / counts[1::2]).tolist()  # one device sync
    keys = ("conflict_token_frac", "conflict_token_frac_pos", "conflict_token_frac_neg", "filtered_frac")
    return dict(zip(keys, values, strict=True))
