"""DoRA's output composition as one fused pass forward and one backward — arXiv 2402.09353 (DoRA), 2603.22276.

With ``result`` the base layer's output (bias included), ``lora = B A x`` (unscaled), scaling ``s``, magnitude ``m``
and the detached fp32 weight row norm ``n`` (``hf_ext.kernels.dora_norm``), per output feature j:

    g      = m / max(n, 1e-12)                                  (fp32; n is a constant: no gradient)
    base   = result - bias   (eval, or no dropout: PEFT reuses the base output)  |  W dropout(x)  (given)
    y      = result + ((g - 1) * base + g * lora * s)           (PEFT's stable form and product order)

    d_result = g * dy  (base derived from result)  |  dy  (base given)      d_base = (g - 1) * dy
    d_lora   = g * s * dy                                                   d_bias = -(g - 1) * sum_t dy
    d_m      = sum_t dy * inner / max(n, 1e-12),   inner = base + s * lora  (reduced in fp32)

Memory: the only activation-sized tensor kept for backward is ``inner`` (in the promoted dtype of base and lora),
and only when ``m`` needs a gradient; neither ``result`` nor ``base`` is kept, and with the base derived from
``result`` no ``result - bias`` copy is made in the kernel. Everything is computed in fp32 (g stays fp32) and
stored once in the output dtype; PEFT instead rounds ``result - bias`` to a bf16/fp16 ``result``'s dtype first,
so with half-precision base outputs the two differ by that one rounding times ``|g - 1|``.

- ``compose_forward_torch`` / ``compose_backward_torch``: the pure-torch twin, the CPU path and the test oracle;
  its forward forms y as ``(result + (g - 1) * base) + (g s) * lora``, two multiply-add passes (``addcmul``) instead
  of five element-wise ops, and its d_m reduction sums fp32 partials over token chunks, as the kernel does over
  token blocks.
- ``compose_forward_triton`` / ``compose_backward_triton``: one kernel each, 2-D grid over (token block, column
  block); the backward writes ``d_main`` (d_result or d_base) and ``d_lora`` and one fp32 partial of d_m per
  ``ROWS_PER_PROGRAM`` tokens and column, summed afterwards (no atomics).

``dora_compose`` dispatches through ``hf_ext.kernels.dispatch`` (Triton for CUDA tensors in fp32/bf16/fp16, the
twin elsewhere, ``HF_EXT_DISABLE_TRITON=1`` forces the twin) and skips the autograd Function when nothing needs a
gradient. Kernel and twin agree to fp32 rounding, not bit for bit. To run the kernels on CPU tensors, set
TRITON_INTERPRET=1 before triton is first imported.
"""

import torch

from hf_ext.kernels.dispatch import FMA_ALLOWED, tl, triton, use_triton  # noqa: F401 (tl: used by the kernels when triton imports)


NORM_EPS = 1e-12
BLOCK_T = 16
BLOCK_D = 128
ROWS_PER_PROGRAM = 128  # backward: tokens per program, one d_m partial each
TWIN_CHUNK_BYTES = 16 * 2**20  # twin backward: fp32 product of one token chunk
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``g = m / max(n, 1e-12)`` in at least fp32, shape (d_out,), no gradient."""
    dtype = torch.promote_types(magnitude.dtype, torch.float32)
    return magnitude.detach().to(dtype) / norm.detach().to(dtype).clamp_min(NORM_EPS)


def _compute_dtype(*tensors) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _out_dtype(result, base, lora) -> torch.dtype:
    dtype = torch.promote_types(result.dtype, lora.dtype)
    return dtype if base is None else torch.promote_types(dtype, base.dtype)


def _inner_dtype(result, base, lora, bias) -> torch.dtype:
    first = result if base is None else base
    dtype = torch.promote_types(first.dtype, lora.dtype)
    return dtype if base is not None or bias is None else torch.promote_types(dtype, bias.dtype)


# ---------------------------------------------------------------- torch twin


def compose_forward_torch(result, base, bias, lora, g, scaling: float, save_inner: bool):
    """``(y, inner or None)`` for 2-D (tokens, d_out) tensors; ``base=None`` means ``base = result - bias``.

    Without a given base, y is evaluated as ``g (result + s lora) + (1 - g) bias`` (the same y; exactly ``result``
    where g = 1 and lora = 0), so that the only full-size results are y and inner, and result is never upcast on its
    own: on CPU each full-size temporary costs a fresh allocation as well as a pass."""
    cdt = _compute_dtype(result, base, lora, g)
    gc = g.to(cdt)
    out_dtype, inner_dtype = _out_dtype(result, base, lora), _inner_dtype(result, base, lora, bias)
    if base is None:
        summed = _sum(result, lora, scaling, cdt)  # result + s lora
        if bias is None:
            inner = summed
            out = summed * gc
        else:
            bias_c = bias.to(cdt)
            inner = torch.sub(result, bias_c).add_(lora, alpha=scaling) if save_inner else None  # base + s lora
            out = summed.mul_(gc).add_((1 - gc) * bias_c)
        return out.to(out_dtype), (inner.to(inner_dtype) if save_inner else None)
    b, lo = base.to(cdt), lora.to(cdt)
    out = torch.addcmul(result.to(cdt), gc - 1, b).addcmul_(gc * scaling, lo).to(out_dtype)  # two passes
    inner = torch.add(b, lo, alpha=scaling).to(inner_dtype) if save_inner else None
    return out, inner


def _sum(a: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """``a + alpha b`` in ``dtype``, upcasting the inputs only when their own promotion is narrower."""
    if torch.promote_types(a.dtype, b.dtype) == dtype:
        return torch.add(a, b, alpha=alpha)
    return torch.add(a.to(dtype), b.to(dtype), alpha=alpha)


def compose_backward_torch(dy, g, inner, scaling: float, base_shift: float, main_dtype, lora_dtype):
    """``(d_main, d_lora, dm_sum)``: ``(g - base_shift) dy`` in ``main_dtype``, ``g s dy`` in ``lora_dtype`` (None: not
    needed) and ``sum_t dy inner`` (fp32 or wider; None without ``inner``), all computed in at least fp32."""
    cdt = _compute_dtype(dy, g, inner)
    gc = g.to(cdt)
    dyc = dy.to(cdt)
    d_main = (dyc * (gc - base_shift)).to(main_dtype) if main_dtype is not None else None
    d_lora = (dyc * (gc * scaling)).to(lora_dtype) if lora_dtype is not None else None
    dm_sum = None
    if inner is not None:
        n_tokens, d_out = dy.shape
        step = max(1, TWIN_CHUNK_BYTES // max(1, 4 * d_out))
        dm_sum = torch.zeros(d_out, dtype=cdt, device=dy.device)
        for start in range(0, n_tokens, step):  # one fp32 partial per token chunk, summed
            # vecdot, not einsum("td,td->d"): on CPU the einsum runs as d_out tiny batched matmuls
            dm_sum += torch.linalg.vecdot(dyc[start : start + step], inner[start : start + step].to(cdt), dim=0)
    return d_main, d_lora, dm_sum


# ---------------------------------------------------------------- Triton


def _need_triton():
    if triton is None:
        raise RuntimeError("the DoRA compose kernels need triton; install it or set HF_EXT_DISABLE_TRITON=1.")


def compose_forward_triton(result, base, bias, lora, g, scaling: float, save_inner: bool):
    """Same contract as ``compose_forward_torch``; one kernel launch (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _need_triton()
    n_tokens, d_out = result.shape
    result, lora = result.contiguous(), lora.contiguous()
    base = base.contiguous() if base is not None else None
    g = g.float().contiguous()
    out = torch.empty(n_tokens, d_out, dtype=_out_dtype(result, base, lora), device=result.device)
    inner_dtype = _inner_dtype(result, base, lora, bias)
    inner = torch.empty(n_tokens, d_out, dtype=inner_dtype, device=result.device) if save_inner else None
    if out.numel():
        grid = (triton.cdiv(n_tokens, BLOCK_T), triton.cdiv(d_out, BLOCK_D))
        _compose_fwd_kernel[grid](
            result, base if base is not None else result, bias if bias is not None else g, lora, g, out,
            inner if save_inner else out, n_tokens, d_out, float(scaling),
            HAS_BASE=base is not None, HAS_BIAS=bias is not None, SAVE_INNER=save_inner,
            BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, **FMA_ALLOWED,
        )  # fmt: skip
    return out, inner


def compose_backward_triton(dy, g, inner, scaling: float, base_shift: float, main_dtype, lora_dtype):
    """Same contract as ``compose_backward_torch``; the gradients are stored once, in their final dtypes."""
    _need_triton()
    n_tokens, d_out = dy.shape
    dy, g = dy.contiguous(), g.float().contiguous()
    inner = inner.contiguous() if inner is not None else None
    need_main, need_lora = main_dtype is not None, lora_dtype is not None
    d_main = torch.empty(n_tokens, d_out, dtype=main_dtype, device=dy.device) if need_main else None
    d_lora = torch.empty(n_tokens, d_out, dtype=lora_dtype, device=dy.device) if need_lora else None
    n_progs = triton.cdiv(n_tokens, ROWS_PER_PROGRAM)
    partial = torch.zeros(n_progs, d_out, dtype=torch.float32, device=dy.device) if inner is not None else None
    if dy.numel():
        _compose_bwd_kernel[(n_progs, triton.cdiv(d_out, BLOCK_D))](
            dy, g, inner if inner is not None else dy, d_main if need_main else g, d_lora if need_lora else g,
            partial if partial is not None else g, n_tokens, d_out, float(scaling), float(base_shift),
            WRITE_MAIN=need_main, WRITE_LORA=need_lora, REDUCE=inner is not None,
            ROWS_PER_PROGRAM=ROWS_PER_PROGRAM, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, **FMA_ALLOWED,
        )  # fmt: skip
    return d_main, d_lora, partial.sum(0) if partial is not None else None


if triton is not None:  # TRITON_INTERPRET=1 must be set before triton is imported to run these on CPU

    @triton.jit
    def _compose_fwd_kernel(
        result_ptr, base_ptr, bias_ptr, lora_ptr, g_ptr, out_ptr, inner_ptr, n_tokens, d_out, scaling,
        HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_INNER: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d_out
        mask = (rows < n_tokens)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * d_out + cols[None, :]
        result = tl.load(result_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BASE:
            base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        elif HAS_BIAS:
            base = result - tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            base = result
        lora = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
        out = result + ((g - 1.0) * base + g * lora * scaling)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_INNER:
            tl.store(inner_ptr + offs, (base + lora * scaling).to(inner_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _compose_bwd_kernel(
        dy_ptr, g_ptr, inner_ptr, dmain_ptr, dlora_ptr, partial_ptr, n_tokens, d_out, scaling, base_shift,
        WRITE_MAIN: tl.constexpr, WRITE_LORA: tl.constexpr, REDUCE: tl.constexpr,
        ROWS_PER_PROGRAM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d_out
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t0 in range(0, ROWS_PER_PROGRAM, BLOCK_T):
            rows = pid_t * ROWS_PER_PROGRAM + t0 + tl.arange(0, BLOCK_T)
            mask = (rows < n_tokens)[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * d_out + cols[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if WRITE_MAIN:
                tl.store(dmain_ptr + offs, (dy * (g - base_shift)).to(dmain_ptr.dtype.element_ty), mask=mask)
            if WRITE_LORA:
                tl.store(dlora_ptr + offs, (dy * (g * scaling)).to(dlora_ptr.dtype.element_ty), mask=mask)
            if REDUCE:
                inner = tl.load(inner_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(dy * inner, axis=0)
        if REDUCE:
            tl.store(partial_ptr + pid_t * d_out + cols, acc, mask=col_ok)


# ---------------------------------------------------------------- autograd and dispatch


def _kernels_for(*tensors):
    """(forward, backward) implementations: Triton for CUDA tensors in kernel dtypes, the twin otherwise."""
    present = [t for t in tensors if t is not None]
    if use_triton(present[0], "dora_compose") and all(t.dtype in _KERNEL_DTYPES for t in present):
        return compose_forward_triton, compose_backward_triton
    return compose_forward_torch, compose_backward_torch


class DoraCompose(torch.autograd.Function):
    """``y`` of the module docstring with its gradients for result, base, bias, lora and magnitude (not n)."""

    @staticmethod
    def forward(ctx, result, base, bias, lora, magnitude, norm, scaling):
        d_out = result.shape[-1]
        forward_impl, ctx.backward_impl = _kernels_for(result, base, bias, lora)
        g = magnitude_scale(magnitude, norm)
        save_inner = ctx.needs_input_grad[4]
        out, inner = forward_impl(
            result.reshape(-1, d_out), _flat(base), bias, lora.reshape(-1, d_out), g, scaling, save_inner
        )
        ctx.scaling, ctx.base_given = float(scaling), base is not None
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (result, base, bias, lora, magnitude))
        ctx.save_for_backward(g, inner, norm if save_inner else None)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, dy):
        g, inner, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        shape, d_out = dy.shape, dy.shape[-1]
        result_dt, base_dt, bias_dt, lora_dt, mag_dt = ctx.dtypes
        # d_main is d_base when base is given, else d_result (base = result - bias adds (g - 1) dy to dy)
        need_main = need[1] if ctx.base_given else need[0]
        main_dt = (base_dt if ctx.base_given else result_dt) if need_main else None
        d_main, d_lora, dm_sum = ctx.backward_impl(
            dy.reshape(-1, d_out), g, inner, ctx.scaling, 1.0 if ctx.base_given else 0.0, main_dt,
            lora_dt if need[3] else None,
        )  # fmt: skip
        d_result = (dy.to(result_dt) if ctx.base_given else _shaped(d_main, shape)) if need[0] else None
        d_base = _shaped(d_main, shape) if ctx.base_given and need[1] else None
        d_bias = ((1.0 - g) * dy.reshape(-1, d_out).to(g.dtype).sum(0)).to(bias_dt) if need[2] else None
        d_lora = _shaped(d_lora, shape)
        d_mag = (dm_sum / norm.to(dm_sum.dtype).clamp_min(NORM_EPS)).to(mag_dt) if need[4] else None
        return d_result, d_base, d_bias, d_lora, d_mag, None, None


def _flat(t):
    return None if t is None else t.reshape(-1, t.shape[-1])


def _shaped(t, shape):
    return None if t is None else t.view(shape)


def dora_compose(result, lora, magnitude, norm, scaling: float, base=None, bias=None) -> torch.Tensor:
    """DoRA's layer output (arXiv 2402.09353), fused: with ``g = m / max(n, 1e-12)`` per output feature,

        y = result + ((g - 1) * base + g * lora * s),    base = result - bias unless given

    differentiable in ``result``, ``base``, ``bias``, ``lora`` and ``magnitude`` (gradients in the module docstring),
    not in ``norm``. Runs the Triton kernels on CUDA tensors in fp32/bf16/fp16, the torch twin elsewhere
    (``hf_ext.kernels.dispatch``); without any input needing a gradient, the forward alone.

    Args:
        result: the base layer's output, bias included, (..., d_out), any float dtype.
        lora: the unscaled LoRA output ``B A x``, the shape of ``result``.
        magnitude: m, (d_out,) (PEFT's ``lora_magnitude_vector`` weight).
        norm: n, the weight row norm (``hf_ext.kernels.dora_norm.factored_row_norm``), (d_out,).
        scaling: s, a Python float.
        base: the base layer's output without bias on the dropped-out input, the shape of ``result``; None (PEFT's
            eval / no-dropout path) derives it as ``result - bias``.
        bias: the base layer's bias, (d_out,), or None; ignored when ``base`` is given.

    Returns:
        y, the shape of ``result``, in the promoted dtype of ``result``, ``lora`` and ``base``; computed in fp32 (or
        wider, for fp64 inputs) and rounded once.

    Raises:
        ValueError: when ``lora``/``base`` do not have the shape of ``result`` or the vectors are not (d_out,).
    """
    d_out = result.shape[-1]
    shaped = {"lora": lora, "base": base}
    vectors = {"magnitude": magnitude, "norm": norm, "bias": bias}
    bad = [f"{k} {tuple(t.shape)}" for k, t in shaped.items() if t is not None and t.shape != result.shape]
    bad += [f"{k} {tuple(t.shape)}" for k, t in vectors.items() if t is not None and t.shape != (d_out,)]
    if bad:
        raise ValueError(
            f"dora_compose: result has shape {tuple(result.shape)}, so lora and base must have that shape and "
            f"magnitude, norm and bias shape ({d_out},); got {', '.join(bad)}."
        )
    if base is not None:
        bias = None
    inputs = (result, base, bias, lora, magnitude)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return DoraCompose.apply(result, base, bias, lora, magnitude, norm, scaling)
    forward_impl, _ = _kernels_for(result, base, bias, lora)
    g = magnitude_scale(magnitude, norm)
    out, _ = forward_impl(result.reshape(-1, d_out), _flat(base), bias, lora.reshape(-1, d_out), g, scaling, False)
    return out.view(result.shape)
