"""REAL (Rewards as Labels, arXiv 2602.05630) wired into TRL's GRPO trainer; math in ``hf_ext.losses.real``.

``loss_type="real"`` couples the rows of a group through a log-sum-exp, while TRL scatters a group's rows over
micro-batches and processes. It is made exact on-policy (``gradient_accumulation_steps`` a multiple of
``steps_per_generation * num_iterations``, TRL's default): the weights never change between generation and use, so
every score is s = 0 when the loss is taken and dL/ds_k is a constant known at generation time. Each row carries
that constant (``real_coef``, from autograd of the group loss at s = 0 over the gathered batch), and the loss is
the separable surrogate ``sum(real_coef * s) / groups``, whose gradient is exactly REAL's for any row layout.
Off-policy configurations are refused at config time.

``loss_type="real_bce"`` classifies each row alone, so it is separable and exact on- and off-policy: the summed
BCE of the micro-batch is divided by the global number of valid rows (as TRL's ``dapo`` divides by tokens).
"""

import torch
from accelerate.utils import gather

from ..losses.real import (
    real_bce_loss,
    real_bce_targets,
    real_group_loss,
    real_group_metrics,
    real_labels,
    real_product_group_loss,
    sequence_scores,
)


REAL_VARIANTS = {"anchor": real_group_loss, "product": real_product_group_loss}


def onpolicy_coefficients(group_loss, positive, negative, num_generations: int, tau: float) -> torch.Tensor:
    """dL/ds at s = 0 for every row, scaled so that sum(coef * s) / num_groups has the gradient of mean L."""
    scores = torch.zeros(positive.shape, dtype=torch.float64, device=positive.device, requires_grad=True)
    num_groups = positive.numel() // num_generations
    (coef,) = torch.autograd.grad(group_loss(scores, positive, negative, num_generations, tau) * num_groups, scores)
    return coef


class RewardsAsLabelsMixin:
    def _prepare_real(self, output: dict, mode: str) -> None:
        """Adds ``real_coef`` (B,) for `real`; ``real_target``, ``real_valid`` (B,) and ``real_num_valid`` for BCE."""
        num_generations, tolerance, tau = self._group_size(mode), self.args.real_sign_tolerance, self.args.real_tau
        token_counts = gather(self._loss_mask(output).sum(1, keepdim=True))  # (N, 1): the labels only ask "any token?"
        advantages = gather(output["advantages"].double())
        local = self._local_rows(len(output["advantages"]))
        if self.loss_type == "real_bce":
            targets, valid = real_bce_targets(advantages, token_counts, num_generations, tolerance)
            output["real_target"], output["real_valid"] = targets[local].float(), valid[local]
            output["real_num_valid"] = valid.sum().float()
            valid_groups = valid.view(-1, num_generations).any(1).double().mean().item()
            self._metrics[mode]["real/valid_group_frac"].append(valid_groups)
            return
        positive, negative = real_labels(advantages, token_counts, tolerance)
        group_loss = REAL_VARIANTS[self.args.real_variant]
        coef = onpolicy_coefficients(group_loss, positive, negative, num_generations, tau)
        output["real_coef"] = coef[local].float()
        zero_scores = torch.zeros_like(advantages)
        metrics = real_group_metrics(zero_scores, positive, negative, num_generations)
        self._metrics[mode]["real/valid_group_frac"].append(metrics["valid_group_frac"])
        self._metrics[mode]["real/loss_at_generation"].append(
            group_loss(zero_scores, positive, negative, num_generations, tau).item()
        )

    def _real_loss(self, model, inputs: dict) -> torch.Tensor:
        per_token_logps, _, mask = self._policy_logps(model, inputs)
        scores = sequence_scores(per_token_logps, inputs.get("old_per_token_logps"), mask)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.loss_type == "real_bce":
            valid = inputs["real_valid"]
            summed = real_bce_loss(scores, inputs["real_target"], valid, self.args.real_tau) * valid.sum().clamp(min=1)
            normalizer = inputs["real_num_valid"].clamp(min=1) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            loss = summed / normalizer
        else:
            num_groups = scores.numel() / self._group_size(mode)
            loss = (inputs["real_coef"] * scores).sum() / num_groups / accumulation
        # mean log-ratio to the old policy: 0 on-policy, drifts off-policy (real_bce with num_iterations > 1)
        self._metrics[mode]["real/score_mean"].append(self.accelerator.gather(scores.detach().mean()).mean().item())
        return loss
