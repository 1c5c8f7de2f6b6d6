"""hf_ext: recent training methods for the Hugging Face stack, each turned on by one argument."""

__version__ = "0.1.0"

from .trainers import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer, optimizer_cls_and_kwargs  # noqa: E402


__all__ = ["GRPOConfig", "GRPOTrainer", "SFTConfig", "SFTTrainer", "__version__", "optimizer_cls_and_kwargs"]
