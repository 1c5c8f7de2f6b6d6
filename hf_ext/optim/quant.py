"""4-bit quantisation of optimizer states (Li, Chen & Zhu, 4-bit optimizer states) — arXiv 2309.01507.

A quantizer normalises, then maps to the nearest entry of a sorted 16-entry codebook T:

    x_hat = x / s,    q = argmin_i |x_hat - T[i]|  (ties go to the lower index),    x_tilde = T[q] * s

- first moment m: block-wise absmax scales (``s_b = max |x|`` over consecutive blocks of 128 elements of the
  flattened tensor, last block zero-padded) and the signed dynamic-exponent map ``DE_MAP``;
- second moment v: the linear map without zero, ``T[i] = (i + 1) / 16``, so no positive v dequantizes to 0 (the
  paper's zero-point fix); scales are rank-1 for tensors with >= 2 non-singleton dimensions,
  ``s[i1..in] = min_k r_k[i_k]`` with ``r_k`` the absmax over every dimension but k, and block-wise otherwise.

A zero scale is kept as 0 and divides as 1, so an all-zero block, row or column dequantizes to exactly 0.
Codes are packed two per byte, element 2j in the low nibble (lpmm's order). Pure torch, no TRL/Transformers.
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
    """Signed 4-bit dynamic-exponent codebook (16 sorted fp32 values, -0.8875 .. 1.0, with an exact 0)."""
    return _map_on("de", torch.device(device))


def linear_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """Unsigned 4-bit linear codebook without zero: (i + 1) / 16, i = 0..15."""
    return _map_on("linear", torch.device(device))


def code_midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """The 15 fp32 decision thresholds (T[k] + T[k+1]) * 0.5 of a sorted codebook."""
    return (codebook[:-1] + codebook[1:]) * 0.5


def nearest_code(normalized: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest codebook entry: the number of midpoints strictly below x (ties go down)."""
    midpoints = code_midpoints(codebook)
    return torch.searchsorted(midpoints, normalized.contiguous(), right=False).to(torch.uint8)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, byte j = codes[2j] | codes[2j+1] << 4; an odd count is padded with code 0.

    Block tiles are even-sized, so block-wise states pack ``tile[:2 * ceil(N / 2)]`` (``pack_tile``) and their pad
    nibble is the code of the zero padding.
    """
    flat = codes.flatten().to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def pack_tile(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """Pack the first ceil(N/2) code pairs of a zero-padded (num_blocks, block_size) tile."""
    return pack_4bit(codes.flatten()[: 2 * math.ceil(numel / 2)])


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_4bit``: the first ``numel`` uint8 codes, flat."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=1).flatten()[:numel]


def num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def as_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten (row-major), zero-pad to a multiple of ``block_size`` and view as (num_blocks, block_size)."""
    flat = x.flatten()
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale divides as 1 (its values are all 0 and map to the zero code)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def blockwise_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 (num_blocks,) absmax of consecutive ``block_size`` blocks of the flattened tensor."""
    return as_blocks(x.float(), block_size).abs().amax(dim=1)


def quantize_blockwise(x: torch.Tensor, codebook: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes [ceil(N/2)], fp32 absmax [ceil(N/block_size)]); padding is quantized as 0."""
    blocks = as_blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    codes = nearest_code(blocks / safe_scale(absmax)[:, None], codebook)
    return pack_tile(codes, x.numel()), absmax


def dequantize_blockwise(
    packed: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, shape: torch.Size, block_size: int
) -> torch.Tensor:
    numel = math.prod(shape)
    codes = as_blocks(unpack_4bit(packed, numel), block_size).long()
    return (codebook[codes] * absmax[:, None]).flatten()[:numel].view(shape)


def squeezed_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape without singleton dimensions: rank-1 on (1, N) would store N scales, so it is normalised as (N,)."""
    return tuple(size for size in shape if size != 1)


def uses_rank1(shape: torch.Size | tuple[int, ...]) -> bool:
    """Rank-1 normalisation needs >= 2 non-singleton dimensions; otherwise v falls back to block-wise scales."""
    return len(squeezed_shape(shape)) >= 2


def rank1_statistics(x: torch.Tensor) -> list[torch.Tensor]:
    """Per dimension k of ``x``, the fp32 absmax over all other dimensions (a vector of length shape[k])."""
    magnitude = x.float().abs()
    dims = range(magnitude.dim())
    return [magnitude.amax(dim=tuple(d for d in dims if d != k)) for k in dims]


def rank1_scale(stats: list[torch.Tensor]) -> torch.Tensor:
    """Per element scale min_k r_k[i_k], shape (len(r_0), ..., len(r_{n-1})); for a matrix min(rowmax_i, colmax_j)."""
    scale = None
    for k, stat in enumerate(stats):
        shape = [1] * len(stats)
        shape[k] = stat.numel()
        scale = stat.view(shape) if scale is None else torch.minimum(scale, stat.view(shape))
    return scale


def quantize_rank1(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(packed codes [ceil(N/2)], per-dimension fp32 statistics of ``x`` reshaped to its squeezed shape)."""
    x = x.float().reshape(squeezed_shape(x.shape))
    stats = rank1_statistics(x)
    codes = nearest_code(x / safe_scale(rank1_scale(stats)), codebook)
    return pack_4bit(codes), stats


def dequantize_rank1(
    packed: torch.Tensor, stats: list[torch.Tensor], codebook: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    scale = rank1_scale(stats)
    codes = unpack_4bit(packed, scale.numel()).long().view(scale.shape)
    return (codebook[codes] * scale).view(shape)
