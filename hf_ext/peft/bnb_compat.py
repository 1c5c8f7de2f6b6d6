"""Every use hf_ext.peft makes of bitsandbytes beyond its layer classes, in one module.

``hf_ext.peft.quantized_rows.QuantizedRows`` hands the factored DoRA norm the rows of a bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` weight one block of output rows at a time, with the values bnb's own
dequantization of the whole weight gives. bitsandbytes dequantizes whole tensors only, so reading rows needs its
storage layout. Per upstream symbol (each guarded by ``tests/peft/test_bnb_compat.py``, whose failures name it):

- ``bitsandbytes.nn.Params4bit`` / ``bitsandbytes.nn.Int8Params``: the weight classes that mark a layer as
  quantized (``quantized_kind``); a ``Params4bit`` is quantized once it has a ``quant_state``, an ``Int8Params``
  once its data is ``torch.int8``.
- ``Int8Params.SCB`` and ``Linear8bitLt.state.SCB``: the per-row absmax of an 8-bit weight (the layer's first
  forward moves it from the weight to its state, ``Linear8bitLt.init_8bit_state``); no accessor returns it.
- ``bitsandbytes.functional.int8_vectorwise_dequant(A, stats)``: row-wise ``A * stats / 127``, so a row slice of
  ``A`` with the same slice of ``stats`` gives those rows of the dequantized weight.
- ``Params4bit.quant_state`` and its fields ``shape``, ``dtype``, ``blocksize``, ``quant_type``, ``absmax``,
  ``nested``, ``state2``, ``offset``: the dequantized shape and dtype and the block statistics. With nested
  statistics the per-block absmax is ``dequantize_blockwise(absmax, state2) + offset``, as
  ``bitsandbytes.functional.dequantize_4bit`` computes it internally.
- the 4-bit layout: the row-major weight is split into blocks of ``blocksize`` consecutive values, block ``j``
  scaled by ``absmax[j]``; two codes per byte, the even element in the high nibble, so element ``k`` lives in byte
  ``k // 2`` of the storage read as ``uint8`` (whatever ``quant_storage`` dtype holds the bytes). When
  ``d_in % blocksize == 0`` the rows ``[a, b)`` are bytes ``[a d_in / 2, b d_in / 2)`` and blocks
  ``[a d_in / blocksize, b d_in / blocksize)``.
- ``bitsandbytes.functional.QuantState(absmax, shape, code, blocksize, quant_type, dtype)`` with
  ``dequantize_4bit(A, quant_state)``: dequantizes such a row slice; the documented ``absmax=``/``out=`` form
  needs the ``.out`` kernel, which bitsandbytes' CPU backend lacks.
- ``Linear4bit.support_avx512bf16_for_cpu`` and ``QuantState.packing_format_for_cpu`` (bitsandbytes >= 0.50): on a
  CPU with AVX512-BF16 a ``Linear4bit`` repacks its weight in place at its first eval forward without grad, for
  its fused inference kernel (another byte order, bf16 block statistics); ``_convert_weight_packed_for_cpu`` and
  ``_convert_weight_packed_for_cpu_inverse`` in ``bitsandbytes.functional`` convert between the two layouts.
"""

import functools
import warnings
from collections.abc import Callable
from typing import Literal

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn


QuantizedKind = Literal["4bit", "8bit"]


def quantized_kind(layer: nn.Module) -> QuantizedKind | None:
    """Which bitsandbytes storage ``layer.weight`` holds.

    Args:
        layer: any module; bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` once moved to their device.

    Returns:
        ``"4bit"`` for a quantized ``Params4bit``, ``"8bit"`` for an ``Int8Params`` holding int8 data, ``None``
        otherwise (no weight, a dense weight, or a bnb weight not quantized yet).
    """
    weight = getattr(layer, "weight", None)
    if isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None:
        return "4bit"
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
        return "8bit"
    return None


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    """The (d_out,) fp32 row absmax of an 8-bit weight, wherever bitsandbytes keeps it."""
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


def dequantized_spec(layer: nn.Module) -> tuple[torch.Size, torch.dtype]:
    """Shape (d_out, d_in) and dtype of the dense weight bitsandbytes dequantizes ``layer.weight`` to.

    Args:
        layer: a module with ``quantized_kind(layer)`` not ``None``.

    Returns:
        ``(shape, dtype)``: fp32 for 8-bit; the quantization dtype (``quant_state.dtype``) for 4-bit.
    """
    if quantized_kind(layer) == "8bit":
        return torch.Size(layer.weight.shape), torch.float32
    state = layer.weight.quant_state
    return torch.Size(state.shape), state.dtype


def storage_tensors(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """The tensors that hold ``layer``'s quantized weight: packed data and its statistics.

    Args:
        layer: a module with ``quantized_kind(layer)`` not ``None``.

    Returns:
        ``(weight, SCB)`` for 8-bit, ``(weight, quant_state.absmax)`` for 4-bit; re-quantizing the layer replaces
        or bumps the version of at least one of them.
    """
    if quantized_kind(layer) == "8bit":
        return layer.weight, _int8_scales(layer)
    return layer.weight, layer.weight.quant_state.absmax


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The whole dequantized weight, as ``peft.utils.integrations.dequantize_module_weight`` gives it, without its
    side effect on CPU (it re-assigns an 8-bit weight, after which bitsandbytes' CPU forward fails).

    Args:
        layer: a module with ``quantized_kind(layer)`` not ``None``.

    Returns:
        (d_out, d_in) tensor in the dtype of ``dequantized_spec(layer)``, on the weight's device.
    """
    weight = layer.weight
    if quantized_kind(layer) == "8bit":
        return bnbF.int8_vectorwise_dequant(weight.data, _int8_scales(layer).to(weight.device))
    return bnbF.dequantize_4bit(weight.data, weight.quant_state)


def row_dequantizer(layer: nn.Module) -> Callable[[int, int], torch.Tensor] | None:
    """A reader of contiguous output rows of ``layer``'s dequantized weight, equal to ``dequantize(layer)[a:b]``.

    Building it for 4-bit dequantizes the block statistics once (fp32, ``d_out * d_in / blocksize`` values).

    Args:
        layer: a module with ``quantized_kind(layer)`` not ``None``.

    Returns:
        ``read(a, b)`` giving the (b - a, d_in) rows in the dtype of ``dequantized_spec(layer)``, or ``None`` when
        rows do not hold whole 4-bit blocks (``d_in % blocksize != 0``; bitsandbytes' CPU kernel lays out blocks
        by the row shape it is given, so only a whole-weight dequantization is exact).
    """
    weight = layer.weight
    if quantized_kind(layer) == "8bit":
        data, scales = weight.data, _int8_scales(layer).to(weight.device)
        return lambda start, stop: bnbF.int8_vectorwise_dequant(data[start:stop], scales[start:stop])

    state = weight.quant_state
    d_in, blocksize = state.shape[1], state.blocksize
    if d_in % blocksize:
        return None
    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    packed = weight.data.view(torch.uint8).reshape(-1)  # byte k holds elements 2k (high) and 2k + 1 (low)
    blocks_per_row = d_in // blocksize

    def read(start: int, stop: int) -> torch.Tensor:
        rows_state = bnbF.QuantState(
            absmax=absmax[start * blocks_per_row : stop * blocks_per_row],
            shape=torch.Size([stop - start, d_in]),
            code=state.code,
            blocksize=blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        rows = packed[start * d_in // 2 : stop * d_in // 2]
        return bnbF.dequantize_4bit(rows, rows_state).view(stop - start, d_in)

    return read


def keep_training_layout(layer: nn.Module) -> None:
    """Keeps ``layer``'s 4-bit weight in the layout that training, merging and ``row_dequantizer`` read.

    bitsandbytes' CPU repacking for inference (module docstring) breaks what an adapter does next: a training
    forward after an eval pass fails inside bitsandbytes, and dequantizing the repacked weight (PEFT's merge, the
    QDoRA norm) reads the wrong layout. So for ``layer`` the repacking is turned off (warned once per process; its
    eval forward then dequantizes and multiplies, as training does), and a weight repacked already is converted
    back by bitsandbytes' inverse (exact but for the bf16-rounded block statistics).

    Args:
        layer: any module; only a bitsandbytes ``Linear4bit`` changes.
    """
    if not isinstance(layer, bnb.nn.Linear4bit):
        return
    if getattr(layer, "support_avx512bf16_for_cpu", False):
        layer.support_avx512bf16_for_cpu = False
        _warn_repacking_off()
    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        layer.weight.data, layer.weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(
            layer.weight.data, state
        )


@functools.cache
def _warn_repacking_off() -> None:
    warnings.warn(
        "bitsandbytes' AVX512-BF16 repacking of 4-bit weights for CPU inference is turned off on the Linear4bit "
        "layers that hf_ext adapters wrap: training after an eval pass, merging and QDoRA need the training layout. "
        "Their eval forward on CPU dequantizes and multiplies instead.",
        stacklevel=3,
    )
