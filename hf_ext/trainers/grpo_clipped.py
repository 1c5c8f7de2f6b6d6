"""``ClippedGRPOLoss``: TRL's clipped GRPO objective with advantages of a loss's own choosing.

For losses that keep GRPO's objective and change only what multiplies the ratio (BA rescales each row's advantage,
GTPO weights each token's). Per micro-batch, as TRL's ``loss_type="grpo"`` does it:

    loss = mean_i( sum_t m_{i,t} * (surrogate_{i,t} * masks_{i,t} + beta * KL_{i,t}) / sum_t m_{i,t} ) / accumulation
           - entropy bonus + router auxiliary loss

with the clipped surrogate of ``hf_ext.losses.surrogate`` (``epsilon``, ``epsilon_high``, ``delta``,
``importance_sampling_level``), the top-entropy and off-policy token masks, vLLM's importance-sampling correction,
the k3 KL to the reference model (``beta``, ``use_bias_correction_kl``); the entropy bonus (static or adaptive,
over the top-entropy tokens when that mask is on) and a mixture-of-experts router loss are added by
``GRPOLoss.finish``, as for every loss. TRL's metrics (``kl``, ``entropy``, ``clip_ratio/*``) are logged alike.
``tests/trainers/test_grpo_clipped.py`` holds it equal to TRL's own ``_compute_loss`` on the same tensors.
"""

import torch

from ..losses.surrogate import clipped_surrogate, k3_kl, log_importance_weights, row_mean_aggregate
from . import trl_compat
from .grpo_loss import GRPOLoss
from .grpo_options import OBJECTIVE_OPTIONS


class ClippedGRPOLoss(GRPOLoss):
    """Subclasses define ``advantages``; every TRL option of the clipped objective applies as in TRL."""

    supported_options = frozenset(OBJECTIVE_OPTIONS)

    def advantages(self, inputs: dict, entropies: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """The advantage that multiplies the ratio: (B,) per row or (B, T) per token. ``entropies`` (B, T) are the
        current policy's, with gradient; ``mask`` (B, T) the loss tokens."""
        raise NotImplementedError(f"{type(self).__name__} must define advantages(inputs, entropies, mask, mode).")

    def loss(self, model, inputs: dict) -> torch.Tensor:
        trainer, args, mode = self.trainer, self.args, self.mode
        per_token_logps, entropies, mask = self.forward(model, inputs)
        entropy_mask = None
        if trainer.top_entropy_quantile < 1.0:
            entropy_mask = trainer.get_high_entropy_mask(entropies, mask, 1 - trainer.top_entropy_quantile)
            self.bonus_mask(mask * entropy_mask)
        advantages = self.advantages(inputs, entropies, mask, mode)
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        level = args.importance_sampling_level
        per_token_loss, ratio = clipped_surrogate(
            per_token_logps,
            old_per_token_logps,
            advantages,
            mask,
            trainer.epsilon_low,
            trainer.epsilon_high,
            args.delta,
            level,
        )
        if trainer.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * trainer.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=trainer.off_policy_mask_threshold,
            )
        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask
        if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if trainer.beta != 0.0:
            per_token_kl = k3_kl(per_token_logps, inputs["ref_per_token_logps"])
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(
                    log_importance_weights(per_token_logps, old_per_token_logps, mask, level)
                )
            per_token_loss = per_token_loss + trainer.beta * per_token_kl
        loss = row_mean_aggregate(per_token_loss, mask) / self.accumulation(mode)
        self._log_trl_metrics(mode, mask, entropies, advantages, ratio, per_token_kl if trainer.beta != 0.0 else None)
        return loss

    def _log_trl_metrics(self, mode, mask, entropies, advantages, ratio, per_token_kl) -> None:
        """TRL's metrics of the clipped objective: ``kl``, ``entropy`` and the clip fractions, over all processes."""
        accelerator, metrics = self.trainer.accelerator, trl_compat.metrics(self.trainer, mode)

        def global_mean(x: torch.Tensor) -> float:
            if x.shape[1] == 1:  # one value per sequence
                totals = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                totals = torch.stack([(x * mask).sum(), mask.sum().float()])
            totals = accelerator.reduce(totals, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def row_means(x: torch.Tensor) -> torch.Tensor:
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        if per_token_kl is not None:
            metrics["kl"].append(global_mean(per_token_kl))
        metrics["entropy"].append(global_mean(entropies))
        epsilon_low, epsilon_high = self.trainer.epsilon_low, self.trainer.epsilon_high
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(trl_compat.nanmin(accelerator.gather(row_means(low))).item())
        metrics["clip_ratio/high_max"].append(trl_compat.nanmax(accelerator.gather(row_means(high))).item())
