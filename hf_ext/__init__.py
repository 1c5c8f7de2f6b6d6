"""hf_ext: recent training methods for the Hugging Face stack, each turned on by one argument.

The trainer exports load on first use, so that ``hf-ext env``, ``hf-ext push-config`` and ``hf_ext.hub`` start
without importing torch, TRL and Transformers.
"""

import importlib


__version__ = "0.1.0"

_LAZY_EXPORTS = {
    name: "hf_ext.trainers"
    for name in (
        "GRPOConfig",
        "GRPOTrainer",
        "GRPOLoss",
        "ClippedGRPOLoss",
        "register_grpo_loss",
        "grpo_losses",
        "SFTConfig",
        "SFTTrainer",
        "optimizer_cls_and_kwargs",
    )
}
__all__ = [*_LAZY_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_ext' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY_EXPORTS])
