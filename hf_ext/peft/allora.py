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
way; nothing is added to ``adapter_config.json``. ``ALLoRALinear`` takes the variant through PEFT's documented
``lora_variants`` property; the layer factory goes through ``hf_ext.peft.peft_compat``.
"""

import copy
import functools
import math

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from hf_ext.peft.peft_compat import (
    LoraVariant,
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
                f"use_allora: ALLoRA is defined for plain linear layers (torch.nn.Linear, transformers Conv1D), not "
                f"{type(base).__module__}.{type(base).__name__}. Leave that layer out of target_modules, or train it "
                "without ALLoRA."
            )
        super().__init__(base_layer, adapter_name, config=config, **linear_layer_kwargs(base, config, kwargs))
        self.allora_eta = eta

    @property
    def lora_variants(self) -> dict:
        return {(): ALLoRALinearVariant}


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
    lora_dropout=0.0)))``); targets other than linear layers are refused when the model is built, not silently
    given plain LoRA. The saved adapter is a plain LoRA adapter.

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
    register_layer_factory(config, functools.partial(ALLoRALinear, eta=eta))
    return config
