"""TRL/Transformers subclasses and configs that turn hf_ext's methods on as arguments."""

from .grpo import HF_EXT_LOSS_TYPES, GRPOConfig, GRPOTrainer
from .optim_args import optimizer_cls_and_kwargs
from .sft import SFTConfig, SFTTrainer
from .trl_compat import trl_loss_types


__all__ = [
    "HF_EXT_LOSS_TYPES",
    "GRPOConfig",
    "GRPOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "optimizer_cls_and_kwargs",
    "trl_loss_types",
]
