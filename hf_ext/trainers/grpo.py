"""``GRPOConfig`` / ``GRPOTrainer``: TRL's GRPO with hf_ext's policy losses as extra ``loss_type`` values.

Every loss type TRL accepts runs unchanged through TRL's own code. The hf_ext loss types are listed once, in
``HF_EXT_LOSS_TYPES``; the config validates ``loss_type`` against both lists before any model is loaded.

``loss_type="ba"`` (Balanced Aggregation, arXiv 2605.04077; math in ``hf_ext.losses.ba``): the clipped surrogate
is linear in a positive rescaling of the advantage, so BA is TRL's ``grpo`` path run with
``A_i * |o_i| / Lbar_{s(i)}``, where ``Lbar`` is the mean loss-token length of the row's same-sign peers (and
``A_i * 0`` for ties, which BA leaves out). That scale is computed at generation time from *global* group
statistics (gathered lengths and advantages) and carried per row, so the loss is exact under TRL's row shuffling,
gradient accumulation and any number of processes.
"""

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import trl
from accelerate.utils import gather

from ..losses.ba import ba_group_metrics, ba_row_weights


TRL_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16
HF_EXT_LOSS_TYPES = {  # loss_type -> the paper it implements (used by the config's check and the model card)
    "ba": {
        "title": "Balanced Aggregation: Understanding and Fixing Aggregation Bias in GRPO",
        "id": "2605.04077",
        "citation": """\
@article{zeng2026balanced,
    title   = {{Balanced Aggregation: Understanding and Fixing Aggregation Bias in GRPO}},
    author  = {Zhiyuan Zeng and Jiameng Huang and Zhangyue Yin and Jiashuo Liu and Ziniu Li and Bingrui Li and
               Yuhao Wu and Yining Zheng and Ge Zhang and Wenhao Huang and Xipeng Qiu},
    journal = {arXiv preprint arXiv:2605.04077},
    year    = {2026}
}""",
    },
}


@dataclass
class GRPOConfig(trl.GRPOConfig):
    r"""
    TRL's [`trl.GRPOConfig`] with hf_ext's loss types. Every TRL field keeps its meaning and default.

    Parameters:
        loss_type (`str`, *optional*, defaults to `"dapo"`):
            Any TRL loss type (`grpo`, `dr_grpo`, `dapo`, `bnpo`, `cispo`, `sapo`, `luspo`, `vespo`) or an hf_ext
            one: `"ba"` (Balanced Aggregation, arXiv 2605.04077).
        ba_sign_tolerance (`float`, *optional*, defaults to `1e-6`):
            With `loss_type="ba"`, rows whose advantage is within this distance of 0 belong to neither sign subset.
    """

    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "Policy loss. TRL's: " + ", ".join(TRL_LOSS_TYPES) + ". hf_ext's: 'ba' (Balanced Aggregation, "
            "arXiv 2605.04077: positive and negative completions of a group are token-averaged separately and "
            "weighted by their share of the group)."
        },
    )
    ba_sign_tolerance: float = field(
        default=1e-6,
        metadata={
            "help": "BA: rows with |advantage| <= this value belong to neither the positive nor the negative "
            "subset of their group."
        },
    )

    def __post_init__(self):
        allowed = (*TRL_LOSS_TYPES, *HF_EXT_LOSS_TYPES)
        if self.loss_type not in allowed:
            raise ValueError(f"loss_type={self.loss_type!r} is not known; allowed values: {', '.join(allowed)}.")
        if self.loss_type == "ba":
            for name in ("num_generations", "num_generations_eval"):
                value = getattr(self, name)
                if value is not None and value < 2:
                    raise ValueError(
                        f"loss_type='ba' compares completions within a group: {name} must be >= 2, got {value}."
                    )
            if not (0 <= self.ba_sign_tolerance < math.inf):
                raise ValueError(f"ba_sign_tolerance must be a finite number >= 0, got {self.ba_sign_tolerance}.")
        super().__post_init__()


def _require_finite_rewards(reward_func, name: str):
    """Wrap a synchronous reward function so a NaN or infinite reward raises instead of training on it.

    ``None`` stays TRL's way of marking a completion unscorable.
    """

    @functools.wraps(reward_func)
    def checked(*args, **kwargs):
        rewards = reward_func(*args, **kwargs)
        bad = [(i, r) for i, r in enumerate(rewards) if r is not None and not math.isfinite(r)]
        if bad:
            index, value = bad[0]
            raise ValueError(
                f"reward_funcs: '{name}' returned a non-finite reward ({value}) for completion {index} "
                f"({len(bad)} in this batch). Return a finite float, or None to mark a completion unscorable."
            )
        return rewards

    return checked


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's [`trl.GRPOTrainer`] that also runs hf_ext's loss types. Use with [`hf_ext.GRPOConfig`]."""

    _tag_names = ["trl", "grpo", "hf_ext"]

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = GRPOConfig(f"{model_name.split('/')[-1]}-GRPO")
        if args.loss_type in HF_EXT_LOSS_TYPES and not isinstance(args, GRPOConfig):
            raise TypeError(
                f"loss_type={args.loss_type!r} needs hf_ext.GRPOConfig, got {type(args).__module__}."
                f"{type(args).__name__}: build the config with `from hf_ext import GRPOConfig`."
            )
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)
        self.reward_funcs = [
            func
            if isinstance(func, torch.nn.Module) or trl.trainer.grpo_trainer.is_async_callable(func)
            else _require_finite_rewards(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        if self.loss_type in HF_EXT_LOSS_TYPES:
            self._tag_names = [*self._tag_names, self.loss_type]
            self._paper = HF_EXT_LOSS_TYPES[self.loss_type]

    @contextmanager
    def _run_as_loss_type(self, loss_type: str):
        """Let TRL's loss code run one of its own loss types for the duration of a call."""
        own, self.loss_type = self.loss_type, loss_type
        try:
            yield
        finally:
            self.loss_type = own

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.loss_type == "ba":
            output["ba_advantage_scale"] = self._ba_advantage_scale(output)
        return output

    def _compute_loss(self, model, inputs):
        if self.loss_type != "ba":
            return super()._compute_loss(model, inputs)
        inputs = {**inputs, "advantages": inputs["advantages"] * inputs["ba_advantage_scale"]}
        with self._run_as_loss_type("grpo"):
            return super()._compute_loss(model, inputs)

    def _ba_advantage_scale(self, output) -> torch.Tensor:
        """Per local row, |o_i| / Lbar_{s(i)} (0 for ties) from the global group statistics; logs BA's weights."""
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        loss_mask = output["completion_mask"]
        if "tool_mask" in output:
            loss_mask = loss_mask * output["tool_mask"]
        lengths = loss_mask.sum(1).float()
        all_lengths, all_advantages = gather(lengths), gather(output["advantages"].float())
        tolerance = self.args.ba_sign_tolerance
        weights = ba_row_weights(all_lengths, all_advantages, num_generations, tolerance)
        first_row = self.accelerator.process_index * len(lengths)
        scale = lengths.double() * weights[first_row : first_row + len(lengths)]
        for name, value in ba_group_metrics(all_lengths, all_advantages, num_generations, tolerance).items():
            self._metrics[mode][f"ba/{name}"].append(value)
        return scale.to(output["advantages"].dtype)
