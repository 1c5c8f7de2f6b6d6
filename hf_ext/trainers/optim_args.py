"""hf_ext's optimizers as Trainer ``optim`` names (``optim="hf_ext_adamw_4bit"``), from Python, YAML and the CLI.

Transformers coerces ``optim`` into its ``OptimizerNames`` enum, which rejects new names. hf_ext's configs redeclare
``optim`` as a plain string, check it against both lists and parse ``optim_args`` into typed, validated keyword
arguments before the base class sees the config; hf_ext's trainers then build the optimizer from the name.
A plain ``transformers.Trainer`` gets the same optimizer with ``optimizer_cls_and_kwargs(args, name)``.
"""

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ..optim import OPTIMIZERS


OPTIM_ARG_TYPES = {"block_size": int, "min_quantized_numel": int, "nonfinite_grads": str}
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

    def _hand_over_optim(self) -> str | None:
        """Before the base ``__post_init__``: stand a valid enum value in for an hf_ext name; returns the name."""
        name = self.optim.value if isinstance(self.optim, OptimizerNames) else self.optim
        if name in OPTIMIZERS:
            parse_optim_args(name, self.optim_args)
            self.optim = "adamw_torch"
            return name
        if name not in {member.value for member in OptimizerNames}:
            raise ValueError(
                f"optim={name!r} is not known; hf_ext's: {', '.join(OPTIMIZERS)}; Transformers': "
                f"{', '.join(member.value for member in OptimizerNames)}."
            )
        return None

    def _take_back_optim(self, name: str | None) -> None:
        if name is not None:
            self.optim = name


class OptimizerMixin:
    """Trainer side: builds hf_ext's optimizer when ``args.optim`` names one, else defers to Transformers."""

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model=None) -> tuple[type, dict]:
        if args.optim in OPTIMIZERS:
            return optimizer_cls_and_kwargs(args)
        from transformers import Trainer

        return Trainer.get_optimizer_cls_and_kwargs(args, model)
