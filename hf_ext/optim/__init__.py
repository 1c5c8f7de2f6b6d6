"""Optimizers with low-bit states; ``OPTIMIZERS`` maps the names the trainers accept to their classes."""

from .adamw4bit import AdamW4bit, AdamW4bitFactor, StateDictError


OPTIMIZERS = {"hf_ext_adamw_4bit": AdamW4bit, "hf_ext_adamw_4bit_factor": AdamW4bitFactor}

__all__ = ["OPTIMIZERS", "AdamW4bit", "AdamW4bitFactor", "StateDictError"]
