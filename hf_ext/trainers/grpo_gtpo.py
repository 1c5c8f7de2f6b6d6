"""GTPO (arXiv 2508.03772) wired into TRL's GRPO trainer; math in ``hf_ext.losses.gtpo``.

Generation time: completion ids and masks of all processes are gathered (padded to one width), the conflict weights
lambda of every group are computed on the device, and each process keeps its rows. Loss time: the mean entropy of
each completion under the current policy decides the entropy filter and shapes the advantage,
A'_i = delta_i * (A_i - gamma * Hbar_i); the token advantage A'_i * lambda_{i,t} goes through the clipped surrogate,
aggregated as TRL's ``grpo`` (mean of row means), which is exact under any row layout. No reference model: beta = 0.

H_ini, the model's initial mean entropy that decides whether the filter is on (``gtpo_filter_mode="auto"``), is
``gtpo_initial_entropy`` when given, else measured on the first training micro-batch as the token-weighted mean over
all processes, and kept for the run.
"""

import torch
from accelerate.utils import gather

from ..losses.gtpo import (
    conflict_weights,
    entropy_filter,
    gtpo_aggregate,
    gtpo_metrics,
    gtpo_per_token_loss,
    mean_entropy,
    shaped_advantages,
)


class GTPOMixin:
    _gtpo_initial_entropy: float | None = None

    def _prepare_gtpo(self, output: dict, mode: str) -> None:
        """Adds ``gtpo_lambda`` (B, T): the conflict weights of the local rows, computed over whole groups."""
        ids, mask = output["completion_ids"], output["completion_mask"]
        width = ids.shape[1]
        all_ids = gather(self.accelerator.pad_across_processes(ids, dim=1, pad_index=0))
        all_mask = gather(self.accelerator.pad_across_processes(mask, dim=1, pad_index=0))
        all_advantages = gather(output["advantages"].float())
        weights = conflict_weights(
            all_ids,
            all_mask,
            all_advantages,
            self._group_size(mode),
            self.args.gtpo_conflict_weight,
            self.args.gtpo_conflict_combine,
            self.args.gtpo_sign_tolerance,
        )
        output["gtpo_lambda"] = weights[self._local_rows(len(ids)), :width]

    def _gtpo_filter_on(self, entropies: torch.Tensor, mask: torch.Tensor) -> bool:
        mode = self.args.gtpo_filter_mode
        if mode != "auto":
            return mode == "always"
        if self._gtpo_initial_entropy is None:
            self._gtpo_initial_entropy = self.args.gtpo_initial_entropy
        if self._gtpo_initial_entropy is None:
            totals = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum()]).double(), "sum")
            self._gtpo_initial_entropy = (totals[0] / totals[1].clamp(min=1)).item()
        return self._gtpo_initial_entropy < self.args.gtpo_entropy_threshold

    def _gtpo_loss(self, model, inputs: dict) -> torch.Tensor:
        per_token_logps, entropies, mask = self._policy_logps(model, inputs)
        mode = "train" if self.model.training else "eval"
        args = self.args
        hbar = mean_entropy(entropies, mask)
        filter_on = self._gtpo_filter_on(entropies.detach(), mask)
        advantages = inputs["advantages"]
        shaped = shaped_advantages(
            advantages,
            hbar,
            args.gtpo_entropy_penalty,
            args.gtpo_entropy_threshold,
            filter_on,
            args.gtpo_filter_only_negative,
            args.gtpo_shape_zero_adv,
            args.gtpo_sign_tolerance,
        )
        token_advantages = shaped[:, None] * inputs["gtpo_lambda"]
        per_token_loss = gtpo_per_token_loss(
            per_token_logps, inputs.get("old_per_token_logps"), token_advantages, self.epsilon_low, self.epsilon_high
        )
        loss = gtpo_aggregate(per_token_loss, mask)
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        filtered = entropy_filter(
            advantages,
            hbar,
            args.gtpo_entropy_threshold,
            filter_on,
            args.gtpo_filter_only_negative,
            args.gtpo_sign_tolerance,
        )
        metrics = gtpo_metrics(inputs["gtpo_lambda"], mask, advantages, filtered, args.gtpo_sign_tolerance)
        metrics["completion_entropy_mean"] = hbar.mean().item()
        for name, value in metrics.items():
            value = torch.tensor(value, device=loss.device)
            self._metrics[mode][f"gtpo/{name}"].append(self.accelerator.gather(value).nanmean().item())
        if self._gtpo_initial_entropy is not None:
            self._metrics[mode]["gtpo/H_ini"].append(self._gtpo_initial_entropy)
        return loss
