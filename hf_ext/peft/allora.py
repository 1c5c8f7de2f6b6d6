"""ALLoRA: dropout-free, scaling-free LoRA with a norm-adaptive learning rate — Huang & Balestriero, arXiv 2410.09692.

Forward: plain LoRA with scaling 1 and no dropout, y = W x + B A x. Backward: the gradient of the LoRA output
reaching A and B is scaled, per output feature i, by

    c_i = 1 / sqrt( ||(B A)_{i,:}||_2 + 1/eta^2 )       (the norm is not squared; c_i = eta while row i is 0)

so that, with SGD, a row's learning rate starts at eta * lr and shrinks as the row grows. The gradient reaching
the layer's input is not scaled. c is computed from the current weights in the forward pass and treated as a
constant; the row norm comes from the Gram identity ||(B A)_i||^2 = B_i (A A^T) B_i^T, in fp32, so no
d_out x d_in product is ever formed.

It changes training only: an ALLoRA adapter is a plain LoRA adapter (lora_alpha == r, no dropout) that vanilla
PEFT loads and runs unchanged. ``enable_allora(LoraConfig(...))`` returns a config whose linear layers train this
way; nothing is added to ``adapter_config.json``.

Targets: ``torch.nn.Linear`` (exact type) and transformers ``Conv1D`` get ``ALLoRALinear``; bitsandbytes ``Linear4bit``
/ ``Linear8bitLt`` (QLoRA, in a model loaded in 4/8 bit, PEFT's own condition) get ``ALLoRALinear4bit`` /
``ALLoRALinear8bitLt``. The row scale c reads A and B only, so a quantized base changes nothing in it: such a layer
computes ``base_layer(x) + B A x``, the first term being bitsandbytes' own forward (and backward, for the gradient
of x) on its quantized weight. Every other target type is refused when the model is built.

The layers take the variant through PEFT's documented ``lora_variants`` property. The layer factory goes through
``hf_ext.peft.peft_compat``; PEFT's bitsandbytes LoRA layers choose their variant in code
(``resolve_lora_variant``, a symbol ``peft_compat`` lists and its contract test guards), so the 4/8-bit ALLoRA
layers send that choice back to PEFT's generic ``lora_variants`` lookup.
"""

import copy
import functools
import math

import bitsandbytes as bnb
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import Linear4bit as LoraLinear4bit
from peft.tuners.lora import Linear8bitLt as LoraLinear8bitLt
from peft.tuners.lora import LoraLayer
from torch import nn

from hf_ext.peft.bnb_compat import keep_training_layout
from hf_ext.peft.peft_compat import (
    LoraVariant,
    VariantFromMapping,
    base_layer_of,
    is_plain_linear,
    linear_layer_kwargs,
    register_layer_factory,
)


def allora_row_scale(weight_a: torch.Tensor, weight_b: torch.Tensor, eta: float) -> torch.Tensor:
    """ALLoRA's per-row gradient scale ``c_i = 1 / sqrt(||(B A)_i|| + 1/eta^2)``, from the r x r Gram matrix A A^T.

    Args:
        weight_a: A, (r, d_in), any float dtype.
        weight_b: B, (d_out, r), any float dtype.
        eta: ALLoRA's eta (> 0): the scale of a zero row.

    Returns:
        c, (d_out,) fp32, without gradient.
    """
    with torch.no_grad():
        weight_a, weight_b = weight_a.float(), weight_b.float()
        squared_norms = ((weight_b @ (weight_a @ weight_a.T)) * weight_b).sum(1).clamp(min=0)
        return torch.rsqrt(squared_norms.sqrt() + 1.0 / eta**2)


class ALLoRAProduct(torch.autograd.Function):
    """y = x A^T B^T; the gradients of A and B see dy scaled per output feature by c, the input's does not.

    ``ALLoRAProduct.apply(x, weight_a, weight_b, eta)`` with x (..., d_in), A (r, d_in), B (d_out, r), eta > 0
    returns y (..., d_out); backward gives dx = dy B A, dB = (c dy)^T (x A^T), dA = ((c dy) B)^T x, with
    c = ``allora_row_scale(A, B, eta)`` from the forward's weights.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, eta: float) -> torch.Tensor:
        hidden = x @ weight_a.T
        ctx.save_for_backward(x, hidden, weight_a, weight_b, allora_row_scale(weight_a, weight_b, eta))
        return hidden @ weight_b.T

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, hidden, weight_a, weight_b, scale = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_output @ weight_b) @ weight_a
        scaled = (grad_output * scale.to(grad_output.dtype)).reshape(-1, weight_b.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = scaled.T @ hidden.reshape(-1, weight_b.shape[1])
        if ctx.needs_input_grad[1]:
            grad_a = (scaled @ weight_b).T @ x.reshape(-1, weight_a.shape[1])
        return grad_x, grad_a, grad_b, None


class ALLoRALinearVariant(LoraVariant):
    """PEFT LoRA variant: ALLoRA's backward while training, plain LoRA otherwise; merging is plain LoRA's."""

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        """``result + B A x``: through ``ALLoRAProduct`` while ``module`` trains, plain LoRA in eval mode.

        Args:
            module: the ``ALLoRALinear`` (``lora_A``, ``lora_B``, ``allora_eta``).
            active_adapter: the adapter to apply.
            x: the layer input, (..., d_in), in the adapter's dtype (PEFT casts it).
            result: the base layer's output, (..., d_out).
            **kwargs: further keyword arguments of the layer's forward (unused).

        Returns:
            (..., d_out) tensor.
        """
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        if not module.training:
            return result + lora_b(lora_a(x))
        return result + ALLoRAProduct.apply(x, lora_a.weight, lora_b.weight, module.allora_eta)


class ALLoRAQuantizedVariant(ALLoRALinearVariant):
    """``ALLoRALinearVariant`` for PEFT's bitsandbytes LoRA layers: the adapter term is added in ``result``'s dtype,
    as those layers add plain LoRA's (so outputs in eval mode equal vanilla PEFT QLoRA's in every dtype)."""

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        """``result + (B A x).to(result.dtype)``: through ``ALLoRAProduct`` while ``module`` trains.

        Args:
            module: the ``ALLoRALinear4bit`` / ``ALLoRALinear8bitLt`` (``lora_A``, ``lora_B``, ``allora_eta``).
            active_adapter: the adapter to apply.
            x: the layer input, (..., d_in), in the adapter's dtype (PEFT casts it) unless autocast is on.
            result: the bitsandbytes base layer's output, (..., d_out).
            **kwargs: further keyword arguments of the layer's forward (unused).

        Returns:
            (..., d_out) tensor in ``result``'s dtype.
        """
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        if not module.training:
            return result + lora_b(lora_a(x)).to(result.dtype)
        return result + ALLoRAProduct.apply(x, lora_a.weight, lora_b.weight, module.allora_eta).to(result.dtype)


class ALLoRALinear(LoraLinear):
    """PEFT's LoRA ``Linear`` (for ``nn.Linear`` and GPT-2 ``Conv1D`` bases) with the ALLoRA variant.

    Args:
        base_layer: an ``nn.Linear`` (exact type) or transformers ``Conv1D``, or a PEFT layer wrapping one.
        adapter_name: the adapter to create.
        config: its ``LoraConfig`` (see ``check_allora_config``); ``fan_in_fan_out`` is corrected to the base type
            with a warning, as PEFT does.
        eta: ALLoRA's eta (> 0).
        **kwargs: PEFT's layer keyword arguments (``r``, ``lora_alpha``, ...).

    Raises:
        ValueError: for any other base type, naming it.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, eta: float, **kwargs):
        base = base_layer_of(base_layer)
        if not is_plain_linear(base):
            raise ValueError(
                f"ALLoRALinear takes torch.nn.Linear (exact type) and transformers Conv1D bases, not "
                f"{type(base).__module__}.{type(base).__name__}; use enable_allora(config), which also builds the "
                "bitsandbytes 4/8-bit layers."
            )
        super().__init__(base_layer, adapter_name, config=config, **linear_layer_kwargs(base, config, kwargs))
        self.allora_eta = eta

    @property
    def lora_variants(self) -> dict:
        return {(): ALLoRALinearVariant}


class _ALLoRAQuantized(VariantFromMapping):
    """Mixin for PEFT's bitsandbytes LoRA layers, placed before them in the bases: ``lora_variants`` maps plain LoRA
    (``()``) to ``ALLoRAQuantizedVariant``, chosen from it by PEFT's generic lookup (``VariantFromMapping``).

    Constructed as PEFT's bnb layer, plus ``eta``: ``(base_layer, adapter_name, config, eta, r=..., lora_alpha=...,
    **kwargs)``; the bnb dispatchers' extra settings (``compute_dtype``, ``threshold``, ...) are not needed.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, eta: float, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.allora_eta = eta

    @property
    def lora_variants(self) -> dict:
        return {(): ALLoRAQuantizedVariant}


class ALLoRALinear4bit(_ALLoRAQuantized, LoraLinear4bit):
    """PEFT's QLoRA ``Linear4bit`` layer (bitsandbytes ``Linear4bit`` base, nf4 or fp4) trained with ALLoRA.

    Output ``base_layer(x) + B A x`` (bitsandbytes' 4-bit forward, then the adapter); ``ALLoRAProduct`` scales the
    gradients of A and B. Args as ``_ALLoRAQuantized``.
    """


class ALLoRALinear8bitLt(_ALLoRAQuantized, LoraLinear8bitLt):
    """PEFT's ``Linear8bitLt`` LoRA layer (bitsandbytes ``Linear8bitLt`` base) trained with ALLoRA.

    Output ``base_layer(x) + B A x`` (bitsandbytes' int8 forward, then the adapter); ``ALLoRAProduct`` scales the
    gradients of A and B. Args as ``_ALLoRAQuantized``.
    """


_QUANTIZED_LAYERS = ((bnb.nn.Linear4bit, ALLoRALinear4bit, 4), (bnb.nn.Linear8bitLt, ALLoRALinear8bitLt, 8))


def _dispatch_allora(target: nn.Module, adapter_name: str, config: LoraConfig, *, eta: float, **kwargs) -> nn.Module:
    """The layer factory: the ALLoRA layer for ``target``'s base type, an error naming the type otherwise.

    bitsandbytes layers are taken under PEFT's own condition: the model is loaded in 4/8 bit (``loaded_in_4bit`` /
    ``loaded_in_8bit``, from transformers' ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``).
    """
    base = base_layer_of(target)
    if is_plain_linear(base):
        return ALLoRALinear(target, adapter_name, config=config, eta=eta, **kwargs)
    name = f"{type(base).__module__}.{type(base).__name__}"
    for bnb_cls, layer_cls, bits in _QUANTIZED_LAYERS:
        if isinstance(base, bnb_cls):
            if not kwargs.get(f"loaded_in_{bits}bit"):
                raise ValueError(
                    f"use_allora: a {name} target is taken in a model loaded in {bits} bit only (PEFT's condition), "
                    f"and this model is not flagged so. Load it with transformers' BitsAndBytesConfig(load_in_{bits}"
                    f"bit=True), or set model.is_loaded_in_{bits}bit = True on a model whose bitsandbytes layers you "
                    "built yourself."
                )
            keep_training_layout(base)
            return layer_cls(target, adapter_name, config=config, eta=eta, **kwargs)
    raise ValueError(
        f"use_allora: ALLoRA is defined for linear layers (torch.nn.Linear, transformers Conv1D, and bitsandbytes "
        f"Linear4bit / Linear8bitLt in a model loaded in 4/8 bit), not {name}. Leave that layer out of "
        "target_modules, or train it without ALLoRA."
    )


def check_eta(eta: float) -> None:
    """Check ALLoRA's eta.

    Args:
        eta: the value to check.

    Raises:
        ValueError: ``eta`` is not a finite number > 0.
    """
    if not (0 < eta < math.inf):
        raise ValueError(f"allora_eta must be a finite number > 0, got {eta}.")


def check_allora_config(config: LoraConfig, eta: float) -> None:
    """Check that ``config`` has the LoRA settings ALLoRA is defined with and ``eta`` is valid.

    Args:
        config: the ``LoraConfig`` to train with ALLoRA.
        eta: ALLoRA's eta.

    Raises:
        TypeError: ``config`` is not a ``LoraConfig``.
        ValueError: a conflicting setting (dropout, ``lora_alpha != r``, rsLoRA, DoRA, LoRA bias, per-layer ranks or
            alphas) or an invalid ``eta``, naming the argument.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"use_allora needs a peft.LoraConfig, got {type(config).__name__}.")
    check_eta(eta)
    conflicts = {
        "lora_dropout": (
            config.lora_dropout != 0,
            f"ALLoRA is dropout-free: set lora_dropout=0 (got {config.lora_dropout})",
        ),
        "lora_alpha": (
            config.lora_alpha != config.r,
            f"ALLoRA has no scaling factor: set lora_alpha=r={config.r} (got {config.lora_alpha})",
        ),
        "use_rslora": (
            config.use_rslora,
            "rsLoRA rescales LoRA by alpha/sqrt(r); ALLoRA has no scaling: set use_rslora=False",
        ),
        "use_dora": (config.use_dora, "ALLoRA with DoRA is not defined: set use_dora=False or use_allora=False"),
        "lora_bias": (config.lora_bias, "ALLoRA adapts B A only: set lora_bias=False"),
        "alpha_pattern": (
            bool(config.alpha_pattern) or bool(config.rank_pattern),
            "per-layer ranks or alphas would give scalings other than 1: leave alpha_pattern and rank_pattern empty",
        ),
    }
    for name, (conflict, message) in conflicts.items():
        if conflict:
            raise ValueError(f"use_allora conflicts with {name}: {message}.")


def enable_allora(config: LoraConfig, eta: float = 2.0) -> LoraConfig:
    """A copy of ``config`` whose LoRA layers train with ALLoRA.

    Use it like any ``LoraConfig`` (``get_peft_model(model, enable_allora(LoraConfig(r=8, lora_alpha=8,
    lora_dropout=0.0)))``), on a full-precision model or one loaded in 4/8 bit with bitsandbytes (QLoRA); targets
    other than linear layers (``nn.Linear``, ``Conv1D``, bnb ``Linear4bit`` / ``Linear8bitLt``) are refused when
    the model is built, not silently given plain LoRA. The saved adapter is a plain LoRA adapter.

    Args:
        config: a ``LoraConfig`` that passes ``check_allora_config``; left unchanged.
        eta: the paper's eta (eta^2 = 4 by default).

    Returns:
        The copy, with the ALLoRA layer factory registered (``peft_compat.register_layer_factory``).

    Raises:
        TypeError, ValueError: as ``check_allora_config``.
    """
    check_allora_config(config, eta)
    config = copy.deepcopy(config)
    register_layer_factory(config, functools.partial(_dispatch_allora, eta=eta))
    return config
