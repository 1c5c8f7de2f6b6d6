"""Row blocks of a bitsandbytes 4-bit or 8-bit base weight, dequantized on demand (QDoRA's factored norm).

PEFT's QDoRA (``dequantize_module_weight``) dequantizes the whole d_out x d_in weight every forward. The factored
norm (``hf_ext.kernels.dora_norm``) reads W one block of output rows at a time, so a ``QuantizedRows`` hands it
exactly those rows, with the values ``dequantize_module_weight`` would give (bnb's own dequantization of a slice
of the quantized storage):

- ``Int8Params`` (``Linear8bitLt``): row-wise absmax, rows ``[a, b)`` are ``int8[a:b] * SCB[a:b] / 127`` (fp32);
- ``Params4bit`` (``Linear4bit``, nf4/fp4, nested statistics or not): blocks of ``blocksize`` consecutive values
  of the row-major weight; when ``d_in`` is a multiple of ``blocksize`` every row holds whole blocks and rows
  ``[a, b)`` are dequantized from their packed bytes and absmax entries. Otherwise (rare: a row would split a
  block, and bitsandbytes' CPU kernel indexes blocks per row shape) the whole weight is dequantized once per call.

``cache_key()`` identifies the quantized storage (packed data and statistics: pointer, version, shape, dtype), so
``||W||^2`` can be cached across steps and is recomputed when the layer is re-quantized or merged.
"""

import functools

import bitsandbytes.functional as bnbF
import torch
from peft.utils.integrations import get_bnb_param_type


def is_quantized_bnb(base_layer: torch.nn.Module) -> bool:
    """A bnb base layer whose weight is stored quantized (8-bit int8 data or 4-bit packed)."""
    weight = getattr(base_layer, "weight", None)
    kind = get_bnb_param_type(weight) if weight is not None else False
    return kind == "4bit" or (kind == "8bit" and weight.dtype == torch.int8)


class QuantizedRows:
    """The dequantized (d_out, d_in) weight of a bnb ``Linear4bit`` / ``Linear8bitLt``, one row slice at a time."""

    def __init__(self, base_layer: torch.nn.Module):
        if not is_quantized_bnb(base_layer):
            raise TypeError(
                f"QuantizedRows needs a bitsandbytes Linear4bit or Linear8bitLt with quantized weights, got "
                f"{type(base_layer).__name__} with a {type(getattr(base_layer, 'weight', None)).__name__} weight."
            )
        weight = base_layer.weight
        self.device = weight.device
        self.is_cuda = weight.is_cuda
        self._dense = None
        if get_bnb_param_type(weight) == "8bit":
            self._kind = "8bit"
            self.shape = torch.Size(weight.shape)
            self.dtype = torch.float32
            scb = weight.SCB if getattr(weight, "SCB", None) is not None else base_layer.state.SCB
            self._scb = scb.to(weight.device)
            self._stats = (scb,)
        else:
            self._kind = "4bit"
            state = weight.quant_state
            self.shape = torch.Size(state.shape)
            self.dtype = state.dtype
            self._state = state
            self._stats = (state.absmax,)
        self._weight = weight

    @functools.cached_property
    def _absmax(self) -> torch.Tensor:
        """The 4-bit blocks' fp32 scales (nested statistics dequantized), computed only when rows are read: a
        forward that finds its norm cached (PEFT's ``DoraCaching``) never pays for it."""
        state = self._state
        absmax = state.absmax
        if state.nested:
            absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return absmax.float()

    def dim(self) -> int:
        return 2

    @property
    def row_bytes(self) -> int:
        """fp32 working bytes one row costs the norm: the dequantized row, plus its fp32 copy if it is not fp32."""
        d_in = self.shape[1]
        return d_in * 4 + (0 if self.dtype == torch.float32 else d_in * self.dtype.itemsize)

    def cache_key(self) -> tuple:
        parts = [(t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in (self._weight, *self._stats)]
        return (self._kind, tuple(self.shape), self.dtype, self.device, tuple(parts))

    def dense(self) -> torch.Tensor:
        """The whole dequantized weight: ``dequantize_module_weight``'s values, without its side effect on CPU (it
        re-assigns an 8-bit weight, after which bitsandbytes' CPU forward fails)."""
        if self._dense is None:
            if self._kind == "8bit":
                self._dense = bnbF.int8_vectorwise_dequant(self._weight.data, self._scb)
            else:
                self._dense = bnbF.dequantize_4bit(self._weight.data, self._state)
        return self._dense

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"QuantizedRows takes contiguous row slices, got step {step}")
        data = self._weight.data
        if self._kind == "8bit":
            return bnbF.int8_vectorwise_dequant(data[start:stop], self._scb[start:stop])
        d_in, blocksize = self.shape[1], self._state.blocksize
        if self._dense is not None or d_in % blocksize:
            return self.dense()[start:stop]
        per_row = d_in // blocksize
        chunk_state = bnbF.QuantState(
            absmax=self._absmax[start * per_row : stop * per_row],
            shape=torch.Size([stop - start, d_in]),
            code=self._state.code,
            blocksize=blocksize,
            quant_type=self._state.quant_type,
            dtype=self.dtype,
        )
        packed = data.view(torch.uint8).reshape(-1)[start * d_in // 2 : stop * d_in // 2]  # any quant_storage
        return bnbF.dequantize_4bit(packed, chunk_state).view(stop - start, d_in)
