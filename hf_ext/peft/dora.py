"""DoRA with the factored weight norm — Liu et al., arXiv 2402.09353 (DoRA); Zelenin & Zhuravlyova, arXiv 2603.22276.

For a linear layer with frozen ``W`` (d_out x d_in, after undoing ``fan_in_fan_out``), LoRA factors ``A`` (r x d_in),
``B`` (d_out x r), scaling ``s`` and magnitude ``m`` (d_out,), DoRA computes

    n_i = ||W_i + s (B A)_i||_2          (fp32, detached: no gradient flows into n, DoRA section 4.3)
    g   = m / n
    y   = result + (g - 1) * base + g * lora * s,    base = W x (= result - bias), lora = B A x

which is PEFT's DoRA composition, in PEFT's product order, so CPU outputs match PEFT to fp32 rounding. It runs as
one fused pass forward and one backward (``hf_ext.kernels.dora_compose``: Triton on CUDA, torch twin elsewhere)
that keeps only ``base + s lora`` for the magnitude gradient. For the norm, PEFT pushes an identity matrix through
both LoRA layers to form the d_out x d_in ``B A``; here ``n`` comes from ``hf_ext.kernels.dora_norm.
factored_row_norm`` (``||W||^2 + 2 s rowdot(B, W A^T) + s^2 rowdot(B A A^T, B)``). A dense W's ``||W||^2`` comes
from the blocks read for ``W A^T`` on every forward, never from a cache: under FSDP2 the weight is gathered again
each forward into storage that can come back at the same address with the same version counter, so no key on the
tensor would notice new values loaded into the shards. Merging, unmerging and
the saved format are PEFT's: an adapter trained here is a plain DoRA adapter that vanilla PEFT loads; nothing is
added to ``adapter_config.json``.

``enable_fast_dora(LoraConfig(use_dora=True, ...))`` returns a copy of the config whose plain ``nn.Linear`` (exact
type) and transformers ``Conv1D`` targets get ``FastDoraLinear``, and whose bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` targets (QDoRA, in a model loaded in 4/8 bit, PEFT's own condition) get ``FastDoraLinear4bit`` /
``FastDoraLinear8bitLt``: there the norm reads W through ``hf_ext.peft.quantized_rows.QuantizedRows``, dequantized
one row chunk at a time (PEFT dequantizes the whole weight every forward), with ``||W||^2`` cached on the quantized
storage (keyed on its ``data_ptr`` and ``_version``; after an in-place change through ``.data``, which bumps
neither, call ``clear_weight_sq_cache(module)``); only the dropout path, which needs ``W dropout(x)``, dequantizes
the whole weight, as PEFT does. Every other target type falls back to PEFT's own DoRA with a warning naming the
type.

The fast variant reaches the layers through PEFT's documented ``lora_variants`` property; what PEFT offers no public
hook for (the layer factory, the bitsandbytes layers' variant choice, the DoRA cache) goes through
``hf_ext.peft.peft_compat``, and every bitsandbytes layout detail through ``hf_ext.peft.bnb_compat``.
"""

import copy
import warnings

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import Linear4bit as LoraLinear4bit
from peft.tuners.lora import Linear8bitLt as LoraLinear8bitLt
from peft.tuners.lora import LoraLayer
from torch import nn

from hf_ext.kernels.dora_compose import dora_compose
from hf_ext.kernels.dora_norm import factored_row_norm, weight_sq_norms
from hf_ext.peft.bnb_compat import keep_training_layout, quantized_kind
from hf_ext.peft.peft_compat import (
    DoraLinearVariant,
    DoraVariantFromMapping,
    base_layer_of,
    dora_cached_weight_norm,
    is_plain_linear,
    layer_variants,
    linear_layer_kwargs,
    register_layer_factory,
)
from hf_ext.peft.quantized_rows import QuantizedRows


_CACHE_ATTR = "_fast_dora_weight_sq"


def cached_weight_sq(module: nn.Module, weight: QuantizedRows) -> torch.Tensor:
    """``||W_i||^2`` per output row of a quantized base, cached on ``module`` until the quantized storage or its
    statistics change (``QuantizedRows.cache_key``).

    Args:
        module: the layer to cache on (a plain attribute, never part of the state dict).
        weight: the ``QuantizedRows`` of a bitsandbytes base, (d_out, d_in).

    Returns:
        (d_out,) fp32 tensor, detached.
    """
    key = weight.cache_key()
    entry = module.__dict__.get(_CACHE_ATTR)
    if entry is None or entry[0] != key:
        entry = (key, weight_sq_norms(weight))
        module.__dict__[_CACHE_ATTR] = entry
    return entry[1]


def clear_weight_sq_cache(module: nn.Module) -> None:
    """Drop the cached ``||W||^2`` of ``module`` and of every submodule (e.g. after editing ``weight.data``).

    Args:
        module: any module; its fast DoRA layers recompute ``||W||^2`` on their next forward.
    """
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
    """The factored norm of ``module``'s ``adapter``, (d_out,) fp32. Under PEFT's ``DoraCaching`` in eval mode it is
    kept in the magnitude layer's cache, as PEFT's own DoRA keeps its norm (same key; dropped otherwise)."""

    def compute() -> torch.Tensor:
        fan_in_fan_out = module.fan_in_fan_out
        quantized = isinstance(weight, QuantizedRows)  # the cache saves a dequantization pass; dense: module docstring
        return factored_row_norm(
            weight,
            module.lora_A[adapter].weight,
            module.lora_B[adapter].weight,
            module.scaling[adapter],
            fan_in_fan_out=fan_in_fan_out,
            weight_sq=cached_weight_sq(module, weight) if quantized else None,
        )

    return dora_cached_weight_norm(module.lora_magnitude_vector[adapter], adapter, compute)


class FastDoraLinearVariant(DoraLinearVariant):
    """PEFT's DoRA variant for linear layers with the factored fp32 weight norm; init and merging are inherited."""

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        """DoRA's output ``result + (g - 1) * W x + g * s * B A dropout(x)``, ``g = m / ||W + s B A||`` (per row).

        Args:
            module: the LoRA layer (``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``,
                ``lora_magnitude_vector``, ``fan_in_fan_out`` and its base layer).
            active_adapter: the adapter to apply.
            x: the layer input, (..., d_in), in the adapter's dtype (PEFT casts it) unless autocast is on.
            result: the base layer's output ``W x + bias``, (..., d_out).
            **kwargs: further keyword arguments of the layer's forward (unused).

        Returns:
            (..., d_out) tensor in the dtype PEFT's DoRA gives: ``result``'s promoted with the adapter's.

        Raises:
            ValueError: base weight, adapter and input on different devices, or A, B and the input in different
                dtypes (see ``_check_same_dtype_and_device``).
        """
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        magnitude = module.lora_magnitude_vector[active_adapter].weight
        base_layer = module.get_base_layer()
        fan_in_fan_out = module.fan_in_fan_out
        weight = QuantizedRows(base_layer) if quantized_kind(base_layer) else base_layer.weight
        _check_same_dtype_and_device(module, active_adapter, weight, x)

        weight_norm = _weight_norm(module, active_adapter, weight)
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result, bias = None, base_layer.bias  # the compose uses result - bias
        else:
            x = dropout(x)
            dense = weight.dense() if isinstance(weight, QuantizedRows) else weight
            dense = dense.to(x.dtype)
            base_result, bias = F.linear(x, dense.T if fan_in_fan_out else dense), None

        lora_result = lora_B(lora_A(x))
        return dora_compose(result, lora_result, magnitude, weight_norm, scaling, base=base_result, bias=bias)


class _FastDoraVariants:
    """The documented PEFT hook: a layer's ``lora_variants`` maps ``("use_dora",)`` to ``FastDoraLinearVariant``."""

    @property
    def lora_variants(self) -> dict:
        return {**super().lora_variants, ("use_dora",): FastDoraLinearVariant}


class FastDoraLinear(_FastDoraVariants, LoraLinear):
    """PEFT's LoRA ``Linear`` for ``nn.Linear`` and ``Conv1D`` bases; DoRA runs through ``FastDoraLinearVariant``.

    Args:
        base_layer: an ``nn.Linear`` (exact type) or transformers ``Conv1D``, or a PEFT layer wrapping one.
        adapter_name: the adapter to create.
        config: its ``LoraConfig``; ``fan_in_fan_out`` is corrected to the base type with a warning, as PEFT does.
        **kwargs: PEFT's layer keyword arguments (``r``, ``lora_alpha``, ...).

    Raises:
        TypeError: for any other base type (``enable_fast_dora`` leaves those to PEFT's own DoRA).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
        base = base_layer_of(base_layer)
        if not is_plain_linear(base):
            raise TypeError(
                f"FastDoraLinear supports torch.nn.Linear (exact type) and transformers Conv1D bases, not "
                f"{type(base).__module__}.{type(base).__name__}; use enable_fast_dora(config), which leaves other "
                "layer types to PEFT's own DoRA."
            )
        super().__init__(base_layer, adapter_name, config=config, **linear_layer_kwargs(base, config, kwargs))


class FastDoraLinear4bit(DoraVariantFromMapping, _FastDoraVariants, LoraLinear4bit):
    """PEFT's QLoRA ``Linear4bit`` layer (QDoRA) with ``FastDoraLinearVariant``: factored norm on 4-bit row chunks.

    Constructed as PEFT's ``Linear4bit``: ``(base_layer, adapter_name, config, r=..., lora_alpha=..., **kwargs)`` with
    a bitsandbytes ``Linear4bit`` base.
    """


class FastDoraLinear8bitLt(DoraVariantFromMapping, _FastDoraVariants, LoraLinear8bitLt):
    """PEFT's ``Linear8bitLt`` LoRA layer (QDoRA) with ``FastDoraLinearVariant``: factored norm on 8-bit row chunks.

    Constructed as PEFT's ``Linear8bitLt``: ``(base_layer, adapter_name, config, r=..., lora_alpha=..., **kwargs)``
    with a bitsandbytes ``Linear8bitLt`` base.
    """


def _dispatch_fast_dora(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> nn.Module | None:
    """The layer factory: a fast DoRA layer for supported bases, ``None`` (PEFT's dispatchers) otherwise.

    bitsandbytes layers are taken under PEFT's own condition: the model is loaded in 4/8 bit.
    """
    base = base_layer_of(target)
    if is_plain_linear(base):
        return FastDoraLinear(target, adapter_name, config=config, **kwargs)
    if kwargs.get("loaded_in_4bit") and isinstance(base, bnb.nn.Linear4bit):
        keep_training_layout(base)
        return FastDoraLinear4bit(target, adapter_name, config=config, **kwargs)
    if kwargs.get("loaded_in_8bit") and isinstance(base, bnb.nn.Linear8bitLt):
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
    return is_plain_linear(base) or isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def apply_fast_dora(model: nn.Module) -> int:
    """Switch the DoRA adapters already in ``model`` to the fast variant.

    For models whose layers ``enable_fast_dora`` did not build: an adapter loaded with ``PeftModel.from_pretrained``
    or ``load_adapter``, or a DoRA adapter added to a layer that already holds a plain LoRA adapter (PEFT then reuses
    the existing layer). Layers keep their PEFT class; an adapter added to them later needs another call. Linear DoRA
    adapters on other base types stay PEFT's, with a warning naming the type.

    Args:
        model: a ``PeftModel`` or any module holding PEFT LoRA layers; modified in place.

    Returns:
        How many adapters were switched (0 when none uses PEFT's linear DoRA variant).
    """
    switched = 0
    for name, module in model.named_modules():
        variants = layer_variants(module)
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


def uses_fast_dora(model: nn.Module) -> bool:
    """Whether any LoRA layer of ``model`` runs an adapter through the fast DoRA variant."""
    return any(
        isinstance(variant, FastDoraLinearVariant)
        for module in model.modules()
        for variant in layer_variants(module).values()
    )


def enable_fast_dora(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` whose linear DoRA layers use the factored norm.

    Use it like any ``LoraConfig``: ``get_peft_model(model, enable_fast_dora(LoraConfig(use_dora=True, ...)))``.
    The registration is not serialized: the saved adapter is a plain PEFT DoRA adapter (reload it fast with
    ``apply_fast_dora``). Its factory sees every target type first, so register your own custom modules
    (``config._register_custom_module``) before calling this, not after.

    Args:
        config: a ``peft.LoraConfig`` with ``use_dora=True``; left unchanged.

    Returns:
        The copy, with hf_ext's layer factory registered (``peft_compat.register_layer_factory``).

    Raises:
        TypeError: ``config`` is not a ``LoraConfig``.
        ValueError: ``use_dora`` is False.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"enable_fast_dora needs a peft.LoraConfig, got {type(config).__name__}.")
    if not config.use_dora:
        raise ValueError(
            "enable_fast_dora speeds up DoRA, but the config has use_dora=False; pass LoraConfig(use_dora=True, ...) "
            "or use the config as is for plain LoRA."
        )
    config = copy.deepcopy(config)
    register_layer_factory(config, _dispatch_fast_dora)
    return config
