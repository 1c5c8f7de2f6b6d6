"""DoRA's weight row norm from the LoRA factors — Zelenin & Zhuravlyova, arXiv 2603.22276 (Scaling DoRA).

DoRA (Liu et al., arXiv 2402.09353) scales each output row by ``m_i / n_i`` with, per output feature i,

    n_i^2 = ||W_i + s (B A)_i||^2
          = ||W_i||^2  +  2 s sum_k B_ik U_ik  +  s^2 sum_k (B G)_ik B_ik,    U = W A^T (d_out x r), G = A A^T (r x r)

so no d_out x d_in temporary (PEFT's ``B A``) is ever formed. ``W`` is (d_out, d_in) after undoing
``fan_in_fan_out`` (GPT-2's Conv1D stores it transposed), ``A = lora_A.weight`` (r, d_in), ``B = lora_B.weight``
(d_out, r). Everything accumulates in fp32 whatever the input dtypes; ``n^2`` is clamped at 0 before the sqrt;
the result is detached (DoRA treats n as a constant) and fp32, shape (d_out,).

Algorithm, shared by both implementations: ``A`` is upcast once (a no-op for PEFT's default fp32 adapters) and ``G``
formed once; output rows are processed in chunks sized so that what the call allocates in fp32 stays under
``chunk_bytes`` (with one exception: the rows always get at least half of it, so a fixed part near or above the
budget, e.g. a bf16 A upcast at high rank, is exceeded by that half): the fixed part (G, the output, and A if it is
upcast) plus per row U and B G, and the W and B rows if they are upcast (a fp32 W is used in place, so only a
bf16/fp16 base pays for its rows, on the twin's path). Per chunk, ``U = W_c A^T`` and ``||W_c||^2`` (unless the
caller passes a cached ``weight_sq``, ``weight_sq_norms``) come from ``weight_lora_product_torch`` (a fp32 copy of the
rows, a torch GEMM) or ``weight_lora_product_triton`` (one Triton GEMM that reads W in its own dtype and strides and
accumulates in fp32; W rows then cost the budget nothing), and a chunk's temporaries are freed before the next chunk;
the per-row combination ``||W||^2 + 2 s rowdot(B, U) + s^2 rowdot(B G, B)``, clamp and sqrt is done by

- ``combine_rows_torch``: the pure-torch twin;
- ``combine_rows_triton``: a Triton kernel, one program per ``BLOCK_M`` rows, looping over rank blocks of
  ``BLOCK_R`` (``B G`` is built block by block with fp32 ``tl.dot`` (``input_precision="ieee"``, no TF32) and
  never stored).

With ``s == 0`` the LoRA terms are skipped (n = ||W||). Dispatch (``factored_row_norm``): the kernels for CUDA tensors
when triton imports (the product kernel for a dense W, not a row source), the twins elsewhere;
``HF_EXT_DISABLE_TRITON=1`` forces the twin (the rule lives in ``hf_ext.kernels.dispatch``). The two agree to fp32
rounding, not bit for bit (different summation order). To run the kernel on CPU tensors, set TRITON_INTERPRET=1 before
triton is first imported.
"""

import torch

from hf_ext.kernels.dispatch import FMA_ALLOWED, tl, triton, use_triton  # noqa: F401 (tl: used by the kernel when triton imports)


# Budget for the fp32 temporaries of one call; benchmarks/bench_dora.py measures the transient and time it gives.
DEFAULT_CHUNK_BYTES = 4 * 2**20
BLOCK_M = 32
BLOCK_R = 32
PRODUCT_BLOCK_K = 64  # columns of W per tile of the U = W A^T kernel
PRODUCT_BLOCK_R = 64  # the most ranks one program of that kernel accumulates (more: programs side by side)
_FP32 = 4


def _oriented(weight, fan_in_fan_out: bool):
    """``W`` as (d_out, d_in): a view, transposed when the layer stores it as (d_in, d_out); row sources as given."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (a Linear or Conv1D weight), got shape {tuple(weight.shape)}")
    if not isinstance(weight, torch.Tensor) and fan_in_fan_out:
        raise ValueError("a row source (e.g. QuantizedRows) is already (d_out, d_in); pass fan_in_fan_out=False")
    return weight.t() if fan_in_fan_out else weight


def weight_row_bytes(w) -> int:
    """fp32 bytes one W row costs a chunk: 0 for a fp32 tensor (used in place), its fp32 copy for other dtypes, and
    a row source's own ``row_bytes`` (dequantized row plus upcast)."""
    if not isinstance(w, torch.Tensor):
        return w.row_bytes
    return 0 if w.dtype == torch.float32 else w.shape[1] * _FP32


def rows_per_chunk(
    d_out: int, d_in: int, rank: int, chunk_bytes: int, weight_row_bytes: int | None = None, upcast_factors=True
) -> int:
    """Output rows per chunk: fixed fp32 part (G, output, A if upcast) plus per row (U, B G, the W row's
    ``weight_row_bytes`` (default: a fp32 copy) and the B row if upcast) under ``chunk_bytes``. The rows always get
    at least half the budget: a fixed part near or above it (a bf16 A at high rank) must not shrink chunks to a few
    rows, since GEMMs over a few rows are slow.

    Returns:
        int in [1, d_out]."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}; the default is {DEFAULT_CHUNK_BYTES}")
    w_row = d_in * _FP32 if weight_row_bytes is None else weight_row_bytes
    fixed = (rank * rank + d_out + (rank * d_in if upcast_factors else 0)) * _FP32
    per_row = (2 * rank + (rank if upcast_factors else 0)) * _FP32 + w_row
    return max(1, min(d_out, max(chunk_bytes - fixed, chunk_bytes // 2) // max(per_row, 1)))


def _row_sq(block: torch.Tensor) -> torch.Tensor:
    """``||row||^2`` of each row, fp32, from one reduction that reads ``block`` in its own dtype (no squared or upcast
    copy); on CPU several times faster than a batched-dot einsum, and no less accurate."""
    return torch.linalg.vector_norm(block, dim=1, dtype=torch.float32).square()


def weight_sq_norms(weight, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``||W_i||^2`` per output row, fp32, detached, shape (d_out,): cache it per module (W is frozen).

    ``weight``: a 2-D tensor or a row source (see ``factored_row_norm``)."""
    w = _oriented(weight, fan_in_fan_out)
    d_out, d_in = w.shape
    step = rows_per_chunk(d_out, d_in, 0, DEFAULT_CHUNK_BYTES, weight_row_bytes(w))
    out = torch.empty(d_out, dtype=torch.float32, device=w.device)
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        for start in range(0, d_out, step):
            out[start : start + step] = _row_sq(w[start : start + step].detach())
    return out


def factored_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    weight_sq: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """DoRA's weight row norm without forming ``B A`` (arXiv 2603.22276; DoRA: arXiv 2402.09353):

        n_i = sqrt(max(||W_i||^2 + 2 s sum_k B_ik (W A^T)_ik + s^2 sum_k (B A A^T)_ik B_ik, 0))

    computed chunk by chunk over output rows, in fp32 (module docstring); the Triton kernel does the per-row
    combination on CUDA, the torch twin elsewhere (``hf_ext.kernels.dispatch``).

    Args:
        weight: W, (d_out, d_in), or (d_in, d_out) with ``fan_in_fan_out=True``; any float dtype. Or a row source
            already (d_out, d_in) that gives dense rows for a row slice and has ``shape``, ``dtype``, ``device``,
            ``is_cuda``, ``dim()`` and ``row_bytes`` (``hf_ext.peft.quantized_rows.QuantizedRows``: bitsandbytes
            weights dequantized chunk by chunk).
        lora_A: A, (r, d_in), any float dtype (PEFT's ``lora_A.weight``).
        lora_B: B, (d_out, r), any float dtype (PEFT's ``lora_B.weight``).
        scaling: s, a Python float; with 0 the LoRA terms are skipped (n = ||W||).
        fan_in_fan_out: whether ``weight`` is stored transposed (GPT-2's Conv1D).
        weight_sq: optional cached ``weight_sq_norms(weight, fan_in_fan_out)``, (d_out,).
        chunk_bytes: budget for what the call allocates in fp32 (the rows get at least half of it whatever the
            fixed part takes).

    Returns:
        n, fp32 (d_out,), on the device of ``weight``, detached (DoRA treats the norm as a constant).

    Raises:
        ValueError: on shapes that do not fit together, a non-positive ``chunk_bytes``, or a row source with
            ``fan_in_fan_out=True``.
    """
    kernels = use_triton(weight, "dora_norm")
    combine = combine_rows_triton if kernels else combine_rows_torch
    product = weight_lora_product_triton if kernels and isinstance(weight, torch.Tensor) else weight_lora_product_torch
    paths = (combine, product)
    return _factored_row_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq, chunk_bytes, paths)


def _check_shapes(w, lora_A, lora_B, weight_sq):
    d_out, d_in = w.shape
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != d_in or lora_B.shape != (d_out, lora_A.shape[0]):
        raise ValueError(
            f"expected lora_A (r, {d_in}) and lora_B ({d_out}, r) for W of (d_out, d_in) = {(d_out, d_in)}, got "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}; pass lora_A.weight / lora_B.weight and "
            "set fan_in_fan_out=True if W is stored as (d_in, d_out)"
        )
    if weight_sq is not None and weight_sq.shape != (d_out,):
        raise ValueError(
            f"weight_sq must have shape ({d_out},) (one squared norm per output row), got {tuple(weight_sq.shape)}; "
            "compute it with weight_sq_norms(weight, fan_in_fan_out)"
        )


def _factored_row_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq, chunk_bytes, paths):
    """The chunk loop shared by both paths; ``paths``: (combine, product), the per-row combination and the
    ``W A^T`` product, each the twin or the kernel (the kernel product reads W in place: its rows cost no budget)."""
    combine, product = paths
    w = _oriented(weight, fan_in_fan_out)
    _check_shapes(w, lora_A, lora_B, weight_sq)
    d_out, d_in = w.shape
    scaling = float(scaling)
    rank = 0 if scaling == 0.0 else lora_A.shape[0]
    upcast_factors = lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32
    w_row_bytes = 0 if product is weight_lora_product_triton else weight_row_bytes(w)
    step = rows_per_chunk(d_out, d_in, rank, chunk_bytes, w_row_bytes, upcast_factors)
    out = torch.empty(d_out, dtype=torch.float32, device=w.device)
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        a = lora_A.detach().float() if rank else None
        gram = (a @ a.t()).contiguous() if rank else None
        for start in range(0, d_out, step):
            rows = slice(start, start + step)
            wsq = None if weight_sq is None else weight_sq[rows].detach().float()
            out[rows] = _chunk_norm(w[rows].detach(), a, lora_B[rows].detach(), gram, wsq, scaling, paths)
    return out


def _chunk_norm(w_rows, a, b_rows, gram, wsq, scaling, paths):
    """One chunk's norms; its fp32 temporaries die on return, before the next chunk's W rows are upcast."""
    combine, product = paths
    if a is None:
        return torch.sqrt((_row_sq(w_rows) if wsq is None else wsq).clamp_min(0.0))
    u, row_sq = product(w_rows, a, wsq is None)
    return combine(u, b_rows.float(), gram, row_sq if wsq is None else wsq, scaling)


def weight_lora_product_torch(w_rows, a, with_row_sq: bool):
    """Twin of the kernel: ``U = W_c A^T`` and, if asked, ``||W_c||^2`` per row, from one fp32 copy of the rows.

    Args:
        w_rows: W_c, (c, d_in), any float dtype, or rows of a row source; a: A, fp32 (r, d_in).
        with_row_sq: whether to return the rows' squared norms.

    Returns:
        (U fp32 (c, r), ``||W_c||^2`` fp32 (c,) or None).
    """
    w_c = w_rows.float()
    return w_c @ a.t(), (_row_sq(w_c) if with_row_sq else None)


def weight_lora_product_triton(w_rows, a, with_row_sq: bool):
    """``weight_lora_product_torch`` as one Triton GEMM that reads W in its own dtype and strides (a bf16 W once, at
    2 B per element, never upcast in memory), upcasts tiles in registers and accumulates in fp32 (``tl.dot``,
    ``input_precision="ieee"``: no TF32), with the rows' squared norms from the same tiles. Same contract; agrees
    with the twin to fp32 rounding (another summation order)."""
    if triton is None:
        raise RuntimeError("weight_lora_product_triton needs triton; install it or set HF_EXT_DISABLE_TRITON=1.")
    n_rows, d_in = w_rows.shape
    rank = a.shape[0]
    a = a.float().contiguous()
    u = torch.empty(n_rows, rank, dtype=torch.float32, device=a.device)
    row_sq = torch.empty(n_rows, dtype=torch.float32, device=a.device) if with_row_sq else u
    if n_rows and rank:
        block_r = min(PRODUCT_BLOCK_R, max(16, triton.next_power_of_2(rank)))
        grid = (triton.cdiv(n_rows, BLOCK_M) * triton.cdiv(rank, block_r),)
        _weight_lora_product_kernel[grid](
            w_rows, a, u, row_sq, n_rows, d_in, rank, w_rows.stride(0), w_rows.stride(1),
            ROW_SQ=with_row_sq, BLOCK_M=BLOCK_M, BLOCK_K=PRODUCT_BLOCK_K, BLOCK_R=block_r, **FMA_ALLOWED,
        )  # fmt: skip
    return u, (row_sq if with_row_sq else None)


def combine_rows_torch(u, b, gram, wsq, scaling: float) -> torch.Tensor:
    """Twin of the kernel: ``sqrt(max(wsq + 2 s rowdot(b, u) + s^2 rowdot(b G, b), 0))``, all fp32."""
    cross = torch.linalg.vecdot(b, u)  # rows x rank temporaries only; einsum would run batched matmuls, slower
    gram_term = torch.linalg.vecdot(b @ gram, b)
    return torch.sqrt((wsq + (2.0 * scaling) * cross + (scaling * scaling) * gram_term).clamp_min(0.0))


def combine_rows_triton(u, b, gram, wsq, scaling: float) -> torch.Tensor:
    """Launch the row-combination kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1); same contract as the twin."""
    if triton is None:
        raise RuntimeError("combine_rows_triton needs triton; install it or set HF_EXT_DISABLE_TRITON=1.")
    n_rows, rank = b.shape
    u, b, gram, wsq = (t.float().contiguous() for t in (u, b, gram, wsq))
    out = torch.empty(n_rows, dtype=torch.float32, device=b.device)
    if n_rows == 0:
        return out
    grid = (triton.cdiv(n_rows, BLOCK_M),)
    _dora_norm_rows_kernel[grid](
        u, b, gram, wsq, out, n_rows, rank, 2.0 * scaling, scaling * scaling,
        BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, **FMA_ALLOWED,
    )  # fmt: skip
    return out


if triton is not None:  # TRITON_INTERPRET=1 must be set before triton is imported to run this on CPU

    @triton.jit
    def _dora_norm_rows_kernel(
        u_ptr, b_ptr, g_ptr, wsq_ptr, out_ptr, n_rows, rank, two_s, s_sq,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        cross = tl.zeros((BLOCK_M,), dtype=tl.float32)
        gram_term = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, rank, BLOCK_R):
            ks = k0 + tl.arange(0, BLOCK_R)
            k_ok = ks < rank
            tile_ok = row_ok[:, None] & k_ok[None, :]
            b_k = tl.load(b_ptr + rows[:, None] * rank + ks[None, :], mask=tile_ok, other=0.0)
            u_k = tl.load(u_ptr + rows[:, None] * rank + ks[None, :], mask=tile_ok, other=0.0)
            cross += tl.sum(b_k * u_k, axis=1)
            bg_k = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # columns ks of B G, never stored
            for j0 in range(0, rank, BLOCK_R):
                js = j0 + tl.arange(0, BLOCK_R)
                j_ok = js < rank
                b_tile_ok = row_ok[:, None] & j_ok[None, :]
                b_j = tl.load(b_ptr + rows[:, None] * rank + js[None, :], mask=b_tile_ok, other=0.0)
                g_jk = tl.load(g_ptr + js[:, None] * rank + ks[None, :], mask=j_ok[:, None] & k_ok[None, :], other=0.0)
                bg_k += tl.dot(b_j, g_jk, input_precision="ieee")
            gram_term += tl.sum(bg_k * b_k, axis=1)
        wsq = tl.load(wsq_ptr + rows, mask=row_ok, other=0.0)
        sq = tl.maximum(wsq + two_s * cross + s_sq * gram_term, 0.0)
        tl.store(out_ptr + rows, tl.math.sqrt_rn(sq), mask=row_ok)

    @triton.jit
    def _weight_lora_product_kernel(
        w_ptr, a_ptr, u_ptr, row_sq_ptr, n_rows, d_in, rank, stride_row, stride_col,
        ROW_SQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        rank_blocks = tl.cdiv(rank, BLOCK_R)  # neighbouring programs share W rows: they meet in L2
        row_block, rank_block = tl.program_id(0) // rank_blocks, tl.program_id(0) % rank_blocks
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok, k_ok = rows < n_rows, ks < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, d_in, BLOCK_K):
            cols = c0 + tl.arange(0, BLOCK_K)
            col_ok = cols < d_in
            w_offsets = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
            w = tl.load(w_ptr + w_offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            a_tile = tl.load(
                a_ptr + ks[:, None] * d_in + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )
            acc += tl.dot(w, tl.trans(a_tile), input_precision="ieee")
            if ROW_SQ:
                sq += tl.sum(w * w, axis=1)
        tl.store(u_ptr + rows[:, None] * rank + ks[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])
        if ROW_SQ:
            tl.store(row_sq_ptr + rows, sq, mask=row_ok)  # each rank block has the same sums: any store wins
