"""TRL/Transformers subclasses and configs that turn hf_ext's methods on as arguments."""

from .grpo import GRPOConfig, GRPOTrainer
from .grpo_clipped import ClippedGRPOLoss
from .grpo_loss import GRPOLoss, grpo_losses, load_entry_point_losses, register_grpo_loss
from .optim_args import optimizer_cls_and_kwargs
from .sft import SFTConfig, SFTTrainer
from .trl_compat import trl_loss_types


__all__ = [
    "ClippedGRPOLoss",
    "GRPOConfig",
    "GRPOLoss",
    "GRPOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "grpo_losses",
    "load_entry_point_losses",
    "optimizer_cls_and_kwargs",
    "register_grpo_loss",
    "trl_loss_types",
]
