"""``GRPOConfig`` / ``GRPOTrainer``: TRL's GRPO with the registered ``GRPOLoss`` classes as extra ``loss_type``
values.

Every loss type TRL accepts runs unchanged through TRL's own code. A registered loss (``grpo_loss``; hf_ext's own
are ``grpo_ba``, ``grpo_real`` and ``grpo_gtpo``) brings its config fields, which ``GRPOConfig`` grows when the loss
registers, and its checks, which run before any model is loaded; the trainer hands the generation-time step and the
micro-batch loss to the loss object (``GRPOTrainer.grpo_loss``).
"""

import functools
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import trl

from . import grpo_ba, grpo_gtpo, grpo_real  # noqa: F401 (hf_ext's losses register themselves)
from .adapter_args import adapter_peft_config, apply_adapter_switches
from .arguments import HfExtArguments
from .checkpoints import CheckpointMixin
from .grpo_loss import GRPOLoss, attach_config, check, grpo_loss_class, grpo_losses, local_rows
from .grpo_options import check_trl_options
from .model_card import ModelCardMixin
from .optim_args import OptimizerMixin
from .trl_compat import is_async_callable, trl_loss_types


def _loss_type_help() -> str:
    trl_names = ", ".join(trl_loss_types() or ["those of the installed TRL"])
    own = ", ".join(
        f"'{name}' ({cls.title or cls.__name__}" + "".join(f", arXiv {p.arxiv_id}" for p in cls.papers) + ")"
        for name, cls in grpo_losses().items()
    )
    return f"Policy loss. TRL's: {trl_names}. hf_ext's registered losses: {own}."


@dataclass
class GRPOConfig(HfExtArguments, trl.GRPOConfig):
    r"""
    TRL's [`trl.GRPOConfig`] with hf_ext's loss types. Every TRL field keeps its meaning and default.

    Parameters:
        loss_type (`str`, *optional*, defaults to `"dapo"`):
            Any loss type of the installed TRL (read from it: `grpo`, `dapo`, `cispo`, ... ) or a registered
            `GRPOLoss`: hf_ext's `"ba"` (Balanced Aggregation, arXiv 2605.04077), `"real"` / `"real_bce"` (Rewards as
            Labels, arXiv 2602.05630), `"gtpo"` (arXiv 2508.03772), and any loss a user registers.
        <loss fields>:
            Each registered loss adds its own fields, prefixed with its name (``ba_*``, ``real_*``, ``gtpo_*``);
            their help is in the loss's settings dataclass (``hf_ext.trainers.grpo_ba.BASettings``, ...).
        use_allora, allora_eta, dora_impl, optim, overwrite_output_dir:
            hf_ext's switches shared by its training configs: see [`hf_ext.trainers.arguments.HfExtArguments`].
    """

    loss_type: str = field(default="dapo", metadata={"help": "Policy loss (help text set by attach_config)."})

    def __post_init__(self):
        self._check_loss_type()
        loss = grpo_loss_class(self.loss_type)
        if loss is not None:
            for name in ("num_generations", "num_generations_eval"):
                value = getattr(self, name)
                check(
                    value is None or value >= 2,
                    f"loss_type={self.loss_type!r} compares completions within a "
                    f"group: {name} must be >= 2, got {value}.",
                )
        super().__post_init__()  # HfExtArguments', then TRL's
        if loss is not None and hasattr(loss.settings, "check"):
            loss.settings.check(self)
        if loss is not None:
            check_trl_options(self, loss)

    def _check_loss_type(self) -> None:
        """hf_ext's loss types and the installed TRL's pass; where TRL's cannot be read, TRL gets the name, warned."""
        trl_names = trl_loss_types()
        if grpo_loss_class(self.loss_type) is not None or (trl_names and self.loss_type in trl_names):
            return
        if trl_names is None:
            warnings.warn(
                f"loss_type={self.loss_type!r} is no registered hf_ext loss, and the loss types of the installed TRL "
                f"({trl.__version__}) could not be read from its source: passing it to TRL unchecked (TRL fails at "
                "the first loss call if it does not know it).",
                stacklevel=3,
            )
            return
        allowed = (*trl_names, *grpo_losses())
        raise ValueError(
            f"loss_type={self.loss_type!r} is not known; allowed values: {', '.join(allowed)} "
            f"(TRL {trl.__version__}'s, then the registered hf_ext losses)."
        )


attach_config(GRPOConfig, _loss_type_help)

GROUP_SIZE_KEY = "hf_ext_group_size"  # marks a generation batch folded by groups


def fold_groups(output: dict, group_size: int) -> dict:
    """TRL's generation ``output`` with every per-row value grouped: a tensor (B, ...) becomes (B / G, G, ...), a
    list of B items a list of B / G tuples; 0-d tensors and None stay. TRL's shuffle and split of the generation
    batch then move whole groups; ``unfold_groups`` undoes it for the loss."""
    num_rows = len(output["completion_ids"])
    if num_rows % group_size:
        raise ValueError(f"a generation batch of {num_rows} rows does not hold whole groups of {group_size}.")
    folded = {}
    for key, value in output.items():
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            folded[key] = value
        elif len(value) != num_rows:
            raise ValueError(
                f"the generation batch's {key!r} has {len(value)} rows for {num_rows} completions: it cannot be "
                "grouped. Whole-group losses (loss_type='real' off-policy) take inputs with one row per completion; "
                "train on-policy with such inputs (steps_per_generation unset, num_iterations=1)."
            )
        elif isinstance(value, torch.Tensor):
            folded[key] = value.reshape(num_rows // group_size, group_size, *value.shape[1:])
        else:
            folded[key] = [tuple(value[i : i + group_size]) for i in range(0, num_rows, group_size)]
    folded[GROUP_SIZE_KEY] = torch.tensor(group_size)  # last: TRL sizes the batch by its first value
    return folded


def unfold_groups(inputs: dict) -> dict:
    """The inverse of ``fold_groups`` for one micro-batch: rows of a group consecutive, groups in shuffled order."""
    unfolded = {}
    for key, value in inputs.items():
        if key == GROUP_SIZE_KEY:
            continue
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            unfolded[key] = value
        elif isinstance(value, torch.Tensor):
            unfolded[key] = value.reshape(-1, *value.shape[2:])
        else:
            unfolded[key] = [item for group in value for item in group]
    return unfolded


REWARD_FAULT_BATCH = "reward_fault_batch_process{}.json"  # in output_dir, one per process
LOSS_STATE = "hf_ext_loss_state.json"  # in each checkpoint, when the loss keeps state


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
    OptimizerMixin,
    ModelCardMixin,
    CheckpointMixin,
    trl.GRPOTrainer,
):
    """TRL's [`trl.GRPOTrainer`] that also runs the registered hf_ext losses. Use with [`hf_ext.GRPOConfig`].

    ``grpo_loss`` is the loss object in force (None for TRL's own loss types).
    """

    _tag_names = ["trl", "grpo", "hf_ext"]
    grpo_loss: GRPOLoss | None = None

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config.name_or_path
            args = GRPOConfig(f"{model_name.split('/')[-1]}-GRPO")
        loss_cls = grpo_loss_class(args.loss_type)
        if loss_cls is not None and not isinstance(args, GRPOConfig):
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
        if hf_ext_args and loss_cls is not None:
            self.grpo_loss = loss_cls(self)
            self._tag_names = [*self._tag_names, loss_cls.name]

    # What the loss keeps across steps travels with the checkpoints.

    def _save_method_state(self, checkpoint: str) -> None:
        state = self.grpo_loss.state_dict() if self.grpo_loss is not None else {}
        if state:
            with open(os.path.join(checkpoint, LOSS_STATE), "w") as handle:
                json.dump({"loss_type": self.grpo_loss.name, "state": state}, handle, indent=1)

    def _load_method_state(self, checkpoint: str) -> None:
        """The loss's state from ``checkpoint``; without the file (a checkpoint written before the loss had any
        state, or by another loss), the loss starts from its own defaults, with a warning when it keeps state."""
        if self.grpo_loss is None:
            return
        path = os.path.join(checkpoint, LOSS_STATE)
        if not os.path.isfile(path):
            if type(self.grpo_loss).state_dict is not GRPOLoss.state_dict:
                warnings.warn(
                    f"resume_from_checkpoint: {checkpoint} has no {LOSS_STATE}: loss_type={self.grpo_loss.name!r} "
                    "starts its own state afresh (GTPO measures H_ini again).",
                    stacklevel=3,
                )
            return
        with open(path) as handle:
            saved = json.load(handle)
        if saved.get("loss_type") != self.grpo_loss.name:
            raise ValueError(
                f"resume_from_checkpoint: {path} holds the state of loss_type={saved.get('loss_type')!r}, but this "
                f"run trains loss_type={self.grpo_loss.name!r}: resume with the loss type the checkpoint was saved "
                "with."
            )
        self.grpo_loss.load_state_dict(saved["state"])

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
            if self.grpo_loss is not None:
                self.grpo_loss.observe_rewards(rewards)
            return rewards
        local = rewards[local_rows(self.accelerator, len(prompts))].T.tolist()  # NaN: None, or a reward model's NaN
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

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.grpo_loss is not None:
            mode = self.grpo_loss.mode
            self.grpo_loss.prepare(output, mode)
            if mode == "train" and self.grpo_loss.whole_groups():
                output = fold_groups(output, self.num_generations)  # TRL's shuffle and split then move groups
        return output

    def _compute_loss(self, model, inputs):
        if self.grpo_loss is None:
            return super()._compute_loss(model, inputs)
        if GROUP_SIZE_KEY in inputs:
            inputs = unfold_groups(inputs)
        return self.grpo_loss.finish(self.grpo_loss.loss(model, inputs), self.grpo_loss.mode)
