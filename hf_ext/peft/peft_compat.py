"""Every use hf_ext.peft makes of PEFT's LoRA tuner beyond its documented API, in one module.

The documented extension point hf_ext uses directly is ``peft.tuners.lora.LoraLayer.lora_variants``, the property
subclasses override to map sorted tuples of ``LoraConfig`` variant fields to ``LoraVariant`` classes:
``FastDoraLinear`` maps ``("use_dora",)`` to the fast variant, ``ALLoRALinear`` maps ``()`` (plain LoRA) to ALLoRA's.
The LoRA layer classes (``peft.tuners.lora.Linear``, ``LoraLayer``, ``Linear4bit``, ``Linear8bitLt``) are exported
by ``peft.tuners.lora`` and are imported where they are used.

What no public API covers, per upstream symbol (each guarded by ``tests/peft/test_peft_compat.py``, whose failures name
it):

- ``peft.tuners.lora.layer.LoraVariant``: the base class of a LoRA variant, with static ``init``, ``merge_safe``,
  ``merge_unsafe``, ``unmerge`` and ``forward(module, active_adapter, x, result, **kwargs)``. PEFT marks these
  methods as subject to change; a variant is the only way to give a LoRA layer its own forward.
- ``peft.tuners.lora.variants.DoraLinearVariant``: PEFT's DoRA for linear layers. The fast variant inherits its
  magnitude initialization and merging, so merged weights and saved adapters are PEFT's.
- ``peft.tuners.lora.bnb.Linear4bit.resolve_lora_variant`` / ``Linear8bitLt.resolve_lora_variant``: these layers
  choose their variant in code and never read ``lora_variants``. ``DoraVariantFromMapping`` overrides the method so
  that where PEFT returns a ``DoraLinearVariant`` the layer's ``lora_variants[("use_dora",)]`` is used instead;
  ``VariantFromMapping`` sends the whole choice to ``peft.tuners.lora.LoraLayer.resolve_lora_variant``, the generic
  lookup in ``lora_variants`` (ALLoRA's 4/8-bit layers, whose variant replaces plain LoRA).
- ``peft.LoraConfig._register_custom_module`` (experimental, described in PEFT's custom-models guide) and the
  dispatch in ``peft.tuners.lora.model.LoraModel._create_new_module`` that reads it: registered factories run
  before PEFT's own dispatchers, the first whose key the target's base layer is an instance of is called as
  ``factory(target, adapter_name, config=config, **kwargs)`` (``kwargs`` holding ``loaded_in_4bit`` /
  ``loaded_in_8bit``), and a ``None`` result leaves the target to PEFT's dispatchers. ``register_layer_factory``
  keys one factory on ``nn.Module``, the only key that shows it every target, so that it can warn about (fast
  DoRA) or refuse (ALLoRA) the types it does not build.
- ``peft.tuners.lora.dora.cache_decorator``: PEFT's DoRA cache, active while ``peft.helpers.DoraCaching`` is on
  and the magnitude layer is in eval mode, entries keyed ``"<name>-<adapter>"`` on the magnitude layer and dropped
  otherwise. The public ``DoraCaching`` only switches it; ``dora_cached_weight_norm`` keeps the fast norm under
  the key PEFT's own DoRA uses.
- what ``peft.tuners.lora.layer.dispatch_default`` does for ``nn.Linear`` and transformers ``Conv1D`` bases
  (``fan_in_fan_out`` forced off / on with a warning, ``is_target_conv_1d_layer=True`` for ``Conv1D``):
  ``linear_layer_kwargs`` repeats it, since hf_ext's factories build those layers in place of that dispatcher.
  PEFT's bitsandbytes dispatchers (``dispatch_bnb_4bit`` / ``dispatch_bnb_8bit``) add settings read from the bnb
  layer that PEFT's bnb LoRA layers do not use, so the fast 4/8-bit layers are built without them.
- ``LoraLayer.lora_variant``: the dict adapter name -> the ``LoraVariant`` instance that ``forward`` runs for it,
  filled by ``update_layer``. It is live: ``layer_variants`` returns it, and ``apply_fast_dora`` swaps entries of
  adapters PEFT built before the fast path was on.
"""

import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.dora import cache_decorator
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn
from transformers.pytorch_utils import Conv1D


__all__ = [
    "DoraLinearVariant",
    "DoraVariantFromMapping",
    "LoraVariant",
    "VariantFromMapping",
    "base_layer_of",
    "dora_cached_weight_norm",
    "is_plain_linear",
    "layer_variants",
    "linear_layer_kwargs",
    "register_layer_factory",
]

LayerFactory = Callable[..., nn.Module | None]


def base_layer_of(module: nn.Module) -> nn.Module:
    """The layer a PEFT tuner layer wraps (``BaseTunerLayer.get_base_layer``, innermost), or ``module`` itself.

    Args:
        module: a dispatch target: a plain layer, or a PEFT tuner layer already wrapping one.

    Returns:
        The base layer whose type decides how the target is adapted.
    """
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if get_base_layer is not None else module


def layer_variants(module: nn.Module) -> dict[str, LoraVariant]:
    """The live adapter name -> ``LoraVariant`` map of a PEFT LoRA layer (empty for other modules and for adapters
    without a variant); assigning an entry changes the variant that layer's forward runs."""
    variants = getattr(module, "lora_variant", None)
    return variants if isinstance(variants, dict) else {}


def is_plain_linear(base: nn.Module) -> bool:
    """Whether hf_ext's linear layers (fast DoRA, ALLoRA) take ``base``.

    Args:
        base: an unwrapped base layer (``base_layer_of``).

    Returns:
        True for a ``torch.nn.Linear`` of exactly that type (subclasses such as bitsandbytes' compute differently)
        and for a transformers ``Conv1D``: the bases ``linear_layer_kwargs`` prepares a LoRA ``Linear`` for.
    """
    return type(base) is nn.Linear or isinstance(base, Conv1D)


def linear_layer_kwargs(base: nn.Module, config: LoraConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments PEFT's ``dispatch_default`` gives its LoRA ``Linear`` for ``base``, and its config fix.

    Args:
        base: the unwrapped base layer, ``is_plain_linear(base)``.
        config: the adapter's config; ``fan_in_fan_out`` is set to match ``base`` (True for ``Conv1D``, False for
            ``nn.Linear``) with a warning when it did not, as PEFT does.
        kwargs: the keyword arguments PEFT passed to the factory.

    Returns:
        ``kwargs``, plus ``is_target_conv_1d_layer=True`` for a ``Conv1D`` base.
    """
    is_conv1d = isinstance(base, Conv1D)
    if config.fan_in_fan_out != is_conv1d:
        warnings.warn(
            f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is "
            f"`{'Conv1D' if is_conv1d else 'torch.nn.Linear'}`. Setting fan_in_fan_out to {is_conv1d}.",
            stacklevel=3,
        )
        config.fan_in_fan_out = is_conv1d
    return {**kwargs, "is_target_conv_1d_layer": True} if is_conv1d else kwargs


def register_layer_factory(config: LoraConfig, factory: LayerFactory) -> None:
    """Make PEFT call ``factory`` first for every target of ``config`` (the registration is not serialized).

    Args:
        config: the LoRA config, modified in place (pass a copy to keep the caller's).
        factory: ``factory(target, adapter_name, config=config, **kwargs)`` returning the LoRA layer for
            ``target``, or ``None`` to leave it to PEFT's own dispatchers; ``kwargs`` are the ones PEFT passes
            to its dispatchers (``r``, ``lora_alpha``, ``loaded_in_4bit``, ``loaded_in_8bit``, ...).
    """
    config._register_custom_module({nn.Module: factory})


class DoraVariantFromMapping:
    """Mixin for PEFT's bitsandbytes LoRA layers (``peft.tuners.lora.Linear4bit`` / ``Linear8bitLt``), placed
    before them in the bases: where their hand-written ``resolve_lora_variant`` picks ``DoraLinearVariant``, the
    layer's ``lora_variants[("use_dora",)]`` class is instantiated instead; every other choice is kept."""

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> LoraVariant | None:
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if type(variant) is DoraLinearVariant:
            return self.lora_variants[("use_dora",)]()
        return variant


class VariantFromMapping:
    """Mixin for PEFT's bitsandbytes LoRA layers, placed before them in the bases: the variant is chosen from the
    layer's ``lora_variants`` by PEFT's generic ``LoraLayer.resolve_lora_variant``, not by the bnb layers' own
    method (which never reads the mapping)."""

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> LoraVariant | None:
        return LoraLayer.resolve_lora_variant(self, config=config, **kwargs)


@cache_decorator("weight-norm")
def _weight_norm_in_dora_cache(magnitude_layer: nn.Module, compute: Callable[[], torch.Tensor], *, adapter_name):
    return compute()


def dora_cached_weight_norm(
    magnitude_layer: nn.Module, adapter_name: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``compute()``, held in PEFT's DoRA cache of ``magnitude_layer`` under PEFT's weight-norm key.

    Args:
        magnitude_layer: ``module.lora_magnitude_vector[adapter_name]`` of a DoRA layer.
        adapter_name: the adapter the norm belongs to.
        compute: returns the (d_out,) weight norm.

    Returns:
        The cached (d_out,) norm while ``peft.helpers.DoraCaching`` is on and ``magnitude_layer`` is in eval mode
        (computed and stored on a miss); otherwise ``compute()``, after the layer's cache is cleared.
    """
    return _weight_norm_in_dora_cache(magnitude_layer, compute, adapter_name=adapter_name)
