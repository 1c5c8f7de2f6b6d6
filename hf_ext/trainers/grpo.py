"""``GRPOConfig`` / ``GRPOTrainer``: TRL's GRPO with hf_ext's policy losses as extra ``loss_type`` values.

Every loss type TRL accepts runs unchanged through TRL's own code. hf_ext's loss types are listed once, in
``HF_EXT_LOSS_TYPES`` (paper, generation-time step, loss), and the config checks ``loss_type`` and each method's
fields before any model is loaded. Each method's wiring lives in its own mixin: ``grpo_ba``, ``grpo_real``,
``grpo_gtpo``; their math in ``hf_ext.losses``.
"""

import functools
import json
import math
import numbers
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import trl
from trl.trainer.grpo_trainer import is_async_callable

from .. import papers
from ..papers import Paper
from .adapter_args import adapter_peft_config, apply_adapter_switches
from .arguments import HfExtArguments
from .card import ModelCardMixin
from .checkpoints import CheckpointMixin
from .grpo_ba import BalancedAggregationMixin
from .grpo_gtpo import GTPOMixin
from .grpo_real import REAL_VARIANTS, RewardsAsLabelsMixin
from .optim_args import OptimizerMixin
from .trl_compat import trl_loss_types


@dataclass(frozen=True)
class LossType:
    """An hf_ext loss type: its paper (for the model card) and the trainer methods that run it."""

    paper: Paper
    prepare: str  # trainer method adding per-row tensors at generation time, from whole groups
    loss: str  # trainer method computing the micro-batch loss


HF_EXT_LOSS_TYPES = {
    "ba": LossType(papers.BA, prepare="_prepare_ba", loss="_ba_loss"),
    "real": LossType(papers.REAL, prepare="_prepare_real", loss="_real_loss"),
    "real_bce": LossType(papers.REAL, prepare="_prepare_real", loss="_real_loss"),
    "gtpo": LossType(papers.GTPO, prepare="_prepare_gtpo", loss="_gtpo_loss"),
}
GTPO_FILTER_MODES = ("auto", "always", "never")
GTPO_COMBINES = ("product", "union")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class GRPOConfig(HfExtArguments, trl.GRPOConfig):
    r"""
    TRL's [`trl.GRPOConfig`] with hf_ext's loss types. Every TRL field keeps its meaning and default.

    Parameters:
        loss_type (`str`, *optional*, defaults to `"dapo"`):
            Any loss type of the installed TRL (read from it: `grpo`, `dapo`, `cispo`, ... ) or an hf_ext one:
            `"ba"` (Balanced Aggregation, arXiv 2605.04077), `"real"` / `"real_bce"` (Rewards as Labels, arXiv
            2602.05630), `"gtpo"` (arXiv 2508.03772).
        ba_sign_tolerance (`float`, *optional*, defaults to `1e-6`):
            BA: rows whose advantage is within this distance of 0 belong to neither sign subset.
        real_tau (`float`, *optional*, defaults to `0.5`):
            REAL: temperature of the sequence scores; each row's gradient weight is bounded by 1/tau.
        real_variant (`str`, *optional*, defaults to `"anchor"`):
            REAL: `"anchor"` (equation (8), each label set against a fixed logit 0) or `"product"` (pairwise).
        real_sign_tolerance (`float`, *optional*, defaults to `1e-6`):
            REAL: rows with |advantage| <= this are unlabelled; BCE positives are within this of the group best.
        gtpo_conflict_weight (`float`, *optional*, defaults to `2.0`):
            GTPO: weight of conflict tokens in positive completions (negative ones get 0).
        gtpo_conflict_combine (`str`, *optional*, defaults to `"product"`):
            GTPO: a token in both the prefix and the suffix run weighs `w**2` (`"product"`) or `w` (`"union"`).
        gtpo_entropy_penalty (`float`, *optional*, defaults to `0.1`):
            GTPO: gamma in A' = delta * (A - gamma * mean entropy).
        gtpo_entropy_threshold (`float`, *optional*, defaults to `ln 2`):
            GTPO: completions whose mean entropy exceeds this are filtered out when the filter is on.
        gtpo_filter_mode (`str`, *optional*, defaults to `"auto"`):
            GTPO: `"auto"` (on iff the initial entropy H_ini is below the threshold), `"always"` or `"never"`.
        gtpo_initial_entropy (`float` or `None`, *optional*, defaults to `None`):
            GTPO: H_ini for `"auto"`; `None` measures it on the first training micro-batch.
        gtpo_filter_only_negative (`bool`, *optional*, defaults to `False`):
            GTPO: filter only negative-advantage completions ("OnlyNeg" ablation).
        gtpo_shape_zero_adv (`bool`, *optional*, defaults to `True`):
            GTPO: zero-advantage completions also get -gamma * mean entropy (as the official code).
        gtpo_sign_tolerance (`float`, *optional*, defaults to `1e-6`):
            GTPO: rows with |advantage| <= this are neither positive nor negative partners.
        use_allora (`bool`, *optional*, defaults to `False`):
            Train the LoRA adapter (``peft_config``) with ALLoRA, arXiv 2410.09692.
        allora_eta (`float`, *optional*, defaults to `2.0`):
            ALLoRA's eta: the gradient scale of an output row while it is zero.
        dora_impl (`str`, *optional*, defaults to `"fused"`):
            With DoRA (`use_dora=True` in the LoRA config): `"fused"` for hf_ext's factored weight norm, `"peft"`
            for PEFT's own.
        optim (`str`):
            Any Transformers optimizer, or `"hf_ext_adamw_4bit"` / `"hf_ext_adamw_4bit_factor"` (4-bit AdamW states,
            arXiv 2309.01507) with `optim_args` keys `block_size`, `min_quantized_numel`, `nonfinite_grads`.
    """

    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "Policy loss. TRL's: " + ", ".join(trl_loss_types() or ["those of the installed TRL"]) + ". "
            "hf_ext's: 'ba' (Balanced Aggregation, "
            "arXiv 2605.04077), 'real' and 'real_bce' (Rewards as Labels, arXiv 2602.05630), 'gtpo' (arXiv "
            "2508.03772)."
        },
    )
    ba_sign_tolerance: float = field(
        default=1e-6, metadata={"help": "BA: rows with |advantage| <= this belong to neither sign subset."}
    )
    real_tau: float = field(default=0.5, metadata={"help": "REAL: score temperature (> 0); gradients <= 1/tau."})
    real_variant: str = field(
        default="anchor", metadata={"help": "REAL: 'anchor' (paper's equation (8)) or 'product' (pairwise)."}
    )
    real_sign_tolerance: float = field(
        default=1e-6, metadata={"help": "REAL: rows with |advantage| <= this are unlabelled."}
    )
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

    def __post_init__(self):
        self._check_loss_type()
        if self.loss_type in HF_EXT_LOSS_TYPES:
            for name in ("num_generations", "num_generations_eval"):
                value = getattr(self, name)
                _check(
                    value is None or value >= 2,
                    f"loss_type={self.loss_type!r} compares completions within a "
                    f"group: {name} must be >= 2, got {value}.",
                )
        super().__post_init__()  # HfExtArguments', then TRL's
        for name in ("ba_sign_tolerance", "real_sign_tolerance", "gtpo_sign_tolerance"):
            value = getattr(self, name)
            _check(0 <= value < math.inf, f"{name} must be a finite number >= 0, got {value}.")
        if self.loss_type.startswith("real"):
            self._check_real()
        if self.loss_type == "gtpo":
            self._check_gtpo()

    def _check_loss_type(self) -> None:
        """hf_ext's loss types and the installed TRL's pass; where TRL's cannot be read, TRL gets the name, warned."""
        trl_names = trl_loss_types()
        if self.loss_type in HF_EXT_LOSS_TYPES or (trl_names and self.loss_type in trl_names):
            return
        if trl_names is None:
            warnings.warn(
                f"loss_type={self.loss_type!r} is no hf_ext loss type, and the loss types of the installed TRL "
                f"({trl.__version__}) could not be read from its source: passing it to TRL unchecked (TRL fails at "
                "the first loss call if it does not know it).",
                stacklevel=3,
            )
            return
        allowed = (*trl_names, *HF_EXT_LOSS_TYPES)
        raise ValueError(
            f"loss_type={self.loss_type!r} is not known; allowed values: {', '.join(allowed)} "
            f"(TRL {trl.__version__}'s, then hf_ext's)."
        )

    def _check_real(self) -> None:
        """REAL's fields and, for ``"real"``, the on-policy layout. Runs after TRL's ``__post_init__`` (which
        derives ``steps_per_generation``) and after ``HfExtArguments``' range checks, which leave it and
        ``num_iterations`` >= 1."""
        _check(0 < self.real_tau < math.inf, f"real_tau must be a finite number > 0, got {self.real_tau}.")
        _check(
            self.real_variant in REAL_VARIANTS,
            f"real_variant={self.real_variant!r} is not known; allowed values: {', '.join(REAL_VARIANTS)}.",
        )
        generate_every = self.steps_per_generation * self.num_iterations
        _check(
            self.loss_type == "real_bce" or self.gradient_accumulation_steps % generate_every == 0,
            "loss_type='real' is exact only on-policy (a group's rows meet in one log-sum-exp, but TRL spreads "
            "them over micro-batches): gradient_accumulation_steps must be a multiple of steps_per_generation * "
            f"num_iterations, got {self.gradient_accumulation_steps} and {self.steps_per_generation} * "
            f"{self.num_iterations}. Leave steps_per_generation unset and num_iterations=1, or use "
            "loss_type='real_bce', which is exact off-policy.",
        )
        self._check_sequence_level_switches("REAL scores whole sequences")

    def _check_gtpo(self) -> None:
        _check(
            self.gtpo_filter_mode in GTPO_FILTER_MODES,
            f"gtpo_filter_mode={self.gtpo_filter_mode!r} is not "
            f"known; allowed values: {', '.join(GTPO_FILTER_MODES)}.",
        )
        _check(
            self.gtpo_conflict_combine in GTPO_COMBINES,
            f"gtpo_conflict_combine={self.gtpo_conflict_combine!r} "
            f"is not known; allowed values: {', '.join(GTPO_COMBINES)}.",
        )
        for name, low in (("gtpo_conflict_weight", 0.0), ("gtpo_entropy_penalty", 0.0)):
            value = getattr(self, name)
            _check(low <= value < math.inf, f"{name} must be a finite number >= {low}, got {value}.")
        _check(
            0 < self.gtpo_entropy_threshold < math.inf,
            f"gtpo_entropy_threshold must be a finite number > 0, got {self.gtpo_entropy_threshold}.",
        )
        _check(
            self.gtpo_initial_entropy is None or 0 <= self.gtpo_initial_entropy < math.inf,
            f"gtpo_initial_entropy must be None or a finite number >= 0, got {self.gtpo_initial_entropy}.",
        )
        _check(
            self.beta == 0.0,
            f"loss_type='gtpo' is defined without a KL term or reference model: beta must be 0.0, got {self.beta}.",
        )
        self._check_sequence_level_switches("GTPO weights tokens itself")

    def _check_sequence_level_switches(self, reason: str) -> None:
        """TRL switches that REAL and GTPO do not define: refused, or ignored with a warning."""
        _check(
            self.top_entropy_quantile == 1.0 and self.off_policy_mask_threshold is None,
            f"loss_type={self.loss_type!r}: {reason}; top_entropy_quantile must be 1.0 and "
            "off_policy_mask_threshold None.",
        )
        _check(self.beta == 0.0, f"loss_type={self.loss_type!r} has no KL term: beta must be 0.0, got {self.beta}.")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            warnings.warn(
                f"loss_type={self.loss_type!r} ignores the vLLM importance-sampling correction.", stacklevel=3
            )
        if self.importance_sampling_level != "token":
            warnings.warn(
                f"loss_type={self.loss_type!r} ignores importance_sampling_level={self.importance_sampling_level!r}: "
                "REAL scores whole sequences already and GTPO clips token ratios.",
                stacklevel=3,
            )


REWARD_FAULT_BATCH = "reward_fault_batch_process{}.json"  # in output_dir, one per process


def _as_float32(reward) -> float:
    """``reward`` as TRL stores it, in float32: +-inf where its magnitude is beyond float32's range (1e39)."""
    try:
        value = float(reward)
    except OverflowError:  # an int beyond float64's range
        return math.inf if reward > 0 else -math.inf
    return torch.tensor(value, dtype=torch.float32).item()


def _reward_output_fault(output, rewards) -> str | None:
    """None when ``rewards`` (``output`` of a reward function, arrays and tensors as lists) is what TRL can train on: a
    list or tuple holding per completion a real number that stays finite in float32, or None (unscorable). Otherwise
    what is wrong, naming the first bad completion."""
    if not isinstance(rewards, list | tuple):
        return f"returned a {type(output).__name__} ({output!r:.80}) instead of a list with one reward per completion"
    not_numbers = [(i, r) for i, r in enumerate(rewards) if r is not None and not isinstance(r, numbers.Real)]
    if not_numbers:
        index, value = not_numbers[0]
        return (
            f"returned a {type(value).__name__} ({value!r:.80}) for completion {index} ({len(not_numbers)} such in "
            "this batch)"
        )
    non_finite = [(i, r) for i, r in enumerate(rewards) if r is not None and not math.isfinite(_as_float32(r))]
    if non_finite:
        index, value = non_finite[0]
        return (
            f"returned a non-finite reward ({value!r:.40}; {_as_float32(value)} as float32, TRL's reward dtype) for "
            f"completion {index} ({len(non_finite)} such in this batch)"
        )
    return None


class GRPOTrainer(
    BalancedAggregationMixin,
    RewardsAsLabelsMixin,
    GTPOMixin,
    OptimizerMixin,
    ModelCardMixin,
    CheckpointMixin,
    trl.GRPOTrainer,
):
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
        hf_ext_args = isinstance(args, GRPOConfig)  # a plain trl.GRPOConfig runs TRL's loss types unchanged
        if hf_ext_args:
            kwargs["peft_config"] = adapter_peft_config(args, model, kwargs.get("peft_config"))
            if args.use_allora:
                self._tag_names = [*self._tag_names, "allora"]
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)
        if hf_ext_args:
            apply_adapter_switches(args, self.model)
        self.reward_funcs = [
            func if isinstance(func, torch.nn.Module) else self._checked_reward_func(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        if self._hf_ext_loss is not None:
            self._tag_names = [*self._tag_names, self.loss_type]
            self._paper = self._hf_ext_loss.paper.as_trl()

    # Rewards that would teach nothing are refused, with the batch saved to reproduce them.

    def _checked_reward_func(self, func, name: str):
        """``func`` (synchronous or async, as TRL calls it) returning its rewards once ``_check_reward_output``
        accepts them."""
        if is_async_callable(func):

            @functools.wraps(func)
            async def checked(*args, **kwargs):
                return self._check_reward_output(name, await func(*args, **kwargs), kwargs)

        else:

            @functools.wraps(func)
            def checked(*args, **kwargs):
                return self._check_reward_output(name, func(*args, **kwargs), kwargs)

        return checked

    def _check_reward_output(self, name: str, output, call: dict) -> list:
        """What reward function ``name`` returned for the call with keyword arguments ``call``, as a list, when TRL
        can train on it (``_reward_output_fault``); otherwise saves the batch (``_save_reward_batch``) and raises
        ``ValueError`` naming the function, the first bad completion and the file."""
        rewards = output.tolist() if isinstance(output, torch.Tensor | np.ndarray) else output
        fault = _reward_output_fault(output, rewards)
        if fault is None:
            return list(rewards)
        self._save_reward_batch(call.get("prompts"), call.get("completions"), {name: rewards})
        raise ValueError(
            f"reward_funcs: '{name}' {fault}. Return a list with one finite float (within +-3.4e38) per completion, "
            "or None for a completion it cannot score. This process's batch (prompts, completions, rewards) is "
            f"saved in {self._reward_batch_path(self.accelerator.process_index)}."
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (completions of all processes x reward functions), refused where they would teach nothing: a
        reward model's non-finite score, or None from every function for every completion (TRL would zero every
        advantage). What each reward function returns is checked as it returns (``_check_reward_output``). Every
        process sees the same gathered rewards, so all raise together; each saves its own batch."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        models = [i for i, func in enumerate(self.reward_funcs) if isinstance(func, torch.nn.Module)]
        bad_scores = (~torch.isfinite(rewards[:, models])).nonzero()
        unscored = bool(rewards.isnan().all())
        if not (len(bad_scores) or unscored):
            return rewards
        local = rewards[self._local_rows(len(prompts))].T.tolist()  # NaN: None, or a reward model's NaN
        self._save_reward_batch(prompts, completions, dict(zip(self.reward_func_names, local, strict=True)))
        if len(bad_scores):
            row, column = bad_scores[0].tolist()
            process, index = divmod(row, len(prompts))
            raise ValueError(
                f"reward_funcs: reward model '{self.reward_func_names[models[column]]}' scored completion {index} "
                f"{rewards[row, models[column]].item()} ({len(bad_scores)} non-finite scores in this batch); a "
                "reward model has no way to mark a completion unscorable. Check its weights and score head (and "
                f"the dtype it runs in). The batch is saved in {self._reward_batch_path(process)}."
            )
        raise ValueError(
            f"reward_funcs: every reward function ({', '.join(self.reward_func_names)}) returned None for all "
            f"{len(rewards)} completions of this batch: with nothing scored, every advantage is 0 and the step "
            "teaches nothing. None marks a completion a function cannot score; return a number for those it can. "
            f"This process's batch is saved in {self._reward_batch_path(self.accelerator.process_index)}."
        )

    def _reward_batch_path(self, process: int) -> str:
        return os.path.join(self.args.output_dir, REWARD_FAULT_BATCH.format(process))

    def _save_reward_batch(self, prompts, completions, rewards: dict) -> None:
        """This process's batch as JSON in output_dir, to reproduce a reward fault: the global step, the prompts,
        the completions and ``rewards`` (reward function name -> its rewards for them, as returned or as TRL stored
        them: NaN for None)."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        batch = {"step": self.state.global_step, "prompts": prompts, "completions": completions, "rewards": rewards}
        with open(self._reward_batch_path(self.accelerator.process_index), "w") as handle:
            json.dump(batch, handle, indent=1, default=repr)

    @property
    def _hf_ext_loss(self) -> LossType | None:
        """The hf_ext loss type in force, derived from ``loss_type`` (which ``_run_as_loss_type`` swaps)."""
        return HF_EXT_LOSS_TYPES.get(self.loss_type)

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
        if self._hf_ext_loss is not None:
            mode = "train" if self.model.training else "eval"
            getattr(self, self._hf_ext_loss.prepare)(output, mode)
        return output

    def _compute_loss(self, model, inputs):
        if self._hf_ext_loss is None:
            return super()._compute_loss(model, inputs)
        return getattr(self, self._hf_ext_loss.loss)(model, inputs)

    # Helpers shared by the loss mixins.

    def _group_size(self, mode: str) -> int:
        return self.num_generations if mode == "train" else self.num_generations_eval

    def _local_rows(self, num_local: int) -> slice:
        """This process's rows in a tensor gathered over processes (process-major, as TRL lays them out)."""
        first = self.accelerator.process_index * num_local
        return slice(first, first + num_local)

    @staticmethod
    def _loss_mask(inputs: dict) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def _policy_logps(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token log-probs, entropies, loss mask) of the completions under the current policy."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
        )
        mask = self._loss_mask(inputs)
        self._metrics["train" if self.model.training else "eval"]["entropy"].append(
            self.accelerator.gather((entropies.detach() * mask).sum() / mask.sum().clamp(min=1)).mean().item()
        )
        return per_token_logps, entropies, mask
