"""hf_ext's optimizers as Trainer ``optim`` names (``optim="hf_ext_adamw_4bit"``), from Python, YAML and the CLI.

Transformers coerces ``optim`` into its ``OptimizerNames`` enum, which rejects new names. hf_ext's configs redeclare
``optim`` as a plain string, check it against both lists and parse ``optim_args`` into typed, validated keyword
arguments before the base class sees the config; hf_ext's trainers then build the optimizer from the name.
A plain ``transformers.Trainer`` gets the same optimizer with ``optimizer_cls_and_kwargs(args, name)``.
On resume (``checkpoints.CheckpointMixin``), ``check_resumed_optimizer`` refuses a saved optimizer state that this
run's ``optim`` and ``optim_args`` would not continue, and ``apply_run_policies`` puts back the run's settings that
are no part of the state, so that ``recipe.yaml`` and the model card record what is in force.
"""

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .. import papers
from ..optim import OPTIMIZERS
from ..papers import Method
from .transformers_compat import OptimizerNames


OPTIM_ARG_TYPES = {"block_size": int, "min_quantized_numel": int, "nonfinite_grads": str}
LAYOUT_ARGS = ("block_size", "min_quantized_numel")  # define how saved states are laid out: refused if changed
RUN_POLICIES = ("nonfinite_grads",)  # no part of the state: the resuming run's value applies
_DEFAULT_OPTIM = TrainingArguments.__dataclass_fields__["optim"].default


def parse_optim_args(name: str, optim_args: str | None) -> dict:
    """``"block_size=128,nonfinite_grads=skip"`` -> typed kwargs for hf_ext optimizer ``name``, validated by it."""
    kwargs = {}
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIM_ARG_TYPES:
            raise ValueError(
                f"optim_args: {item!r} is not KEY=VALUE with KEY one of {', '.join(OPTIM_ARG_TYPES)} "
                f"(for optim={name!r}), e.g. optim_args='block_size=128,nonfinite_grads=skip'."
            )
        try:
            kwargs[key] = OPTIM_ARG_TYPES[key](value)
        except ValueError:
            raise ValueError(f"optim_args: {key} must be {OPTIM_ARG_TYPES[key].__name__}, got {value!r}.") from None
    OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)], **kwargs)  # the optimizer's own checks, at config time
    return kwargs


def optim_name(args) -> str:
    """``args.optim`` as a string, whether Transformers coerced it into its ``OptimizerNames`` enum or not."""
    return args.optim.value if isinstance(args.optim, OptimizerNames) else args.optim


def optim_settings(name: str, optim_args: str | None) -> dict:
    """Every ``OPTIM_ARG_TYPES`` key -> the value hf_ext optimizer ``name`` runs with under ``optim_args`` (its
    defaults where not given)."""
    defaults = inspect.signature(OPTIMIZERS[name]).parameters
    return {key: defaults[key].default for key in OPTIM_ARG_TYPES} | parse_optim_args(name, optim_args)


def saved_optimizer_name(param_groups: list[dict]) -> str | None:
    """The hf_ext optimizer name whose ``state_dict()`` has these ``param_groups``; None for other optimizers."""
    if not param_groups or "q4_format" not in param_groups[0]:
        return None
    factor = param_groups[0].get("factor_second_moment")
    return next((name for name, cls in OPTIMIZERS.items() if cls.factor_second_moment == factor), None)


def check_resumed_optimizer(args: TrainingArguments, param_groups: list[dict]) -> None:
    """Refuse (ValueError) to continue a saved optimizer state, given by its ``param_groups``, with ``args``' optimizer
    when that cannot continue it: an hf_ext optimizer's state under another ``optim`` (Transformers' or the other
    hf_ext one), another optimizer's state under an hf_ext ``optim``, or an hf_ext state saved with other
    ``LAYOUT_ARGS`` than ``args.optim_args`` give. ``RUN_POLICIES`` may differ: ``apply_run_policies`` sets them."""
    saved, name = saved_optimizer_name(param_groups), optim_name(args)
    live = name if name in OPTIMIZERS else None
    restart = "or start a new run (another output_dir, no resume_from_checkpoint) to train with"
    if saved != live:
        saved_as = f"optim={saved!r} (4-bit states)" if saved else "an optimizer not hf_ext's (e.g. adamw_torch)"
        resume_with = f"--optim {saved}" if saved else "the optim that saved it"
        raise ValueError(
            f"the optimizer state was saved by {saved_as}; this run's optim={name!r} cannot continue it. "
            f"Resume with {resume_with}, {restart} optim={name!r}."
        )
    if live is None:
        return
    settings = optim_settings(live, args.optim_args)
    for key in LAYOUT_ARGS:
        saved_values = sorted({group[key] for group in param_groups})
        if saved_values != [settings[key]]:
            keep = {**settings, **{k: param_groups[0][k] for k in LAYOUT_ARGS}}
            raise ValueError(
                f"the optimizer state was saved with {key}={', '.join(map(str, saved_values))}; this run's optim_args "
                f"({args.optim_args!r}) give {key}={settings[key]}, which the loaded 4-bit states would not follow "
                f"(they keep the layout they were saved with). Resume with --optim_args "
                f"{','.join(f'{k}={v}' for k, v in keep.items())}, {restart} {key}={settings[key]}."
            )


def apply_run_policies(optimizer, args: TrainingArguments) -> None:
    """After ``optimizer`` loaded a checkpoint (its param groups hold the settings they were saved with): the
    ``RUN_POLICIES`` of ``args.optim_args`` in every group, when ``args.optim`` is an hf_ext optimizer."""
    if optim_name(args) not in OPTIMIZERS:
        return
    settings = optim_settings(optim_name(args), args.optim_args)
    for group in optimizer.param_groups:
        group.update({key: settings[key] for key in RUN_POLICIES})


def optimizer_cls_and_kwargs(args: TrainingArguments, name: str | None = None) -> tuple[type, dict]:
    """(class, kwargs) of hf_ext optimizer ``name`` (default ``args.optim``) with the Trainer's lr, betas and eps.

    For a plain ``transformers.Trainer``: ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args,
    "hf_ext_adamw_4bit"))``; ``args.optim_args`` is read the same way as by hf_ext's configs.
    """
    name = name or args.optim
    if name not in OPTIMIZERS:
        raise ValueError(f"{name!r} is not an hf_ext optimizer; allowed values: {', '.join(OPTIMIZERS)}.")
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return OPTIMIZERS[name], {**kwargs, **parse_optim_args(name, args.optim_args)}


@dataclass
class OptimizerArguments:
    """``optim`` as a plain string, so that hf_ext's optimizer names pass the CLI and YAML parsers."""

    optim: str = field(
        default=_DEFAULT_OPTIM,
        metadata={
            "help": "Optimizer: any Transformers name (adamw_torch_fused, adamw_torch, adamw_8bit, ...) or hf_ext's "
            "4-bit AdamW: 'hf_ext_adamw_4bit' (arXiv 2309.01507: 4-bit moments, rank-1 normalised second moment) or "
            "'hf_ext_adamw_4bit_factor' (factorised second moment). optim_args for them: block_size, "
            "min_quantized_numel, nonfinite_grads (raise|skip)."
        },
    )

    @contextmanager
    def _optim_past_the_enum(self):
        """Runs the base ``__post_init__`` (the ``with`` body) with an hf_ext ``optim`` name carried past it.

        ``transformers.TrainingArguments.__post_init__`` converts ``optim`` into its ``OptimizerNames`` enum, which
        has no hf_ext name, and reads ``optim`` for nothing else (the contract test in ``test_transformers_compat``
        holds it to that). So an hf_ext name (its ``optim_args`` parsed first) has the enum value "adamw_torch" stand
        in during the body and is put back after it, also when the body raises. Any other name must be one of
        Transformers'.
        """
        name = optim_name(self)
        if name not in OPTIMIZERS:
            if name not in {member.value for member in OptimizerNames}:
                raise ValueError(
                    f"optim={name!r} is not known; hf_ext's: {', '.join(OPTIMIZERS)}; Transformers': "
                    f"{', '.join(member.value for member in OptimizerNames)}."
                )
            yield
            return
        parse_optim_args(name, self.optim_args)
        self.optim = "adamw_torch"
        try:
            yield
        finally:
            self.optim = name


class OptimizerMixin:
    """Trainer side: builds hf_ext's optimizer when ``args.optim`` names one, else defers to Transformers."""

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model=None) -> tuple[type, dict]:
        if args.optim in OPTIMIZERS:
            return optimizer_cls_and_kwargs(args)
        from transformers import Trainer

        return Trainer.get_optimizer_cls_and_kwargs(args, model)


def optimizer_card_section(args: TrainingArguments) -> Method | None:
    """The model card's entry for hf_ext's 4-bit AdamW, when ``args.optim`` names it."""
    if args.optim not in OPTIMIZERS:
        return None
    return Method(
        f"4-bit AdamW states (`{args.optim}`)",
        args.optim,
        (papers.ADAMW_4BIT,),
        {"optim": args.optim, "learning_rate": args.learning_rate, **parse_optim_args(args.optim, args.optim_args)},
    )
