"""Balanced Aggregation as a GRPO loss (math: ``hf_ext.losses.ba``, arXiv 2605.04077).

The clipped surrogate is linear in a positive rescaling of the advantage, so BA is GRPO's clipped objective
(``ClippedGRPOLoss``, TRL's ``grpo`` aggregation: mean of row means) run with ``A_i * |o_i| / Lbar_{s(i)}``, where
``Lbar`` is the mean loss-token length of the row's same-sign peers (and ``A_i * 0`` for ties, which BA leaves out).
That scale is computed at generation time from *global* group statistics (gathered lengths and advantages) and
carried per row, so the loss is exact under TRL's row shuffling, gradient accumulation and any number of processes;
every option of TRL's clipped objective applies unchanged.
"""

from dataclasses import dataclass, field

import torch

from .. import papers
from ..losses.ba import ba_group_metrics, ba_row_weights
from .grpo_clipped import ClippedGRPOLoss
from .grpo_loss import check_finite, register_grpo_loss


@dataclass
class BASettings:
    ba_sign_tolerance: float = field(
        default=1e-6, metadata={"help": "BA: rows with |advantage| <= this belong to neither sign subset."}
    )

    @staticmethod
    def check(config) -> None:
        check_finite(config, "ba_sign_tolerance")


@register_grpo_loss
class BalancedAggregation(ClippedGRPOLoss):
    name = "ba"
    title = "Balanced Aggregation"
    papers = (papers.BA,)
    settings = BASettings

    def prepare(self, output: dict, mode: str) -> None:
        """Adds ``ba_advantage_scale`` (B,): |o_i| / Lbar_{s(i)}, 0 for ties; logs BA's side weights."""
        lengths = self.loss_mask(output).sum(1).float()
        all_lengths, all_advantages = self.gather(lengths), self.gather(output["advantages"].float())
        num_generations, tolerance = self.group_size(mode), self.args.ba_sign_tolerance
        weights = ba_row_weights(all_lengths, all_advantages, num_generations, tolerance)
        scale = lengths.double() * weights[self.local_rows(len(lengths))]
        output["ba_advantage_scale"] = scale.to(output["advantages"].dtype)
        for name, value in ba_group_metrics(all_lengths, all_advantages, num_generations, tolerance).items():
            self.log(mode, name, value)

    def advantages(self, inputs: dict, entropies: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        return inputs["advantages"] * inputs["ba_advantage_scale"]
