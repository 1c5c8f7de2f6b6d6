"""hf_ext: recent training methods for the Hugging Face stack, each turned on by one argument."""

__version__ = "0.1.0"

from .trainers import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402


__all__ = ["GRPOConfig", "GRPOTrainer", "SFTConfig", "SFTTrainer", "__version__"]
