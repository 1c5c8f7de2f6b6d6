"""GTPO (arXiv 2508.03772) as a GRPO loss; math in ``hf_ext.losses.gtpo``.

Generation time: completion ids and masks of all processes are gathered (padded to one width), the conflict weights
lambda of every group are computed on the device, and each process keeps its rows. Loss time: the mean entropy of
each completion under the current policy decides the entropy filter and shapes the advantage,
A'_i = delta_i * (A_i - gamma * Hbar_i); the token advantage A'_i * lambda_{i,t} goes through GRPO's clipped
objective (``ClippedGRPOLoss``: mean of row means, exact under any row layout) with token-level ratios, TRL's clip
range, ``delta`` and vLLM correction. No reference model: beta = 0.

H_ini, the model's initial mean entropy that decides whether the filter is on (``gtpo_filter_mode="auto"``), is
``gtpo_initial_entropy`` when given, else measured on the first training micro-batch (never on evaluation data) as
the token-weighted mean over all processes, kept for the run and saved with its checkpoints, so a resumed run
decides as the uninterrupted one.
"""

import math
from dataclasses import dataclass, field

import torch

from .. import papers
from ..losses.gtpo import (
    COMBINES,
    conflict_runs,
    conflict_weights,
    entropy_filter,
    gtpo_metrics,
    mean_entropy,
    shaped_advantages,
)
from .grpo_clipped import ClippedGRPOLoss
from .grpo_loss import check, check_choice, check_finite, register_grpo_loss


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
    gtpo_divide_by_num_conflicts: bool = field(
        default=False,
        metadata={
            "help": "GTPO: divide each completion's loss by max(1, its number of conflict tokens), as the official "
            "code does (the paper's formula does not)."
        },
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


@register_grpo_loss
class GTPO(ClippedGRPOLoss):
    name = "gtpo"
    title = "GTPO"
    papers = (papers.GTPO,)
    settings = GTPOSettings
    supported_options = frozenset({"clip range", "two-sided clip", "vLLM importance-sampling correction"})
    refused_options = {
        "sequence-level ratio": "GTPO weights each token's ratio by its conflict weight lambda, so the ratio is "
        "per token.",
        "KL to a reference model": "GTPO is defined without a KL term or reference model.",
        "top-entropy token mask": "GTPO chooses its tokens itself (conflict weights, entropy filter).",
        "off-policy sequence mask": "GTPO chooses its tokens itself (conflict weights, entropy filter).",
    }

    def __init__(self, trainer):
        super().__init__(trainer)
        self.initial_entropy: float | None = self.args.gtpo_initial_entropy  # H_ini, once known

    def prepare(self, output: dict, mode: str) -> None:
        """Adds ``gtpo_lambda`` (B, T): the conflict weights of the local rows, computed over whole groups, and with
        ``gtpo_divide_by_num_conflicts`` their numbers of conflict tokens ``gtpo_num_conflicts`` (B,)."""
        ids, mask = output["completion_ids"], output["completion_mask"]  # tool output keeps its positions
        accelerator = self.trainer.accelerator
        all_ids = self.gather(accelerator.pad_across_processes(ids, dim=1, pad_index=0))
        all_mask = self.gather(accelerator.pad_across_processes(mask, dim=1, pad_index=0))
        all_advantages = self.gather(output["advantages"].float())
        group_size, tolerance = self.group_size(mode), self.args.gtpo_sign_tolerance
        runs = conflict_runs(all_ids, all_mask, all_advantages, group_size, tolerance)
        weights = conflict_weights(
            all_ids,
            all_mask,
            all_advantages,
            group_size,
            self.args.gtpo_conflict_weight,
            self.args.gtpo_conflict_combine,
            tolerance,
            runs=runs,
        )
        local = self.local_rows(len(ids))
        output["gtpo_lambda"] = weights[local, : ids.shape[1]]
        if self.args.gtpo_divide_by_num_conflicts:
            output["gtpo_num_conflicts"] = (runs[0] | runs[1]).sum(-1)[local].to(weights.dtype)

    def filter_on(self, entropies: torch.Tensor, mask: torch.Tensor, mode: str) -> bool:
        """Whether the entropy filter is on: by ``gtpo_filter_mode``, or for "auto" iff H_ini < threshold. H_ini is
        measured on the first training micro-batch and kept; an evaluation before it decides on its own batch's mean
        entropy without keeping it."""
        if self.args.gtpo_filter_mode != "auto":
            return self.args.gtpo_filter_mode == "always"
        initial_entropy = self.initial_entropy
        if initial_entropy is None:
            reduce = self.trainer.accelerator.reduce
            totals = reduce(torch.stack([(entropies * mask).sum(), mask.sum()]).double(), "sum")
            initial_entropy = (totals[0] / totals[1].clamp(min=1)).item()
            if mode == "train":
                self.initial_entropy = initial_entropy
        return initial_entropy < self.args.gtpo_entropy_threshold

    def state_dict(self) -> dict:
        return {} if self.initial_entropy is None else {"initial_entropy": self.initial_entropy}

    def load_state_dict(self, state: dict) -> None:
        """H_ini as measured by the interrupted run (a given ``gtpo_initial_entropy`` still wins)."""
        unknown = set(state) - {"initial_entropy"}
        if unknown:
            raise ValueError(f"loss_type='gtpo': unknown state {sorted(unknown)} in the checkpoint.")
        if self.args.gtpo_initial_entropy is None and "initial_entropy" in state:
            self.initial_entropy = float(state["initial_entropy"])

    def advantages(self, inputs: dict, entropies: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """A'_i * lambda_{i,t} (B, T); logs GTPO's metrics."""
        args, advantages = self.args, inputs["advantages"]
        hbar = mean_entropy(entropies, mask)
        filter_on = self.filter_on(entropies.detach(), mask, mode)
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
        token_advantages = shaped[:, None] * inputs["gtpo_lambda"]
        if "gtpo_num_conflicts" in inputs:  # a positive factor per row: it scales that row's surrogate alike
            token_advantages = token_advantages / inputs["gtpo_num_conflicts"].clamp(min=1)[:, None]
        return token_advantages
