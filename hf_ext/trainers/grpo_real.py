"""REAL (Rewards as Labels, arXiv 2602.05630) as GRPO losses; math in ``hf_ext.losses.real``.

``loss_type="real"`` couples the rows of a group through a log-sum-exp, while TRL scatters a group's rows over
micro-batches and processes. Two exact paths:

- On-policy (``gradient_accumulation_steps`` a multiple of ``steps_per_generation * num_iterations``, TRL's
  default): the weights never change between generation and use, so every score is s = 0 when the loss is taken
  and dL/ds_k is a constant known at generation time. Each row carries that constant (``real_coef``, from autograd
  of the group loss at s = 0 over the gathered batch), and the loss is the separable surrogate
  ``sum(real_coef * s) / groups``, whose gradient is exactly REAL's for any row layout.
- Off-policy (the paper's recipe: several optimizer steps per generation batch, or ``num_iterations > 1``): the
  trainer shuffles and splits each process's generation batch by whole groups (``GRPOLoss.whole_groups``), so each
  micro-batch holds whole groups and the group loss is taken at the current scores s != 0, its mean over the
  micro-batch's groups divided by the accumulation steps: every optimizer step is the mean over its groups.

``loss_type="real_bce"`` classifies each row alone, so it is separable and exact on- and off-policy: the summed
BCE of the micro-batch is divided by the global number of valid rows (as TRL's ``dapo`` divides by tokens).
"""

from dataclasses import dataclass, field

import torch

from .. import papers
from ..losses.real import (
    REAL_VARIANTS,
    real_bce_loss,
    real_bce_targets,
    real_binary_labels,
    real_group_metrics,
    real_labels,
    real_onpolicy_coefficients,
    sequence_scores,
)
from . import trl_compat
from .grpo_loss import GRPOLoss, check, check_choice, check_finite, register_grpo_loss


LABEL_MODES = ("advantage", "binary")


@dataclass
class RealSettings:
    real_tau: float = field(default=0.5, metadata={"help": "REAL: score temperature (> 0); gradients <= 1/tau."})
    real_variant: str = field(
        default="anchor", metadata={"help": "REAL: 'anchor' (paper's equation (8)) or 'product' (pairwise)."}
    )
    real_sign_tolerance: float = field(
        default=1e-6, metadata={"help": "REAL: rows with |advantage| <= this are unlabelled."}
    )
    real_label_mode: str = field(
        default="advantage",
        metadata={
            "help": "REAL: 'advantage' (positive / negative by the sign of the advantage; any reward) or 'binary' "
            "(positive iff the reward is 1, negative iff 0, as the official code; other rewards are refused)."
        },
    )

    @staticmethod
    def check(config) -> None:
        """REAL's fields and, for ``"real"``, the on-policy layout. Runs after TRL's ``__post_init__`` (which derives
        ``steps_per_generation``) and after the range checks, which leave it and ``num_iterations`` >= 1."""
        check_finite(config, "real_sign_tolerance")
        check_finite(config, "real_tau", strict=True)
        check_choice(config, "real_variant", REAL_VARIANTS)
        check_choice(config, "real_label_mode", LABEL_MODES)
        check(
            config.real_label_mode == "advantage" or config.loss_type == "real",
            "real_label_mode='binary' is for loss_type='real': real_bce's target is being the group's best, by "
            "definition. Leave real_label_mode='advantage' with real_bce.",
        )
        check(
            config.loss_type == "real_bce"
            or on_policy(config)
            or config.per_device_train_batch_size % config.num_generations == 0,
            "loss_type='real' off-policy (steps_per_generation * num_iterations = "
            f"{config.steps_per_generation} * {config.num_iterations} > gradient_accumulation_steps "
            f"{config.gradient_accumulation_steps}) evaluates each group's log-sum-exp in one micro-batch, so "
            "per_device_train_batch_size must be a multiple of num_generations, got "
            f"{config.per_device_train_batch_size} and {config.num_generations}. Choose per_device_train_batch_size = "
            "k * num_generations, or train on-policy (steps_per_generation unset, num_iterations=1).",
        )


def on_policy(config) -> bool:
    """Whether the weights stay those of generation for every micro-batch of a generation batch (TRL's default)."""
    return config.gradient_accumulation_steps % (config.steps_per_generation * config.num_iterations) == 0


class _RewardsAsLabels(GRPOLoss):
    title = "Rewards as Labels"
    papers = (papers.REAL,)
    settings = RealSettings
    metric_prefix = "real"
    refused_options = {
        "clip range": "REAL clips no ratio: each completion's gradient weight is bounded by 1/real_tau instead.",
        "two-sided clip": "REAL clips no ratio: each completion's gradient weight is bounded by 1/real_tau instead.",
        "sequence-level ratio": "REAL scores whole sequences already (the mean log-ratio).",
        "KL to a reference model": "the paper defines no KL term for its sequence classifier.",
        "top-entropy token mask": "REAL scores whole sequences; a token mask would change the score, not weight it.",
        "off-policy sequence mask": "REAL's labels and scores define the update; the paper masks no sequence.",
        "vLLM importance-sampling correction": "REAL's score is a log-ratio to the old policy; a per-token sampling "
        "correction is not defined for it.",
    }

    def scores(self, model, inputs: dict) -> torch.Tensor:
        """(B,) sequence scores s_i under the current policy; logs their mean (0 on-policy)."""
        per_token_logps, _, mask = self.policy_logps(model, inputs)
        scores = sequence_scores(per_token_logps, inputs.get("old_per_token_logps"), mask)
        self.log(self.mode, "score_mean", self.trainer.accelerator.gather(scores.detach().mean()).mean().item())
        return scores

    def labels_of_groups(self, output: dict) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """(gathered advantages (N,) float64, gathered loss-token counts (N, 1), this process's rows)."""
        token_counts = self.gather(self.loss_mask(output).sum(1, keepdim=True))  # labels only ask "any token?"
        advantages = self.gather(output["advantages"].double())
        return advantages, token_counts, self.local_rows(len(output["advantages"]))


@register_grpo_loss
class RewardsAsLabels(_RewardsAsLabels):
    """Equation (8) (or the pairwise ``product`` variant). On-policy through per-row constants (any row layout);
    off-policy on whole groups: the trainer keeps each group's rows together in one micro-batch on one process
    (``whole_groups``), and the group loss is evaluated at the current scores."""

    name = "real"
    rewards: torch.Tensor | None = None  # (N_all,) of the batch being scored, for real_label_mode="binary"

    def observe_rewards(self, rewards: torch.Tensor) -> None:
        """Keeps each completion's reward (N_all,) as TRL sums it (weighted over reward functions, None as 0)."""
        self.rewards = (rewards * trl_compat.reward_weights(self.trainer).to(rewards)).nansum(1)

    def prepare(self, output: dict, mode: str) -> None:
        """Adds ``real_coef`` (B,): dL/ds at s = 0 of each local row, from the whole gathered groups."""
        advantages, token_counts, local = self.labels_of_groups(output)
        num_generations, tau = self.group_size(mode), self.args.real_tau
        if self.args.real_label_mode == "binary":
            positive, negative = real_binary_labels(self.rewards.to(advantages), token_counts)
        else:
            positive, negative = real_labels(advantages, token_counts, self.args.real_sign_tolerance)
        if mode == "train" and self.whole_groups():
            output["real_positive"], output["real_negative"] = positive[local], negative[local]
        else:
            coef = real_onpolicy_coefficients(positive, negative, num_generations, tau, self.args.real_variant)
            output["real_coef"] = coef[local].float()
        zero_scores = torch.zeros_like(advantages)
        metrics = real_group_metrics(zero_scores, positive, negative, num_generations)
        self.log(mode, "valid_group_frac", metrics["valid_group_frac"])
        group_loss = REAL_VARIANTS[self.args.real_variant]
        self.log(mode, "loss_at_generation", group_loss(zero_scores, positive, negative, num_generations, tau).item())

    def whole_groups(self) -> bool:
        return not on_policy(self.args)

    def loss(self, model, inputs: dict) -> torch.Tensor:
        scores = self.scores(model, inputs)
        mode = self.mode
        if "real_positive" in inputs:  # whole groups, rows of a group consecutive: the group loss itself
            group_loss = REAL_VARIANTS[self.args.real_variant]
            positive, negative, tau = inputs["real_positive"], inputs["real_negative"], self.args.real_tau
            return group_loss(scores, positive, negative, self.group_size(mode), tau) / self.accumulation(mode)
        num_groups = scores.numel() / self.group_size(mode)
        return (inputs["real_coef"] * scores).sum() / num_groups / self.accumulation(mode)


@register_grpo_loss
class RewardsAsLabelsBCE(_RewardsAsLabels):
    """Each row classified alone (is it its group's best?): separable, exact on- and off-policy."""

    name = "real_bce"

    def prepare(self, output: dict, mode: str) -> None:
        """Adds ``real_target``, ``real_valid`` (B,) and ``real_num_valid`` (the global count of valid rows)."""
        advantages, token_counts, local = self.labels_of_groups(output)
        num_generations = self.group_size(mode)
        targets, valid = real_bce_targets(advantages, token_counts, num_generations, self.args.real_sign_tolerance)
        output["real_target"], output["real_valid"] = targets[local].float(), valid[local]
        output["real_num_valid"] = valid.sum().float()
        self.log(mode, "valid_group_frac", valid.view(-1, num_generations).any(1).double().mean().item())

    def loss(self, model, inputs: dict) -> torch.Tensor:
        scores = self.scores(model, inputs)
        mode, valid = self.mode, inputs["real_valid"]
        summed = real_bce_loss(scores, inputs["real_target"], valid, self.args.real_tau) * valid.sum().clamp(min=1)
        normalizer = inputs["real_num_valid"].clamp(min=1) / self.trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.accumulation(mode) / self.args.steps_per_generation
        return summed / normalizer
