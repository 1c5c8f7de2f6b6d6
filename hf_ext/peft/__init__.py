"""PEFT extensions: ALLoRA (``enable_allora``)."""

from .allora import ALLoRALinear, ALLoRAProduct, allora_row_scale, enable_allora


__all__ = ["ALLoRALinear", "ALLoRAProduct", "allora_row_scale", "enable_allora"]
