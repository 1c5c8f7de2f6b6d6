"""PEFT extensions: ALLoRA (``enable_allora``) and DoRA with a factored weight norm (``enable_fast_dora``)."""

from .allora import ALLoRALinear, ALLoRAProduct, allora_row_scale, enable_allora
from .dora import FastDoraLinear, FastDoraLinearVariant, enable_fast_dora


__all__ = [
    "ALLoRALinear",
    "ALLoRAProduct",
    "FastDoraLinear",
    "FastDoraLinearVariant",
    "allora_row_scale",
    "enable_allora",
    "enable_fast_dora",
]
