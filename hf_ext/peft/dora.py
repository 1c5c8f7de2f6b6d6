"""DoRA with the factored weight norm — Liu et al., arXiv 2402.09353 (DoRA); Zelenin & Zhuravlyova, arXiv 2603.22276.

For a linear layer with frozen ``W`` (d_out x d_in, after undoing ``fan_in_fan_out``), LoRA factors ``A`` (r x d_in),
``B`` (d_out x r), scaling ``s`` and magnitude ``m`` (d_out,), DoRA computes

    n_i = ||W_i + s (B A)_i||_2          (fp32, detached: no gradient flows into n, DoRA section 4.3)
    g   = m / n
    y   = result + (g - 1) * base + g * lora * s,    base = W x (= result - bias), lora = B A x

which is PEFT 0.21.2's composition, in PEFT's product order, so CPU outputs match PEFT to fp32 rounding. It runs as
one fused pass forward and one backward (``hf_ext.kernels.dora_compose``: Triton on CUDA, torch twin elsewhere)
that keeps only ``base + s lora`` for the magnitude gradient. For the norm, PEFT pushes an identity matrix through
both LoRA layers to form the d_out x d_in ``B A``; here ``n`` comes from ``hf_ext.kernels.dora_norm.
factored_row_norm`` (``||W||^2 + 2 s rowdot(B, W A^T) + s^2 rowdot(B A A^T, B)``), with ``||W||^2`` cached per
module and recomputed when the base weight changes (keyed on its ``data_ptr`` and ``_version``; an in-place change
through ``weight.data`` bumps neither, so call ``clear_weight_sq_cache(module)`` after one). Merging, unmerging and
the saved format are PEFT's: an adapter trained here is a plain DoRA adapter that vanilla PEFT loads; nothing is
added to ``adapter_config.json``.

``enable_fast_dora(LoraConfig(use_dora=True, ...))`` returns a copy of the config whose plain ``nn.Linear`` (exact
type) and transformers ``Conv1D`` targets get ``FastDoraLinear``, and whose bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` targets (QDoRA, in a model loaded in 4/8 bit, PEFT's own condition) get ``FastDoraLinear4bit`` /
``FastDoraLinear8bitLt``: there the norm reads W through ``hf_ext.peft.quantized_rows.QuantizedRows``, dequantized
one row chunk at a time (PEFT dequantizes the whole weight every forward), with ``||W||^2`` cached on the quantized
storage; only the dropout path, which needs ``W dropout(x)``, dequantizes the whole weight, as PEFT does. Every
other target type falls back to PEFT's own DoRA with a warning naming the type.
"""

import copy
import warnings

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import bnb as peft_bnb
from peft.tuners.lora import dora as peft_dora
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_ext.kernels.dora_compose import dora_compose
from hf_ext.kernels.dora_norm import factored_row_norm, weight_sq_norms
from hf_ext.peft.quantized_rows import QuantizedRows, is_quantized_bnb


_CACHE_ATTR = "_fast_dora_weight_sq"


def _weight_key(weight, fan_in_fan_out: bool) -> tuple:
    if isinstance(weight, QuantizedRows):
        return weight.cache_key()  # the quantized storage and its statistics
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device, fan_in_fan_out)


def cached_weight_sq(module: nn.Module, weight, fan_in_fan_out: bool) -> torch.Tensor:
    """``||W_i||^2`` per output row (fp32, detached), cached on ``module`` until the base weight changes.

    ``weight``: the base weight, or the ``QuantizedRows`` of a bitsandbytes base."""
    key = _weight_key(weight, fan_in_fan_out)
    entry = module.__dict__.get(_CACHE_ATTR)
    if entry is None or entry[0] != key:
        entry = (key, weight_sq_norms(weight, fan_in_fan_out))
        module.__dict__[_CACHE_ATTR] = entry  # a plain attribute: never part of the state dict
    return entry[1]


def clear_weight_sq_cache(module: nn.Module) -> None:
    """Drop the cached ``||W||^2`` of ``module`` and of every submodule (e.g. after editing ``weight.data``)."""
    for sub in module.modules():
        sub.__dict__.pop(_CACHE_ATTR, None)


def _check_same_dtype_and_device(module: LoraLinear, adapter: str, weight, x: torch.Tensor) -> None:
    """What the fast path needs, checked up front for a clear error: the base weight, A, B, the magnitude and the
    input on one device; A and B in one dtype; the input in that dtype too unless autocast is on (PEFT casts it).

    Other dtypes may differ, as PEFT allows: a bf16/fp16 or quantized base with fp32 adapters
    (``autocast_adapter_dtype=True``), or an fp32 magnitude beside bf16 A and B (TRL casts LoRA layers of a
    quantized model to bf16); the norm is fp32 and the compose works in the promoted dtype.
    """
    tensors = {
        "base weight": weight,
        f"lora_A[{adapter!r}]": module.lora_A[adapter].weight,
        f"lora_B[{adapter!r}]": module.lora_B[adapter].weight,
        f"lora_magnitude_vector[{adapter!r}]": module.lora_magnitude_vector[adapter].weight,
        "input": x,
    }
    lora_dtype = tensors[f"lora_A[{adapter!r}]"].dtype
    same_device = len({t.device for t in tensors.values()}) == 1
    same_lora_dtype = tensors[f"lora_B[{adapter!r}]"].dtype == lora_dtype
    input_ok = x.dtype == lora_dtype or torch.is_autocast_enabled(x.device.type)
    if not (same_device and same_lora_dtype and input_ok and weight.dtype.is_floating_point):
        found = ", ".join(f"{name}: {t.dtype} on {t.device}" for name, t in tensors.items())
        raise ValueError(
            "Mismatched dtypes or devices between base and adapter in fast DoRA: all must be on one device, lora_A "
            f"and lora_B in one dtype, the input in that dtype (or autocast on), the base weight floating point; got "
            f"{found}. Move the model with model.to(device) and cast the adapter with model.to(dtype) or leave "
            "PEFT's autocast_adapter_dtype at its default."
        )


def _weight_norm(module: LoraLinear, adapter: str, weight) -> torch.Tensor:
    """The factored norm of ``module``'s ``adapter``. Under PEFT's ``DoraCaching`` in eval mode it is kept in the
    magnitude layer's cache, as PEFT's own DoRA keeps it (same key; cleared in training or with caching off)."""
    magnitude_layer = module.lora_magnitude_vector[adapter]
    caching = peft_dora.ENABLE_DORA_CACHING and not magnitude_layer.training
    if not caching:
        magnitude_layer._cache_clear()
    key = f"weight-norm-{adapter}"
    weight_norm = magnitude_layer._cache_get(key, None) if caching else None
    if weight_norm is None:
        fan_in_fan_out = module.fan_in_fan_out
        weight_norm = factored_row_norm(
            weight,
            module.lora_A[adapter].weight,
            module.lora_B[adapter].weight,
            module.scaling[adapter],
            fan_in_fan_out=fan_in_fan_out,
            weight_sq=cached_weight_sq(module, weight, fan_in_fan_out),
        )
        if caching:
            magnitude_layer._cache_store(key, weight_norm)
    return weight_norm


class FastDoraLinearVariant(DoraLinearVariant):
    """PEFT's DoRA variant for linear layers with the factored fp32 weight norm; init and merging are inherited."""

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        magnitude = module.lora_magnitude_vector[active_adapter].weight
        base_layer = module.get_base_layer()
        fan_in_fan_out = module.fan_in_fan_out
        weight = QuantizedRows(base_layer) if is_quantized_bnb(base_layer) else base_layer.weight
        _check_same_dtype_and_device(module, active_adapter, weight, x)

        weight_norm = _weight_norm(module, active_adapter, weight)
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result, bias = None, base_layer.bias  # the compose uses result - bias
        else:
            x = dropout(x)
            dense = weight.dense() if isinstance(weight, QuantizedRows) else weight
            base_result, bias = F.linear(x, transpose(dense.to(x.dtype), fan_in_fan_out)), None

        lora_result = lora_B(lora_A(x))
        return dora_compose(result, lora_result, magnitude, weight_norm, scaling, base=base_result, bias=bias)


class _FastDoraVariantMixin:
    """Swaps PEFT's ``DoraLinearVariant`` for ``FastDoraLinearVariant`` when a LoRA layer resolves its variant."""

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> LoraVariant | None:
        variant = super().resolve_lora_variant(config=config, **kwargs)
        return FastDoraLinearVariant() if type(variant) is DoraLinearVariant else variant


class FastDoraLinear(_FastDoraVariantMixin, LoraLinear):
    """PEFT's LoRA ``Linear`` for ``nn.Linear`` and ``Conv1D`` bases; DoRA runs through ``FastDoraLinearVariant``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if isinstance(base, Conv1D):  # what PEFT's dispatch_default does for Conv1D
            kwargs["is_target_conv_1d_layer"] = True
            if not config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it to True.",
                    stacklevel=2,
                )
                config.fan_in_fan_out = True
        elif type(base) is nn.Linear:
            if config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting False.",
                    stacklevel=2,
                )
                config.fan_in_fan_out = False
        else:
            raise TypeError(
                f"FastDoraLinear supports torch.nn.Linear (exact type) and transformers Conv1D bases, not "
                f"{type(base).__module__}.{type(base).__name__}; use enable_fast_dora(config), which leaves other "
                "layer types to PEFT's own DoRA."
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)


class FastDoraLinear4bit(_FastDoraVariantMixin, peft_bnb.Linear4bit):
    """PEFT's QLoRA ``Linear4bit`` layer (QDoRA) with ``FastDoraLinearVariant``: factored norm on 4-bit row chunks."""


class FastDoraLinear8bitLt(_FastDoraVariantMixin, peft_bnb.Linear8bitLt):
    """PEFT's ``Linear8bitLt`` LoRA layer (QDoRA) with ``FastDoraLinearVariant``: factored norm on 8-bit row chunks."""


def _dispatch_fast_dora(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> nn.Module | None:
    """The custom-module factory: a fast DoRA layer for supported bases, ``None`` (PEFT's dispatchers) otherwise.

    bitsandbytes layers are taken under PEFT's own conditions (the model is loaded in 4/8 bit) with the keyword
    arguments PEFT's ``dispatch_bnb_4bit`` / ``dispatch_bnb_8bit`` pass.
    """
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if type(base) is nn.Linear or isinstance(base, Conv1D):
        return FastDoraLinear(target, adapter_name, config=config, **kwargs)
    if kwargs.get("loaded_in_4bit") and isinstance(base, bnb.nn.Linear4bit):
        kwargs.update(
            compute_dtype=base.compute_dtype,
            compress_statistics=base.weight.compress_statistics,
            quant_type=base.weight.quant_type,
        )
        return FastDoraLinear4bit(target, adapter_name, config=config, **kwargs)
    if kwargs.get("loaded_in_8bit") and isinstance(base, bnb.nn.Linear8bitLt):
        kwargs.update(has_fp16_weights=base.state.has_fp16_weights, threshold=base.state.threshold, index=base.index)
        return FastDoraLinear8bitLt(target, adapter_name, config=config, **kwargs)
    warnings.warn(
        f"fast DoRA supports torch.nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt (in a "
        f"model loaded in 4/8 bit) targets only; {type(base).__module__}.{type(base).__name__} falls back to PEFT's "
        "own DoRA (dense B @ A norm).",
        stacklevel=2,
    )
    return None


def _fast_path_supports(base: nn.Module) -> bool:
    """The base layers ``FastDoraLinearVariant`` runs on (the factory builds their layers, ``apply_fast_dora``
    switches existing ones): exact ``nn.Linear``, ``Conv1D`` and bitsandbytes' 4/8-bit linears."""
    return type(base) is nn.Linear or isinstance(base, (Conv1D, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def apply_fast_dora(model: nn.Module) -> int:
    """Switch the DoRA adapters already in ``model`` to the fast variant; returns how many were switched.

    For models whose layers ``enable_fast_dora`` did not build: an adapter loaded with ``PeftModel.from_pretrained``
    or ``load_adapter``, or a DoRA adapter added to a layer that already holds a plain LoRA adapter (PEFT then reuses
    the existing layer). Layers keep their PEFT class; an adapter added to them later needs another call. Linear DoRA
    adapters on other base types stay PEFT's, with a warning naming the type.
    """
    switched = 0
    for name, module in model.named_modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(module, LoraLayer) or not variants:
            continue
        for adapter, variant in variants.items():
            if type(variant) is not DoraLinearVariant:
                continue
            base = module.get_base_layer()
            if _fast_path_supports(base):
                variants[adapter] = FastDoraLinearVariant()
                switched += 1
            else:
                warnings.warn(
                    f"apply_fast_dora: {name} ({type(base).__module__}.{type(base).__name__}) keeps PEFT's own DoRA; "
                    "the fast path supports torch.nn.Linear, transformers Conv1D and bitsandbytes 4/8-bit bases.",
                    stacklevel=2,
                )
    return switched


def enable_fast_dora(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` (which must have ``use_dora=True``) whose linear DoRA layers use the factored norm.

    Use it like any ``LoraConfig``: ``get_peft_model(model, enable_fast_dora(LoraConfig(use_dora=True, ...)))``.
    The registration is not serialized: the saved adapter is a plain PEFT DoRA adapter (reload it fast with
    ``apply_fast_dora``). It catches every target type first, so register your own custom modules
    (``config._register_custom_module``) before calling this, not after.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"enable_fast_dora needs a peft.LoraConfig, got {type(config).__name__}.")
    if not config.use_dora:
        raise ValueError(
            "enable_fast_dora speeds up DoRA, but the config has use_dora=False; pass LoraConfig(use_dora=True, ...) "
            "or use the config as is for plain LoRA."
        )
    config = copy.deepcopy(config)
    # nn.Module catches every target: the factory itself decides between FastDoraLinear and PEFT's dispatchers.
    config._register_custom_module({nn.Module: _dispatch_fast_dora})
    return config
