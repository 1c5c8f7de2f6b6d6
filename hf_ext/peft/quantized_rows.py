"""Row blocks of a bitsandbytes 4-bit or 8-bit base weight, dequantized on demand (QDoRA's factored norm).

PEFT's QDoRA (``dequantize_module_weight``) dequantizes the whole d_out x d_in weight every forward. The factored
norm (``hf_ext.kernels.dora_norm``) reads W one block of output rows at a time, so a ``QuantizedRows`` hands it
exactly those rows, with the values ``dequantize_module_weight`` would give (bnb's own dequantization of a slice
of the quantized storage, ``hf_ext.peft.bnb_compat.row_dequantizer``):

- ``Int8Params`` (``Linear8bitLt``): row-wise absmax, rows ``[a, b)`` are ``int8[a:b] * SCB[a:b] / 127`` (fp32);
- ``Params4bit`` (``Linear4bit``, nf4/fp4, nested statistics or not): when ``d_in`` is a multiple of the block
  size every row holds whole blocks and rows ``[a, b)`` are dequantized from their packed bytes and block scales;
  otherwise the whole weight is dequantized once per ``QuantizedRows`` and sliced.

``cache_key()`` identifies the quantized storage (packed data and statistics: pointer, version, shape, dtype), so
``||W||^2`` can be cached across steps and is recomputed when the layer is re-quantized or merged.
"""

import functools

import torch

from hf_ext.peft.bnb_compat import dequantize, dequantized_spec, quantized_kind, row_dequantizer, storage_tensors


class QuantizedRows:
    """The dequantized (d_out, d_in) weight of a bnb ``Linear4bit`` / ``Linear8bitLt``, one row slice at a time.

    The row source ``hf_ext.kernels.dora_norm.factored_row_norm`` takes: ``shape``, ``dtype``, ``device``,
    ``is_cuda``, ``dim()``, ``row_bytes`` and ``rows[a:b]``.

    Args:
        base_layer: a bitsandbytes layer whose weight is quantized (``bnb_compat.quantized_kind`` not ``None``).

    Raises:
        TypeError: for any other layer.
    """

    def __init__(self, base_layer: torch.nn.Module):
        kind = quantized_kind(base_layer)
        if kind is None:
            raise TypeError(
                f"QuantizedRows needs a bitsandbytes Linear4bit or Linear8bitLt with quantized weights, got "
                f"{type(base_layer).__name__} with a {type(getattr(base_layer, 'weight', None)).__name__} weight."
            )
        self._layer = base_layer
        self._kind = kind
        self.shape, self.dtype = dequantized_spec(base_layer)
        self.device = base_layer.weight.device
        self.is_cuda = base_layer.weight.is_cuda
        self._dense = None

    @functools.cached_property
    def _read_rows(self):
        """bnb's row reader, built on the first row read: a forward that finds its norm cached (PEFT's
        ``DoraCaching``) never pays for the block statistics it prepares."""
        return row_dequantizer(self._layer)

    def dim(self) -> int:
        """2, as for the dense (d_out, d_in) weight."""
        return 2

    @property
    def row_bytes(self) -> int:
        """fp32 working bytes one row costs the norm: the dequantized row, plus its fp32 copy if it is not fp32."""
        d_in = self.shape[1]
        return d_in * 4 + (0 if self.dtype == torch.float32 else d_in * self.dtype.itemsize)

    def cache_key(self) -> tuple:
        """A hashable key that changes when the quantized storage is replaced or modified in place.

        Returns:
            ``(kind, shape, dtype, device, ((data_ptr, _version, shape, dtype), ...))`` over the packed data and
            its statistics.
        """
        parts = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in storage_tensors(self._layer))
        return (self._kind, tuple(self.shape), self.dtype, self.device, parts)

    def dense(self) -> torch.Tensor:
        """The whole dequantized weight, (d_out, d_in) in ``self.dtype``, computed once per ``QuantizedRows``."""
        if self._dense is None:
            self._dense = dequantize(self._layer)
        return self._dense

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows ``[a, b)`` of the dequantized weight, (b - a, d_in) in ``self.dtype``; contiguous slices only."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"QuantizedRows takes contiguous row slices, got step {step}")
        if self._dense is None and self._read_rows is not None:
            return self._read_rows(start, stop)
        return self.dense()[start:stop]
