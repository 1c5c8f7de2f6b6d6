"""PEFT extensions: ALLoRA (``enable_allora``) and fast DoRA / QDoRA (``enable_fast_dora``, ``apply_fast_dora``)."""

from .allora import ALLoRALinear, ALLoRAProduct, allora_row_scale, enable_allora
from .dora import (
    FastDoraLinear,
    FastDoraLinear4bit,
    FastDoraLinear8bitLt,
    FastDoraLinearVariant,
    apply_fast_dora,
    enable_fast_dora,
)


__all__ = [
    "ALLoRALinear",
    "ALLoRAProduct",
    "FastDoraLinear",
    "FastDoraLinear4bit",
    "FastDoraLinear8bitLt",
    "FastDoraLinearVariant",
    "allora_row_scale",
    "apply_fast_dora",
    "enable_allora",
    "enable_fast_dora",
]
