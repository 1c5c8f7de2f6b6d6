"""A GRPO loss that lives outside hf_ext, as a user's would: one class in one file.

REINFORCE with group-relative advantages and a length-normalised log-likelihood per completion,
L = -mean_i( toy_advantage_scale * A_i * mean_t log pi(o_{i,t}) ). Installed packages declare it in the entry-point
group ``hf_ext.grpo_losses`` (``toy_pg = hf_ext_toy_loss:ToyPolicyGradient``); importing the module registers it.
"""

from dataclasses import dataclass, field

import torch

from hf_ext import GRPOLoss, register_grpo_loss
from hf_ext.papers import Paper


@dataclass
class ToySettings:
    toy_advantage_scale: float = field(default=1.0, metadata={"help": "Toy loss: factor on every advantage (> 0)."})

    @staticmethod
    def check(config) -> None:
        if not config.toy_advantage_scale > 0:
            raise ValueError(f"toy_advantage_scale must be > 0, got {config.toy_advantage_scale}.")


@register_grpo_loss
class ToyPolicyGradient(GRPOLoss):
    name = "toy_pg"
    title = "Toy policy gradient"
    papers = (Paper("Simple statistical gradient-following algorithms", "0000.00000", "@misc{toy_pg}"),)
    settings = ToySettings

    def loss(self, model, inputs: dict) -> torch.Tensor:
        per_token_logps, _, mask = self.policy_logps(model, inputs)
        row_logps = (per_token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        self.log(self.mode, "row_logp", row_logps.mean().item())
        advantages = self.args.toy_advantage_scale * inputs["advantages"]
        return -(advantages * row_logps).mean() / self.accumulation(self.mode)
