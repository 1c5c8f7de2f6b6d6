"""4-bit quantisation of optimizer states — Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States",
arXiv 2309.01507.

A quantizer normalises by a scale s, then maps to the nearest entry of a sorted 16-entry codebook T:

    x_hat = x / s,    q = argmin_i |x_hat - T[i]|  (ties go to the lower index),    x_tilde = T[q] * s

- first moment m: block-wise absmax scales (``s_b = max |x|`` over consecutive blocks of ``block_size`` elements
  of the flattened tensor, last block zero-padded) and the signed dynamic-exponent map (``dynamic_exponent_map``);
- second moment v: the linear map without zero, ``T[i] = (i + 1) / 16``, so no positive v dequantizes to 0 (the
  paper's zero-point fix); scales are rank-1 for tensors with >= 2 non-singleton dimensions,
  ``s[i1..in] = min_k r_k[i_k]`` with ``r_k`` the absmax over every dimension but k, and block-wise otherwise.

A zero scale is kept as 0 and divides as 1, so an all-zero block, row or column dequantizes to exactly 0.
Codes are packed two per byte, element 2j in the low nibble (lpmm's order). This module is the bottom layer of the
4-bit optimizer: pure torch, imported by ``hf_ext.kernels.adamw4bit_step`` and ``hf_ext.optim``, importing
neither.
"""

import functools
import math

import torch


# Sorted signed dynamic-exponent map (lpmm ``create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)``),
# as fp32 bit patterns: the magnitudes 0.0325 and 0.2125 are one ulp away from the fp32 rounding of the decimal.
DE_MAP_BITS = (
    0xBF633333, 0xBF29999A, 0xBEE00000, 0xBE599999, 0xBD9EB852, 0xBD051EB9, 0xBBB43958, 0x00000000,
    0x3BB43958, 0x3D051EB9, 0x3D9EB852, 0x3E599999, 0x3EE00000, 0x3F29999A, 0x3F633333, 0x3F800000,
)  # fmt: skip
DE_ZERO_CODE = 7  # DE_MAP[7] == 0: the code of an all-zero first-moment block
LINEAR_ZERO_CODE = 0  # with a zero scale, code 0 of the linear map dequantizes to 0


@functools.cache
def _map_on(name: str, device: torch.device) -> torch.Tensor:
    if name == "de":
        bits = [b - (1 << 32) if b >= 1 << 31 else b for b in DE_MAP_BITS]
        return torch.tensor(bits, dtype=torch.int32).view(torch.float32).to(device)
    if name == "linear":
        return (torch.arange(1, 17, dtype=torch.float32) / 16).to(device)
    raise ValueError(f"unknown codebook {name!r}; allowed: 'de', 'linear'")


def dynamic_exponent_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 4-bit dynamic-exponent codebook of the first moment (arXiv 2309.01507).

    Args:
        device: where the codebook lives (one cached tensor per device: do not modify it).

    Returns:
        fp32 (16,), strictly increasing from -0.8875 to 1.0, with an exact 0 at ``DE_ZERO_CODE``; entry i has the
        bit pattern ``DE_MAP_BITS[i]``.
    """
    return _map_on("de", torch.device(device))


def linear_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The unsigned 4-bit linear codebook without zero of the second moment: ``T[i] = (i + 1) / 16``.

    Args:
        device: where the codebook lives (one cached tensor per device: do not modify it).

    Returns:
        fp32 (16,), ``1/16, 2/16, ..., 1``.
    """
    return _map_on("linear", torch.device(device))


def code_midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """Decision thresholds of a sorted codebook: ``(T[k] + T[k+1]) * 0.5``, one fp32 add and one multiply.

    Args:
        codebook: fp32 (16,), sorted ascending.

    Returns:
        fp32 (15,).
    """
    return (codebook[:-1] + codebook[1:]) * 0.5


def nearest_code(normalized: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry, ties to the lower index: the number of midpoints strictly below x.

    Args:
        normalized: fp32 values x / s, any shape.
        codebook: fp32 (16,), sorted ascending, on the device of ``normalized``.

    Returns:
        uint8 codes in [0, 15], the shape of ``normalized``.
    """
    midpoints = code_midpoints(codebook)
    return torch.searchsorted(midpoints, normalized.contiguous(), right=False).to(torch.uint8)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, ``byte[j] = codes[2j] | codes[2j+1] << 4``; an odd count is padded with code 0.

    Block tiles are even-sized, so block-wise states pack ``tile[:2 * ceil(N / 2)]`` (``pack_tile``) and their pad
    nibble is the code of the zero padding.

    Args:
        codes: integer codes in [0, 15], any shape, read in row-major order (N elements).

    Returns:
        uint8 (ceil(N / 2),).
    """
    flat = codes.flatten().to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def pack_tile(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """Pack the codes of a zero-padded block tile that stand for a tensor of ``numel`` elements.

    Args:
        codes: uint8 (num_blocks, block_size) codes, ``block_size`` even.
        numel: N, the element count of the tensor the tile holds.

    Returns:
        uint8 (ceil(N / 2),): ``pack_4bit`` of the first ``2 * ceil(N / 2)`` codes in row-major order.
    """
    return pack_4bit(codes.flatten()[: 2 * math.ceil(numel / 2)])


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_4bit``.

    Args:
        packed: uint8 (ceil(N / 2),) or longer.
        numel: N, how many codes to return (at most ``2 * packed.numel()``).

    Returns:
        uint8 (N,) codes in [0, 15], flat.
    """
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=1).flatten()[:numel]


def num_blocks(numel: int, block_size: int) -> int:
    """Number of quantisation blocks of a tensor: ``ceil(numel / block_size)``."""
    return math.ceil(numel / block_size)


def as_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten (row-major), zero-pad to a multiple of ``block_size`` and view as blocks.

    Args:
        x: any shape and dtype, N elements.
        block_size: elements per block.

    Returns:
        (ceil(N / block_size), block_size) in the dtype of ``x``; a view of ``x`` when no padding is needed.
    """
    flat = x.flatten()
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale to divide by: a zero scale divides as 1 (its values are all 0 and map to the zero code).

    Args:
        scale: fp32 scales >= 0, any shape.

    Returns:
        fp32, the shape of ``scale``: ``scale`` where > 0, else 1.
    """
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_blockwise(x: torch.Tensor, codebook: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantisation: ``s_b = max_{i in b} |x_i|``, ``q_i = nearest_code(x_i / s_b)``.

    Args:
        x: any shape and float dtype, N elements (upcast to fp32); the last block is zero-padded.
        codebook: fp32 (16,), sorted ascending, on the device of ``x``.
        block_size: elements per block, even.

    Returns:
        (packed, absmax): uint8 (ceil(N / 2),) codes as ``pack_tile`` lays them out (padding quantized as 0) and
        fp32 (ceil(N / block_size),) scales.
    """
    blocks = as_blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    codes = nearest_code(blocks / safe_scale(absmax)[:, None], codebook)
    return pack_tile(codes, x.numel()), absmax


def dequantize_blockwise(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    block_size: int,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise`` up to rounding: ``x_tilde_i = T[q_i] * s_b``.

    Args:
        packed: uint8 (ceil(N / 2),) codes.
        absmax: fp32 (ceil(N / block_size),) scales.
        codebook: fp32 (16,), the one the codes were chosen from.
        shape: the shape of the result, N = prod(shape) elements.
        block_size: elements per block.

    Returns:
        fp32 tensor of ``shape``.
    """
    numel = math.prod(shape)
    codes = as_blocks(unpack_4bit(packed, numel), block_size).long()
    return (codebook[codes] * absmax[:, None]).flatten()[:numel].view(shape)


def squeezed_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape without singleton dimensions: rank-1 on (1, N) would store N scales, so it is normalised as (N,).

    Args:
        shape: any tensor shape.

    Returns:
        ``shape`` with every size-1 dimension dropped (``()`` for a one-element tensor).
    """
    return tuple(size for size in shape if size != 1)


def uses_rank1(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether v of a tensor of ``shape`` gets rank-1 scales: it needs >= 2 non-singleton dimensions; otherwise v
    falls back to block-wise scales."""
    return len(squeezed_shape(shape)) >= 2


def rank1_statistics(x: torch.Tensor) -> list[torch.Tensor]:
    """Per-dimension absmax vectors ``r_k[i] = max |x[..., i (at dim k), ...]|`` over all other dimensions.

    Args:
        x: (n_0, ..., n_{d-1}), any float dtype (upcast to fp32).

    Returns:
        d fp32 vectors, the k-th of shape (n_k,).
    """
    magnitude = x.float().abs()
    dims = range(magnitude.dim())
    return [magnitude.amax(dim=tuple(d for d in dims if d != k)) for k in dims]


def rank1_scale(stats: list[torch.Tensor]) -> torch.Tensor:
    """Rank-1 scale of every element, ``s[i_0, ..., i_{d-1}] = min_k r_k[i_k]``; for a matrix min(rowmax, colmax).

    Args:
        stats: d fp32 vectors (``rank1_statistics``), the k-th of shape (n_k,).

    Returns:
        fp32 (n_0, ..., n_{d-1}).
    """
    scale = None
    for k, stat in enumerate(stats):
        shape = [1] * len(stats)
        shape[k] = stat.numel()
        scale = stat.view(shape) if scale is None else torch.minimum(scale, stat.view(shape))
    return scale


def quantize_rank1(
    x: torch.Tensor, codebook: torch.Tensor, reduce=None, shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rank-1 quantisation: ``q = nearest_code(x / min_k r_k[i_k])`` on ``x`` reshaped to its squeezed shape.

    Args:
        x: any shape and float dtype, N elements (upcast to fp32).
        codebook: fp32 (16,), sorted ascending, on the device of ``x``.
        reduce: optional callable given the statistics list before any code is chosen, which may change them in
            place (a sharded optimizer takes each statistic's maximum across the ranks holding other slices of x).
        shape: the shape whose per-dimension maxima are the statistics, N elements; default
            ``squeezed_shape(x.shape)`` (a shard of rows passes its own, which may have a single row).

    Returns:
        (packed, stats): uint8 (ceil(N / 2),) codes in row-major order and the fp32 ``rank1_statistics`` of ``x``
        reshaped to ``shape`` (one vector per dimension), after ``reduce``.
    """
    x = x.float().reshape(squeezed_shape(x.shape) if shape is None else shape)
    stats = rank1_statistics(x)
    if reduce is not None:
        reduce(stats)
    codes = nearest_code(x / safe_scale(rank1_scale(stats)), codebook)
    return pack_4bit(codes), stats


def dequantize_rank1(
    packed: torch.Tensor, stats: list[torch.Tensor], codebook: torch.Tensor, shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """Inverse of ``quantize_rank1`` up to rounding: ``x_tilde = T[q] * min_k r_k[i_k]``.

    Args:
        packed: uint8 (ceil(N / 2),) codes.
        stats: fp32 vectors (n_k,) with prod_k n_k = N.
        codebook: fp32 (16,), the one the codes were chosen from.
        shape: the shape of the result, any with N elements.

    Returns:
        fp32 tensor of ``shape``.
    """
    scale = rank1_scale(stats)
    codes = unpack_4bit(packed, scale.numel()).long().view(scale.shape)
    return (codebook[codes] * scale).view(shape)
