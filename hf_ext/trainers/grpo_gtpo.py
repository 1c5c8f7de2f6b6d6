"""GTPO (arXiv 2508.03772) as a GRPO loss; math in ``hf_ext.losses.gtpo``.

Generation time: completion ids and masks of all processes are gathered (padded to one width), the conflict weights
lambda of every group are computed on the device, and each process keeps its rows. Loss time: the mean entropy of
each completion under the current policy decides the entropy filter and shapes the advantage,
A'_i = delta_i * (A_i - gamma * Hbar_i); the token advantage A'_i * lambda_{i,t} goes through GRPO's clipped
objective (``ClippedGRPOLoss``: mean of row means, exact under any row layout) with token-level ratios. No
reference model: beta = 0.

H_ini, the model's initial mean entropy that decides whether the filter is on (``gtpo_filter_mode="auto"``), is
``gtpo_initial_entropy`` when given, else measured on the first training micro-batch as the token-weighted mean over
all processes, and kept for the run.
"""

import math
from dataclasses import dataclass, field

import torch

from .. import papers
from ..losses.gtpo import COMBINES, conflict_weights, entropy_filter, gtpo_metrics, mean_entropy, shaped_advantages
from .grpo_clipped import ClippedGRPOLoss
from .grpo_loss import check, check_choice, check_finite, check_sequence_level_switches, register_grpo_loss


FILTER_MODES = ("auto", "always", "never")


@dataclass
class GTPOSettings:
    gtpo_conflict_weight: float = field(
        default=2.0, metadata={"help": "GTPO: weight of conflict tokens in positive completions (>= 0)."}
    )
    gtpo_conflict_combine: str = field(
        default="product", metadata={"help": "GTPO: 'product' (w**2 in both runs) or 'union' (w)."}
    )
    gtpo_entropy_penalty: float = field(default=0.1, metadata={"help": "GTPO: gamma of the entropy shaping (>= 0)."})
    gtpo_entropy_threshold: float = field(
        default=math.log(2), metadata={"help": "GTPO: entropy threshold of the filter (> 0; default ln 2)."}
    )
    gtpo_filter_mode: str = field(
        default="auto", metadata={"help": "GTPO: entropy filter 'auto' (on iff H_ini < threshold), 'always', 'never'."}
    )
    gtpo_initial_entropy: float | None = field(
        default=None, metadata={"help": "GTPO: H_ini for 'auto'; measured on the first micro-batch when unset."}
    )
    gtpo_filter_only_negative: bool = field(
        default=False, metadata={"help": "GTPO: apply the entropy filter to negative-advantage completions only."}
    )
    gtpo_shape_zero_adv: bool = field(
        default=True, metadata={"help": "GTPO: shape zero-advantage completions too (-gamma * mean entropy)."}
    )
    gtpo_sign_tolerance: float = field(
        default=1e-6, metadata={"help": "GTPO: rows with |advantage| <= this are no conflict partners."}
    )

    @staticmethod
    def check(config) -> None:
        check_finite(config, "gtpo_sign_tolerance")
        check_choice(config, "gtpo_filter_mode", FILTER_MODES)
        check_choice(config, "gtpo_conflict_combine", COMBINES)
        check_finite(config, "gtpo_conflict_weight")
        check_finite(config, "gtpo_entropy_penalty")
        check_finite(config, "gtpo_entropy_threshold", strict=True)
        check(
            config.gtpo_initial_entropy is None or 0 <= config.gtpo_initial_entropy < math.inf,
            f"gtpo_initial_entropy must be None or a finite number >= 0, got {config.gtpo_initial_entropy}.",
        )
        check(
            config.beta == 0.0,
            f"loss_type='gtpo' is defined without a KL term or reference model: beta must be 0.0, got {config.beta}.",
        )
        check_sequence_level_switches(config, "GTPO weights tokens itself")


@register_grpo_loss
class GTPO(ClippedGRPOLoss):
    name = "gtpo"
    title = "GTPO"
    papers = (papers.GTPO,)
    settings = GTPOSettings
    importance_sampling_level = "token"
    vllm_importance_sampling_correction = False

    def __init__(self, trainer):
        super().__init__(trainer)
        self.initial_entropy: float | None = self.args.gtpo_initial_entropy  # H_ini, once known

    def prepare(self, output: dict, mode: str) -> None:
        """Adds ``gtpo_lambda`` (B, T): the conflict weights of the local rows, computed over whole groups."""
        ids, mask = output["completion_ids"], output["completion_mask"]
        accelerator = self.trainer.accelerator
        all_ids = self.gather(accelerator.pad_across_processes(ids, dim=1, pad_index=0))
        all_mask = self.gather(accelerator.pad_across_processes(mask, dim=1, pad_index=0))
        weights = conflict_weights(
            all_ids,
            all_mask,
            self.gather(output["advantages"].float()),
            self.group_size(mode),
            self.args.gtpo_conflict_weight,
            self.args.gtpo_conflict_combine,
            self.args.gtpo_sign_tolerance,
        )
        output["gtpo_lambda"] = weights[self.local_rows(len(ids)), : ids.shape[1]]

    def filter_on(self, entropies: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether the entropy filter is on: by ``gtpo_filter_mode``, or for "auto" iff H_ini < threshold."""
        if self.args.gtpo_filter_mode != "auto":
            return self.args.gtpo_filter_mode == "always"
        if self.initial_entropy is None:
            reduce = self.trainer.accelerator.reduce
            totals = reduce(torch.stack([(entropies * mask).sum(), mask.sum()]).double(), "sum")
            self.initial_entropy = (totals[0] / totals[1].clamp(min=1)).item()
        return self.initial_entropy < self.args.gtpo_entropy_threshold

    def advantages(self, inputs: dict, entropies: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """A'_i * lambda_{i,t} (B, T); logs GTPO's metrics."""
        args, advantages = self.args, inputs["advantages"]
        hbar = mean_entropy(entropies, mask)
        filter_on = self.filter_on(entropies.detach(), mask)
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
        gather = self.trainer.accelerator.gather
        for name, value in metrics.items():
            self.log(mode, name, gather(torch.tensor(value, device=advantages.device)).nanmean().item())
        if self.initial_entropy is not None:
            self.log(mode, "H_ini", self.initial_entropy)
        return shaped[:, None] * inputs["gtpo_lambda"]
