"""Balanced Aggregation wired into TRL's GRPO trainer (math: ``hf_ext.losses.ba``, arXiv 2605.04077).

The clipped surrogate is linear in a positive rescaling of the advantage, so BA is TRL's ``grpo`` path run with
``A_i * |o_i| / Lbar_{s(i)}``, where ``Lbar`` is the mean loss-token length of the row's same-sign peers (and
``A_i * 0`` for ties, which BA leaves out). That scale is computed at generation time from *global* group
statistics (gathered lengths and advantages) and carried per row, so the loss is exact under TRL's row shuffling,
gradient accumulation and any number of processes.
"""

import torch
from accelerate.utils import gather

from ..losses.ba import ba_group_metrics, ba_row_weights


class BalancedAggregationMixin:
    def _prepare_ba(self, output: dict, mode: str) -> None:
        """Adds ``ba_advantage_scale`` (B,): |o_i| / Lbar_{s(i)}, 0 for ties; logs BA's side weights."""
        lengths = self._loss_mask(output).sum(1).float()
        all_lengths, all_advantages = gather(lengths), gather(output["advantages"].float())
        num_generations, tolerance = self._group_size(mode), self.args.ba_sign_tolerance
        weights = ba_row_weights(all_lengths, all_advantages, num_generations, tolerance)
        scale = lengths.double() * weights[self._local_rows(len(lengths))]
        output["ba_advantage_scale"] = scale.to(output["advantages"].dtype)
        for name, value in ba_group_metrics(all_lengths, all_advantages, num_generations, tolerance).items():
            self._metrics[mode][f"ba/{name}"].append(value)

    def _ba_loss(self, model, inputs: dict) -> torch.Tensor:
        inputs = {**inputs, "advantages": inputs["advantages"] * inputs["ba_advantage_scale"]}
        with self._run_as_loss_type("grpo"):
            return super()._compute_loss(model, inputs)
