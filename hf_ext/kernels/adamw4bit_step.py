"""One fused 4-bit AdamW step per parameter — Li, Chen & Zhu, arXiv 2309.01507 (4-bit AdamW, lpmm's update order).

For each element, with m and v dequantized from their 4-bit codes (``hf_ext.kernels.quant4``):

    p <- p * (1 - lr * wd)
    m <- m + (1 - beta1) * (g - m)
    v <- v * beta2 + ((1 - beta2) * g) * g
    p <- p + (-lr / (1 - beta1^t) * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps)     (new fp32 m, v: not re-quantized)

then m is requantized with block-wise absmax (signed DE map) and v with either block-wise absmax or rank-1
scales (linear map without zero). Each operation is a separately rounded fp32 op (no fused multiply-add) so the
two implementations below agree bit for bit where both round IEEE (CPU twin, Triton interpreter); division and
sqrt are correctly rounded (``div_rn``/``sqrt_rn``; the CPU twin takes sqrt via fp64, ``_sqrt_rn``), which keeps
CPU results independent of the CPU's vendor and vector extensions. ``next_m``, ``next_v`` and ``stepped_param``
are these element-wise ops, on lists of tensors (multi-tensor ``torch._foreach`` ops); the factored path calls them
too. The optimizer's fp32-state tensors (too small to quantize) step together in ``adamw_fp32_steps``: one Triton
launch per 64 tensors on CUDA (``_adamw_fp32_kernel``, the same ops in registers), one C call on the CPU
(``adamw_fp32_states``), these ops elsewhere.

- ``adamw4bit_step_torch``: the pure-torch twin: the element-wise ops on the flat tensors, then the quantizers of
  ``hf_ext.kernels.quant4`` (the same blocks, scales and nearest-code rule the kernel applies);
- ``adamw4bit_step_triton``: a Triton kernel, one program per ``BLOCKS_PER_PROGRAM`` quantization blocks, that
  dequantizes, updates, writes the parameter and requantizes in one pass. Block-wise v is done fully in the kernel;
  rank-1 v (2-D after squeezing) needs the new v's row/column maxima before any code can be chosen, so a first
  Triton pass (``rank1_next_statistics_triton``; its twin ``rank1_next_statistics``) reads g and the old v codes,
  forms the new v in registers and writes only those maxima and the largest |g|: exact statistics of this step's v,
  as the paper's rank-1 normalisation defines them, for one extra read of g and the v codes, which also serves as the
  optimizer's finiteness check of g (``rank1_statistics_pass`` runs it ahead of the steps).

- ``adamw4bit_step_cpu``: the same ops in C (``adamw4bit_step.c``, built by ``hf_ext.kernels.cpu_library``), one
  call per range of blocks on torch's thread count, with a first pass for the rank-1 statistics as on the GPU
  (``rank1_next_statistics_cpu``); bit for bit the twin's results, vectorised by the compiler.
  ``adamw4bit_step_factored`` is the step of ``AdamW4bitFactor``'s tensors: 4-bit m with v = (R / mean R)_i C_j,
  formed element by element in the Triton or C kernel (no full-size v in memory); ``squared_means``, one Triton or
  C pass over g, gives R and C their inputs and the largest |g|.

Dispatch (``adamw4bit_step``): Triton for contiguous CUDA tensors when triton imports, the C kernel for contiguous
fp32/bf16/fp16 CPU tensors when it builds, the twin elsewhere (rank-1 v with more than two non-singleton dimensions
always runs the twin); ``HF_EXT_DISABLE_TRITON=1`` and ``HF_EXT_DISABLE_CPU_KERNELS=1`` force the twin. Every
kernel here is launched with ``enable_fp_fusion=False`` (``dispatch.TWIN_ROUNDING``), so the GPU compiler contracts no
multiply and add into an FMA (their sm_90 PTX holds no ``fma``) and on a GPU too each op rounds as the twin's; only
the factored means are summed in another order. Like in-place torch ops, the kernels bump the version counter of every
tensor they write (``torch.autograd.graph.increment_version``). To run the kernel on CPU tensors, set
TRITON_INTERPRET=1 before triton is first imported (triton's own library functions are decorated at import).
"""

import ctypes
import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.graph import increment_version

from hf_ext.kernels import cpu_library, quant4
from hf_ext.kernels.dispatch import TWIN_ROUNDING, cpu_kernel, tl, triton, use_triton  # noqa: F401 (tl: used by the kernel when triton imports)


BLOCKS_PER_PROGRAM = 4
STATS_TILE = (16, 128)  # (rows, columns) of v each program of the rank-1 statistics pass reduces
SUM_ROW_TILES = 8  # STATS_TILEs one program of the factored statistics pass sums down a column strip
MAX_TENSORS_PER_LAUNCH = 64  # tensors one launch of the Triton kernels steps
CPU_CHUNK_ELEMENTS = 1 << 16  # the fewest elements one thread of the C kernel takes
SUM_GROUPS = 64  # the most row groups whose column sums the C statistics pass keeps apart (then adds in order)
SUM_GROUP_ROWS = 256  # the fewest rows of such a group: their fp64 column sums cost <= 1/32 B per element each way
V_BLOCK, V_RANK1, V_FACTORED = 0, 1, 3  # the kernels' v modes: block-wise, rank-1, factored


@dataclass(frozen=True)
class StepScalars:
    """Python-float hyper-parameters of one step; both implementations round them to fp32 the same way."""

    decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    bias_correction2_sqrt: float
    neg_step_size: float
    eps: float

    @classmethod
    def from_group(cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float):
        """``decay = 1 - lr wd``, ``neg_step_size = -lr / (1 - beta1^t)``, ``bias_correction2_sqrt = sqrt(1 -
        beta2^t)`` and the betas' complements, evaluated in Python floats for step ``t = step`` (1-based)."""
        return cls(
            decay=1 - lr * weight_decay,
            one_minus_beta1=1 - beta1,
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
            neg_step_size=-lr / (1 - beta1**step),
            eps=eps,
        )


def adamw4bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    m_codes: torch.Tensor,
    m_absmax: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: list[torch.Tensor],
    scalars: StepScalars,
    block_size: int,
    v_rank1: bool,
    reduce_stats=None,
) -> None:
    """One AdamW step of one parameter with 4-bit m and v (module docstring; arXiv 2309.01507), all in place.

    Args:
        param: the parameter, N elements, fp32, bf16 or fp16; overwritten with the stepped value in its dtype.
        grad: its gradient, the shape of ``param``, finite (any float dtype, upcast to fp32).
        m_codes: uint8 (ceil(N / 2),) packed DE-map codes of m; rewritten with the new m's codes.
        m_absmax: fp32 (ceil(N / block_size),) block scales of m; rewritten.
        v_codes: uint8 (ceil(N / 2),) packed linear-map codes of v; rewritten.
        v_scales: ``[absmax]``, fp32 (ceil(N / block_size),), for block-wise v, or the rank-1 statistics, one
            fp32 (n_k,) vector per dimension of ``squeezed_shape(param.shape)``; rewritten.
        scalars: the step's hyper-parameters (``StepScalars.from_group``).
        block_size: elements per quantisation block, a power of two >= 2.
        v_rank1: True for rank-1 v scales, False for block-wise.
        reduce_stats: optional callable given the new rank-1 statistics before any v code is chosen, which may
            change them in place (``quant4.quantize_rank1``'s ``reduce``: a sharded parameter's maxima across ranks).

    Returns:
        None. Runs the Triton kernel where ``hf_ext.kernels.dispatch.use_triton`` allows it (contiguous ``param``,
        rank-1 v of at most two non-singleton dimensions), the C kernel on such CPU tensors, the torch twin
        otherwise.
    """
    job = StepJob(param, grad, m_codes, m_absmax, v_codes, v_scales, scalars, reduce_stats)
    adamw4bit_steps([job], block_size, v_rank1)


def adamw4bit_steps(jobs: list["StepJob"], block_size: int, v_rank1: bool) -> None:
    """``adamw4bit_step`` of many tensors: the Triton ones in as few launches as their dtypes and devices allow
    (``adamw4bit_steps_triton``), the others one by one. Each job's ``reduce_stats`` is called once, in job order
    among the jobs of one path, also for an empty tensor (a shard with no rows), whose statistics are zeros.

    Args:
        jobs: ``StepJob``s, each as ``adamw4bit_step``'s arguments; block_size, v_rank1: shared by all of them.
    """
    launches: dict[tuple, list[StepJob]] = {}
    for job in jobs:
        path = _path(job, v_rank1)
        state = (job.m_codes, job.m_absmax, job.v_codes, job.v_scales)
        if path == "triton":
            key = (job.param.dtype, job.grad.dtype, job.param.device)
            launches.setdefault(key, []).append(dataclasses.replace(job, grad=job.grad.contiguous()))
        elif path == "empty":
            if job.reduce_stats is not None:
                zeros = [torch.zeros_like(stat) for stat in job.v_scales]
                job.reduce_stats(zeros)
                torch._foreach_copy_(job.v_scales, zeros)
        elif path == "cpu":
            adamw4bit_step_cpu(
                job.param, job.grad, *state, job.scalars, block_size, v_rank1, job.reduce_stats, job.new_stats
            )
        else:
            adamw4bit_step_torch(job.param, job.grad, *state, job.scalars, block_size, v_rank1, job.reduce_stats)
    for group in launches.values():
        adamw4bit_steps_triton(group, block_size, v_rank1)


def rank1_statistics_pass(jobs: list["StepJob"]) -> list[torch.Tensor | None]:
    """The first pass of the rank-1 steps that run compiled (Triton or C), run now, ahead of the steps: one read of g
    and the old v codes gives each such job its new statistics (``job.new_stats``; ``reduce_stats`` is applied later,
    by ``adamw4bit_steps``) and the largest |g|, which lets the caller check the gradient without reading it again.

    Args:
        jobs: rank-1 ``StepJob``s, as for ``adamw4bit_steps(jobs, block_size, v_rank1=True)``; their ``new_stats``
            are set, their state is not touched.

    Returns:
        For each job, a 0-d fp32 tensor on its device, the largest |g|, finite exactly when every g is (NaN reads
        as NaN in C, as inf in Triton); None for the jobs of other paths (the twin, empty tensors), whose statistics
        ``adamw4bit_steps`` computes itself.
    """
    maxima: list[torch.Tensor | None] = [None] * len(jobs)
    on_triton: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        path = _path(job, True)
        if path == "cpu":
            job.grad = job.grad.contiguous()
            job.new_stats, maxima[i] = rank1_next_statistics_cpu(job.grad, job.v_codes, job.v_scales, job.scalars)
        elif path == "triton" and job.param.numel():
            job.grad = job.grad.contiguous()
            on_triton.setdefault((job.grad.dtype, job.param.device), []).append(i)
    for indices in on_triton.values():
        for start in range(0, len(indices), MAX_TENSORS_PER_LAUNCH):
            chunk = indices[start : start + MAX_TENSORS_PER_LAUNCH]
            for i, grad_max in zip(chunk, _rank1_pass_triton([jobs[i] for i in chunk]), strict=True):
                maxima[i] = grad_max
    return maxima


def _path(job: "StepJob", v_rank1: bool) -> str:
    """Where ``adamw4bit_steps`` runs ``job``: "triton", "empty" (no elements), "cpu" (the C kernel) or "torch"."""
    fits = job.param.is_contiguous() and (not v_rank1 or len(job.v_scales) == 2)
    if fits and use_triton(job.param, "adamw4bit_step"):
        return "triton"
    if job.param.numel() == 0:
        return "empty"
    return "cpu" if fits and _cpu_kernel(job.param, job.grad) is not None else "torch"


def adamw4bit_step_factored(param, grad, m_codes, m_absmax, ratio, col, scalars: StepScalars, block_size: int) -> None:
    """``AdamW4bitFactor``'s step of a factored tensor, in place: 4-bit block-wise m with this step's v =
    ``factored_v(ratio, col)``, formed element by element in the Triton kernel on CUDA and the C kernel on the CPU
    (no full-size v in memory), by the twin (``step_quantized_m``, ``stepped_param``) elsewhere; the same v bits
    every way.

    Args:
        param: the parameter, (..., R, C), fp32, bf16 or fp16; overwritten with the stepped value in its dtype.
        grad: its gradient, the shape of ``param`` (any float dtype, upcast to fp32).
        m_codes: uint8 (ceil(N / 2),) packed DE-map codes of m; m_absmax: fp32 (ceil(N / block_size),); rewritten.
        ratio: fp32 (..., R), R / mean(R) of the new row statistics; col: fp32 (..., C), the new column statistics.
        scalars: the step's hyper-parameters; block_size: elements per m block, a power of two >= 2.
    """
    factors = [ratio.contiguous().view(-1), col.contiguous().view(-1)]
    if param.is_contiguous() and use_triton(param, "adamw4bit_step"):
        job = StepJob(param, grad.contiguous(), m_codes, m_absmax, m_codes, factors, scalars, factored=ratio.shape[-1])
        adamw4bit_steps_triton([job], block_size, False)
    elif param.is_contiguous() and _cpu_kernel(param, grad) is not None:
        _run_cpu_blocks(
            param, grad.contiguous(), m_codes, m_absmax, block_size, V_FACTORED, scalars,
            old_row=factors[0], old_col=factors[1], n_rows=ratio.shape[-1],
        )  # fmt: skip
    else:
        m = step_quantized_m(m_codes, m_absmax, grad.float(), scalars, block_size)
        v = factored_v(ratio, col)
        param.copy_(stepped_param([param.float()], [m.view_as(param)], [v.view_as(param)], [scalars])[0])


def factored_v(ratio: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The factored second moment ``ratio[..., i] * col[..., j]``, fp32 (..., R, C), from (..., R) and (..., C)."""
    return ratio.unsqueeze(-1) * col.unsqueeze(-2)


def squared_means(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The means of g^2 over the last dimension and over the second-to-last, in fp32: what AdamW4bitFactor's row and
    column statistics average (``squared_sums`` divided by C and R in fp64, rounded to fp32 once, as a sharded
    tensor's means are formed from its summed shards).

    Args:
        grad: (..., R, C), any float dtype.

    Returns:
        (fp32 (..., R), fp32 (..., C), the largest |g| as ``squared_sums`` gives it).
    """
    row_sums, col_sums, grad_max = squared_sums(grad)
    n_rows, n_cols = grad.shape[-2:]
    return (row_sums.double() / n_cols).float(), (col_sums.double() / n_rows).float(), grad_max


def squared_sums(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The sums of g^2 over the last dimension and over the second-to-last. One pass over g for contiguous tensors,
    which also gives the largest |g|: Triton on CUDA (fp32 per-tile partial sums, added in a fixed order), C on the
    CPU (fp64 sums of the exact squares, row groups added in a fixed order, ``_squared_sums_cpu``); both
    deterministic, in another summation order than the twin's (fp32 torch sums), which runs elsewhere.

    Args:
        grad: (..., R, C), any float dtype.

    Returns:
        ((..., R) and (..., C) sums, fp64 from the C pass, fp32 otherwise; the 0-d fp32 largest |g| from the Triton
        or C pass (not finite exactly when a g is not; NaN reads as inf in Triton, as NaN in C), or None from the
        twin).
    """
    if grad.numel() and grad.is_contiguous():
        if use_triton(grad, "adamw4bit_step"):
            return _squared_sums_triton(grad)
        if _cpu_kernel(grad, grad) is not None:
            return _squared_sums_cpu(grad)
    g = grad.float()
    squared = g * g
    return squared.sum(dim=-1), squared.sum(dim=-2), None


# The element-wise ops of the update on lists of tensors (one multi-tensor launch per op on CUDA: an optimizer's many
# small fp32-state tensors step together); ``scalars`` holds each tensor's ``StepScalars``.


def next_m(ms: list[torch.Tensor], grads: list[torch.Tensor], scalars: list[StepScalars]) -> list[torch.Tensor]:
    """New first moments ``m + (1 - beta1) * (g - m)``, three separately rounded fp32 ops.

    Args:
        ms: fp32 old m; grads: fp32 gradients, each the shape of its m; scalars: each tensor's step scalars.

    Returns:
        New fp32 tensors, the shapes of ``ms``.
    """
    diff = torch._foreach_sub(grads, ms)
    torch._foreach_mul_(diff, [s.one_minus_beta1 for s in scalars])
    return torch._foreach_add(ms, diff)


def next_v(vs: list[torch.Tensor], grads: list[torch.Tensor], scalars: list[StepScalars]) -> list[torch.Tensor]:
    """New second moments ``v * beta2 + ((1 - beta2) * g) * g``, four separately rounded fp32 ops.

    Args:
        vs: fp32 old v (>= 0); grads: fp32 gradients, each the shape of its v; scalars: each tensor's step scalars.

    Returns:
        New fp32 tensors (>= 0), the shapes of ``vs``.
    """
    decayed = torch._foreach_mul(vs, [s.beta2 for s in scalars])
    squared = torch._foreach_mul(grads, [s.one_minus_beta2 for s in scalars])
    torch._foreach_mul_(squared, grads)
    torch._foreach_add_(decayed, squared)
    return decayed


def stepped_param(
    ps: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor], scalars: list[StepScalars]
) -> list[torch.Tensor]:
    """The stepped parameters ``p * decay + (neg_step_size * m) / (sqrt_rn(v) / sqrt(1 - beta2^t) + eps)``.

    Args:
        ps: fp32 parameters; ms, vs: fp32 new moments (not re-quantized), each the shape of its p; scalars: each
            tensor's step scalars.

    Returns:
        New fp32 tensors, the shapes of ``ps``.
    """
    denom = _sqrt_rn(vs)
    torch._foreach_div_(denom, [s.bias_correction2_sqrt for s in scalars])
    torch._foreach_add_(denom, [s.eps for s in scalars])
    update = torch._foreach_mul(ms, [s.neg_step_size for s in scalars])
    torch._foreach_div_(update, denom)
    stepped = torch._foreach_mul(ps, [s.decay for s in scalars])
    torch._foreach_add_(stepped, update)
    return stepped


def _sqrt_rn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Correctly rounded fp32 sqrt of each tensor, as the kernel's sqrt_rn.

    torch's fp32 CPU sqrt (MKL's) is not correctly rounded on every CPU. Via fp64 it is, even where the fp64 sqrt is
    only faithful (< 1 ulp off): with fp32 x scaled by a power of 4 into [1, 4) and mid any fp32 rounding midpoint
    in [1, 2), |x - mid^2| >= 2^-48, so |sqrt(x) - mid| > 2^-50, four fp64 ulps.
    """
    if any(x.device.type == "cpu" for x in xs):
        return [torch.sqrt(x.double()).float() if x.device.type == "cpu" else torch.sqrt(x) for x in xs]
    return torch._foreach_sqrt(xs)


def adamw_fp32_steps(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    scalars: list[StepScalars],
) -> None:
    """AdamW with fp32 m and v, for many tensors at once (AdamW4bit's layout for tensors too small to quantize), all
    in place: the m, v and parameter of ``next_m``, ``next_v`` and ``stepped_param``.

    Args:
        params: parameters (fp32, bf16 or fp16), overwritten with the stepped values in their dtype.
        grads: their gradients, the shapes of ``params``, finite, any float dtype.
        ms, vs: fp32 moments, the shapes of ``params``, overwritten with the new ones.
        scalars: each tensor's step scalars.

    Returns:
        None. The multi-tensor Triton kernel steps the contiguous tensors where ``use_triton`` allows it (one launch
        per ``MAX_TENSORS_PER_LAUNCH`` tensors of one param dtype, grad dtype and device), the C kernel the
        contiguous CPU tensors (one call for all, bit for bit the twin), the twin's multi-tensor ops
        (``adamw_fp32_steps_torch``) the others.
    """
    on_triton: dict[tuple, list[int]] = {}
    on_cpu, rest = [], []
    for i, tensors in enumerate(zip(params, grads, ms, vs, strict=True)):
        if not tensors[0].numel():
            continue
        if not all(t.is_contiguous() for t in tensors):
            rest.append(i)
        elif use_triton(tensors[0], "adamw4bit_step"):
            on_triton.setdefault((params[i].dtype, grads[i].dtype, params[i].device), []).append(i)
        elif _cpu_kernel(params[i], grads[i]) is not None:
            on_cpu.append(i)
        else:
            rest.append(i)
    for indices in on_triton.values():
        for start in range(0, len(indices), MAX_TENSORS_PER_LAUNCH):
            chunk = indices[start : start + MAX_TENSORS_PER_LAUNCH]
            _adamw_fp32_steps_triton(*([column[i] for i in chunk] for column in (params, grads, ms, vs, scalars)))
    if on_cpu:
        _adamw_fp32_steps_cpu(*([column[i] for i in on_cpu] for column in (params, grads, ms, vs, scalars)))
    if rest:
        adamw_fp32_steps_torch(*([column[i] for i in rest] for column in (params, grads, ms, vs, scalars)))


def adamw_fp32_steps_torch(params, grads, ms, vs, scalars) -> None:
    """``adamw_fp32_steps`` as the twin's multi-tensor torch ops (one launch per op for all tensors on CUDA): the
    oracle of the Triton kernel and the CPU path."""
    grads = _as_fp32(grads)
    new_v, new_m = next_v(vs, grads, scalars), next_m(ms, grads, scalars)
    stepped = stepped_param(_as_fp32(params), new_m, new_v, scalars)
    torch._foreach_copy_(vs + ms, new_v + new_m)
    torch._foreach_copy_(params, stepped)


def _as_fp32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as fp32: fp32 ones themselves, the others upcast by one multi-tensor copy."""
    out = [t if t.dtype == torch.float32 else torch.empty_like(t, dtype=torch.float32) for t in tensors]
    upcast = [i for i, t in enumerate(tensors) if out[i] is not t]
    if upcast:
        torch._foreach_copy_([out[i] for i in upcast], [tensors[i] for i in upcast])
    return out


def step_quantized_m(
    m_codes: torch.Tensor, m_absmax: torch.Tensor, grad: torch.Tensor, scalars: StepScalars, block_size: int
) -> torch.Tensor:
    """Block-wise 4-bit m through one step: dequantize, ``next_m``, requantize into ``m_codes``/``m_absmax``.

    Args:
        m_codes: uint8 (ceil(N / 2),) packed DE-map codes; rewritten.
        m_absmax: fp32 (ceil(N / block_size),) block scales; rewritten.
        grad: fp32 gradient, N elements, any shape.
        scalars: the step's scalars.
        block_size: elements per block, even.

    Returns:
        The new m before quantisation, fp32, the shape of ``grad``.
    """
    de = quant4.dynamic_exponent_map(m_codes.device)
    m = next_m([quant4.dequantize_blockwise(m_codes, m_absmax, de, grad.shape, block_size)], [grad], [scalars])[0]
    codes, absmax = quant4.quantize_blockwise(m, de, block_size)
    m_codes.copy_(codes)
    m_absmax.copy_(absmax)
    return m


def rank1_next_statistics(grad, v_codes, v_scales: list[torch.Tensor], scalars: StepScalars) -> list[torch.Tensor]:
    """Per-dimension maxima of the new rank-1 v (``next_v`` of the dequantized old v), before it is quantized.

    Args:
        grad: the gradient, N elements (upcast to fp32).
        v_codes: uint8 (ceil(N / 2),) packed linear-map codes of the old v.
        v_scales: the old rank-1 statistics, fp32 (n_k,) vectors with prod_k n_k = N.
        scalars: the step's scalars.

    Returns:
        The new statistics, fp32 (n_k,) vectors (``quant4.rank1_statistics``).
    """
    shape = tuple(stat.numel() for stat in v_scales)
    old = quant4.dequantize_rank1(v_codes, v_scales, quant4.linear_map(v_codes.device), shape)
    return quant4.rank1_statistics(next_v([old], [grad.float().reshape(shape)], [scalars])[0])


def adamw4bit_step_torch(
    param, grad, m_codes, m_absmax, v_codes, v_scales, scalars, block_size, v_rank1, reduce_stats=None
) -> None:
    """Pure-torch twin of the kernel, same arguments and in-place results as ``adamw4bit_step``."""
    numel, lin = param.numel(), quant4.linear_map(param.device)
    g = grad.float().flatten()
    m = step_quantized_m(m_codes, m_absmax, g, scalars, block_size)
    if v_rank1:
        shape = tuple(stat.numel() for stat in v_scales)
        v = next_v([quant4.dequantize_rank1(v_codes, v_scales, lin, (numel,))], [g], [scalars])[0]
        codes, new_scales = quant4.quantize_rank1(v, lin, reduce_stats, shape)
    else:
        v = next_v([quant4.dequantize_blockwise(v_codes, v_scales[0], lin, (numel,), block_size)], [g], [scalars])[0]
        codes, absmax = quant4.quantize_blockwise(v, lin, block_size)
        new_scales = [absmax]
    param.copy_(stepped_param([param.detach().float().flatten()], [m], [v], [scalars])[0].view_as(param))
    v_codes.copy_(codes)
    for scale, new in zip(v_scales, new_scales, strict=True):
        scale.copy_(new)


def adamw4bit_step_cpu(
    param, grad, m_codes, m_absmax, v_codes, v_scales, scalars, block_size, v_rank1, reduce_stats=None, new_stats=None
) -> None:
    """The C kernel (``adamw4bit_step.c``) on CPU tensors, one call per range of blocks on
    ``torch.get_num_threads()`` threads; same contract and bit for bit the same results as the twin. ``new_stats``:
    this step's rank-1 statistics when ``rank1_statistics_pass`` computed them already (else computed here)."""
    if v_rank1 and len(v_scales) != 2:
        raise ValueError(f"the C kernel handles rank-1 v of 2 dimensions, got {len(v_scales)}; use the torch twin")
    if _cpu_kernel(param, grad) is None or not param.is_contiguous():
        raise ValueError("adamw4bit_step_cpu needs a built C kernel and a contiguous CPU param (adamw4bit_step)")
    grad = grad.contiguous()
    if not v_rank1:
        _run_cpu_blocks(param, grad, m_codes, m_absmax, block_size, V_BLOCK, scalars, v_codes, v_scales[0])
        return
    old_row, old_col = v_scales
    if new_stats is None:
        new_stats = rank1_next_statistics_cpu(grad, v_codes, v_scales, scalars)[0]
    new_row, new_col = new_stats
    if reduce_stats is not None:
        reduce_stats([new_row, new_col])
    _run_cpu_blocks(
        param, grad, m_codes, m_absmax, block_size, V_RANK1, scalars, v_codes, None, old_row, old_col, new_row, new_col
    )
    old_row.copy_(new_row)
    old_col.copy_(new_col)


def rank1_next_statistics_cpu(grad, v_codes, v_scales: list[torch.Tensor], scalars: StepScalars):
    """``rank1_next_statistics`` for 2-D rank-1 v in the C kernel: ranges of rows on threads, each with its own
    column maxima, merged by a max (exact). Same arguments; returns (the twin's statistics bit for bit, the 0-d
    largest |g|, NaN when a g is NaN)."""
    library = _cpu_kernel(grad, grad)
    old_row, old_col = v_scales
    rows, cols = old_row.numel(), old_col.numel()
    ranges = cpu_library.chunks(rows, max(1, CPU_CHUNK_ELEMENTS // max(cols, 1)))
    new_row, col_maxima = torch.empty_like(old_row), torch.zeros(len(ranges), cols)
    grad_maxima = torch.zeros(len(ranges))
    tensors = [grad, v_codes, old_row, old_col, quant4.linear_map("cpu"), new_row, _scalar_array(scalars)]
    g, codes, old_r, old_c, lin, new_r, scalar_array = _pointers(tensors)  # the tensors stay referenced here

    def call(index: int, begin: int, end: int) -> None:
        _checked(library.adamw4bit_rank1_stats(
            g, cpu_library.DTYPE_CODES[grad.dtype], codes, old_r, old_c, lin, begin, end, cols, new_r,
            col_maxima[index].data_ptr(), grad_maxima[index].data_ptr(), scalar_array,
        ))  # fmt: skip

    cpu_library.run_chunks(call, ranges)
    return [new_row, col_maxima.amax(dim=0)], grad_maxima.amax()


def _squared_sums_cpu(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``squared_sums`` of a contiguous CPU gradient in the C kernel (``adamw4bit_squared_sums``): ranges of whole
    row groups on threads, each row's sum and each group's column sums in fp64, the groups added in order; the same
    bits for any thread count."""
    library = _cpu_kernel(grad, grad)
    *batch, n_rows, n_cols = grad.shape
    slices = math.prod(batch)
    flat_rows = slices * n_rows
    group_rows = max(SUM_GROUP_ROWS, math.ceil(flat_rows / SUM_GROUPS))
    n_groups = math.ceil(flat_rows / group_rows)
    row_sums = torch.empty(flat_rows, dtype=torch.float64)
    col_sums = torch.zeros(n_groups, slices * n_cols, dtype=torch.float64)
    groups = cpu_library.chunks(n_groups, max(1, CPU_CHUNK_ELEMENTS // (group_rows * n_cols)))
    ranges = [(begin * group_rows, min(end * group_rows, flat_rows)) for begin, end in groups]
    grad_maxima = torch.zeros(len(ranges))
    g, rows_out, cols_out = _pointers([grad, row_sums, col_sums])  # the tensors stay referenced here

    def call(index: int, begin: int, end: int) -> None:
        _checked(library.adamw4bit_squared_sums(
            g, cpu_library.DTYPE_CODES[grad.dtype], begin, end, n_rows, n_cols, group_rows, slices, rows_out,
            cols_out, grad_maxima[index].data_ptr(),
        ))  # fmt: skip

    cpu_library.run_chunks(call, ranges)
    return row_sums.view(*batch, n_rows), col_sums.sum(0).view(*batch, n_cols), grad_maxima.amax()


def _run_cpu_blocks(
    param, grad, m_codes, m_absmax, block_size, v_mode, scalars, v_codes=None, v_absmax=None,
    old_row=None, old_col=None, new_row=None, new_col=None, n_rows=1,
) -> None:  # fmt: skip
    """``adamw4bit_blocks`` of the C kernel over all blocks of ``param``, in ranges on threads (``n_rows``: R of a
    factored v's (R, C) slices)."""
    if block_size < 2 or block_size % 2:
        raise ValueError(f"the C kernel needs an even block_size >= 2, got {block_size}")
    library, numel = _cpu_kernel(param, grad), param.numel()
    n_cols = param.shape[-1] if v_mode == V_FACTORED else (old_col.numel() if old_col is not None else 1)
    state = [m_codes, m_absmax, v_codes, v_absmax, old_row, old_col, new_row, new_col]
    books = [quant4.dynamic_exponent_map("cpu"), _midpoints("de", param.device), quant4.linear_map("cpu")]
    tensors = [param, grad, *state, *books, _midpoints("linear", param.device), _scalar_array(scalars)]
    p, g, *addresses, scalar_array = _pointers(tensors)  # built here, once: the tensors stay referenced

    def call(_: int, begin: int, end: int) -> None:
        _checked(library.adamw4bit_blocks(
            p, cpu_library.DTYPE_CODES[param.dtype], g, cpu_library.DTYPE_CODES[grad.dtype], *addresses,
            numel, begin, end, block_size, n_rows, n_cols, v_mode, scalar_array,
        ))  # fmt: skip

    blocks = quant4.num_blocks(numel, block_size)
    cpu_library.run_chunks(call, cpu_library.chunks(blocks, max(1, CPU_CHUNK_ELEMENTS // block_size)))
    increment_version([t for t in (param, m_codes, m_absmax, v_codes, v_absmax) if t is not None])


def _adamw_fp32_steps_cpu(params, grads, ms, vs, scalars) -> None:
    """``adamw_fp32_steps`` of non-empty contiguous CPU tensors in one call of the C kernel (``adamw_fp32_states``);
    their tensors are at most a few thousand elements, so one thread steps them all."""
    library = _cpu_kernel(params[0], grads[0])
    codes = cpu_library.DTYPE_CODES
    arrays = [  # the call's arguments after the count, in order; kept referenced until it returns
        torch.tensor(_pointers(params), dtype=torch.int64),
        torch.tensor([codes[p.dtype] for p in params], dtype=torch.int32),
        torch.tensor(_pointers(grads), dtype=torch.int64),
        torch.tensor([codes[g.dtype] for g in grads], dtype=torch.int32),
        torch.tensor(_pointers(ms), dtype=torch.int64),
        torch.tensor(_pointers(vs), dtype=torch.int64),
        torch.tensor([p.numel() for p in params], dtype=torch.int64),
        torch.stack([_scalar_array(s) for s in scalars]),
    ]
    _checked(library.adamw_fp32_states(len(params), *(array.data_ptr() for array in arrays)))
    increment_version(params + ms + vs)


def _checked(status: int) -> None:
    if status:
        raise MemoryError("the 4-bit step's C kernel could not allocate its scratch buffers")


def _cpu_kernel(param: torch.Tensor, grad: torch.Tensor):
    """The C library when it runs on these tensors (CPU, dtypes it reads), else None."""
    if param.dtype not in cpu_library.DTYPE_CODES or grad.dtype not in cpu_library.DTYPE_CODES:
        return None
    library = cpu_kernel(param, "adamw4bit_step")
    if library is not None and not getattr(library, "_hf_ext_typed", False):
        _declare_types(library)
    if library is not None and torch.float16 in (param.dtype, grad.dtype) and not library.adamw4bit_has_fp16():
        _warn_no_fp16()
        return None
    return library


@functools.cache
def _warn_no_fp16() -> None:
    warnings.warn(
        "hf_ext kernel 'adamw4bit_step': the C compiler has no _Float16 (gcc >= 12 or clang >= 15 on x86 have it), "
        "so fp16 tensors step with the pure-torch twin on the CPU (correct, slower); other dtypes use the C kernel.",
        RuntimeWarning,
        stacklevel=4,
    )


def _declare_types(library) -> None:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    library.adamw4bit_blocks.argtypes = [ptr, i32, ptr, i32, *[ptr] * 12, i64, i64, i64, i32, i64, i64, i32, ptr]
    library.adamw4bit_blocks.restype = i32
    library.adamw4bit_rank1_stats.argtypes = [ptr, i32, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
    library.adamw4bit_rank1_stats.restype = i32
    library.adamw4bit_squared_sums.argtypes = [ptr, i32, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    library.adamw4bit_squared_sums.restype = i32
    library.adamw_fp32_states.argtypes = [i64, *[ptr] * 8]
    library.adamw_fp32_states.restype = i32
    library.adamw4bit_has_fp16.argtypes = []
    library.adamw4bit_has_fp16.restype = i32
    library._hf_ext_typed = True


def _pointers(tensors: list[torch.Tensor | None]) -> list[int | None]:
    """The data pointers of contiguous CPU tensors (None stays NULL); the caller keeps the tensors alive."""
    for tensor in tensors:
        if tensor is not None and (not tensor.is_contiguous() or tensor.device.type != "cpu"):
            raise ValueError("the C kernel needs contiguous CPU tensors")
    return [None if tensor is None else tensor.data_ptr() for tensor in tensors]


def _scalar_array(s: StepScalars) -> torch.Tensor:
    """The step's scalars as fp32, in the order the C kernel indexes them (each Python float rounded once)."""
    values = [s.decay, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.bias_correction2_sqrt, s.neg_step_size, s.eps]
    return torch.tensor(values, dtype=torch.float32)


@functools.cache
def _midpoints(codebook: str, device: torch.device) -> torch.Tensor:
    """The decision thresholds of the ``"de"`` or ``"linear"`` codebook on ``device`` (cached: do not modify)."""
    book = quant4.dynamic_exponent_map(device) if codebook == "de" else quant4.linear_map(device)
    return quant4.code_midpoints(book).contiguous()


@dataclass
class StepJob:
    """One parameter's share of a multi-tensor step: ``adamw4bit_step``'s arguments but the shared ones."""

    param: torch.Tensor
    grad: torch.Tensor
    m_codes: torch.Tensor
    m_absmax: torch.Tensor
    v_codes: torch.Tensor
    v_scales: list[torch.Tensor]
    scalars: StepScalars
    reduce_stats: object = None
    new_stats: list[torch.Tensor] | None = None  # rank-1: this step's statistics, set by ``rank1_statistics_pass``
    factored: int | None = None  # R: v_scales are then (R / mean(R), C) of AdamW4bitFactor (v_codes unused)


def adamw4bit_step_triton(
    param, grad, m_codes, m_absmax, v_codes, v_scales, scalars, block_size, v_rank1, reduce_stats=None
) -> None:
    """Launch the fused kernel on one tensor (CUDA, or CPU tensors under TRITON_INTERPRET=1); same contract as the
    twin."""
    job = StepJob(param, grad, m_codes, m_absmax, v_codes, v_scales, scalars, reduce_stats)
    adamw4bit_steps_triton([job], block_size, v_rank1)


def rank1_next_statistics_triton(grad, v_codes, v_scales: list[torch.Tensor], scalars: StepScalars):
    """``rank1_next_statistics`` for 2-D rank-1 v in one Triton pass: tiles of ``STATS_TILE`` elements reduce the new
    v's maxima in registers and merge them with atomic maxima (v >= 0, so a zeroed vector is the identity).

    Args:
        grad: the contiguous gradient, N = R C elements; v_codes: uint8 (ceil(N / 2),) packed old v codes;
        v_scales: the old (R,) row and (C,) column statistics, fp32; scalars: the step's scalars.

    Returns:
        (the new fp32 (R,) and (C,) statistics, bit for bit those of ``rank1_next_statistics`` (max is exact), the
        0-d largest |g|, inf when a g is NaN).
    """
    job = StepJob(grad, grad, v_codes, v_codes, v_codes, v_scales, scalars)
    _check_triton_jobs([job], 2, True)
    grad_max = _rank1_pass_triton([job])[0]
    return job.new_stats, grad_max


def adamw4bit_steps_triton(jobs: list[StepJob], block_size: int, v_rank1: bool) -> None:
    """The fused step of many tensors, ``MAX_TENSORS_PER_LAUNCH`` per launch: a first launch reduces the rank-1
    statistics of those whose ``rank1_statistics_pass`` has not, each job's ``reduce_stats`` sees its own, then one
    launch steps them all.

    Args:
        jobs: contiguous tensors on one device, every param of one dtype and every grad of one dtype; rank-1 v of
            two dimensions when ``v_rank1``; all or none ``factored`` (then not ``v_rank1``).
        block_size: elements per quantisation block, a power of two >= 2; v_rank1: rank-1 (True) or block-wise v.
    """
    _check_triton_jobs(jobs, block_size, v_rank1)
    for start in range(0, len(jobs), MAX_TENSORS_PER_LAUNCH):
        chunk = jobs[start : start + MAX_TENSORS_PER_LAUNCH]
        if v_rank1:
            fresh = [job for job in chunk if job.new_stats is None]
            if fresh:
                _rank1_pass_triton(fresh)
            for job in chunk:
                if job.reduce_stats is not None:
                    job.reduce_stats(job.new_stats)
        table = _launch_table(chunk, block_size, v_rank1)
        device = chunk[0].param.device
        on_device = table.to(device)
        programs = int(table[-1, COLUMN["program_start"]])
        mode = V_FACTORED if chunk[0].factored else (V_RANK1 if v_rank1 else V_BLOCK)
        if programs:
            _adamw4bit_kernel[(programs,)](
                on_device, on_device.view(torch.float32), len(chunk),
                quant4.dynamic_exponent_map(device), _midpoints("de", device),
                quant4.linear_map(device), _midpoints("linear", device),
                BLOCK=block_size, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM, V_MODE=mode,
                P_DTYPE=_TL_DTYPES[chunk[0].param.dtype], G_DTYPE=_TL_DTYPES[chunk[0].grad.dtype],
                MAX_TENSORS=MAX_TENSORS_PER_LAUNCH, COLUMNS=TABLE_WIDTH, **TWIN_ROUNDING,
            )  # fmt: skip
            written = [[job.param, job.m_codes, job.m_absmax, job.v_codes, *job.v_scales] for job in chunk]
            increment_version([t for tensors in written for t in tensors])
        if v_rank1:
            stats = [s for job in chunk for s in job.v_scales]
            torch._foreach_copy_(stats, [s for job in chunk for s in job.new_stats])


def _check_triton_jobs(jobs: list[StepJob], block_size: int, v_rank1: bool) -> None:
    if triton is None:
        raise RuntimeError("adamw4bit_step_triton needs triton; install it or set HF_EXT_DISABLE_TRITON=1.")
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"the kernel needs a power-of-two block_size >= 2, got {block_size}")
    for job in jobs:
        if v_rank1 and len(job.v_scales) != 2:
            raise ValueError(f"the kernel handles rank-1 v of 2 dimensions, got {len(job.v_scales)}; use the twin")
        if not (job.param.is_contiguous() and job.grad.is_contiguous()):
            raise ValueError("adamw4bit_step_triton needs contiguous param and grad")
        same = (job.param.dtype, job.grad.dtype, job.param.device, bool(job.factored))
        if same != (jobs[0].param.dtype, jobs[0].grad.dtype, jobs[0].param.device, bool(jobs[0].factored)):
            raise ValueError("one launch needs one param dtype, one grad dtype, one device and one kind of v")
        if job.factored and v_rank1:
            raise ValueError("factored v is not a rank-1 layout")


# The launch table: one int64 row per tensor, built on the host and copied to the device once per launch. The
# kernels read its columns by position, in this order; the step's 7 fp32 scalars fill the last 4 columns.
TABLE_COLUMNS = (
    "param", "grad", "m_codes", "m_absmax", "v_codes", "v_absmax", "old_row", "old_col", "new_row", "new_col",
    "numel", "blocks", "rows", "cols", "program_start", "tile_start", "tile_cols", "grad_max", "scalars",
)  # fmt: skip
COLUMN = {name: index for index, name in enumerate(TABLE_COLUMNS)}
TABLE_WIDTH = len(TABLE_COLUMNS) + 3


def _launch_table(jobs: list[StepJob], block_size: int, v_rank1: bool, grad_maxima=None) -> torch.Tensor:
    """The host-side int64 launch table of ``jobs``: one row per job (for rank-1 v with its ``new_stats``, and the
    0-d ``grad_maxima`` the statistics pass writes) and a last row whose ``program_start`` and ``tile_start`` are
    the totals."""
    table = torch.zeros(len(jobs) + 1, TABLE_WIDTH, dtype=torch.int64)
    programs = tiles = 0
    tile_rows, tile_cols = STATS_TILE
    for i, job in enumerate(jobs):
        blocks = quant4.num_blocks(job.param.numel(), block_size)
        if v_rank1:
            rows, cols = job.v_scales[0].numel(), job.v_scales[1].numel()
        else:  # factored: R and C of each (R, C) slice; block-wise: unused
            rows, cols = (job.factored, job.param.shape[-1]) if job.factored else (1, 1)
        old = job.v_scales if v_rank1 or job.factored else [job.v_scales[0]] * 2
        new = job.new_stats if v_rank1 else old
        tensors = [job.param, job.grad, job.m_codes, job.m_absmax, job.v_codes, job.v_scales[0], *old, *new]
        table[i, : len(tensors)] = torch.tensor([t.data_ptr() for t in tensors])
        if grad_maxima is not None:
            table[i, COLUMN["grad_max"]] = grad_maxima[i].data_ptr()
        across = math.ceil(cols / tile_cols)
        table[i, COLUMN["numel"] : COLUMN["grad_max"]] = torch.tensor(
            [job.param.numel(), blocks, rows, cols, programs, tiles, across]
        )
        table[i, COLUMN["scalars"] :].view(torch.float32)[:7] = _scalar_array(job.scalars)
        programs += math.ceil(blocks / BLOCKS_PER_PROGRAM)
        tiles += math.ceil(rows / tile_rows) * across
    table[-1, COLUMN["program_start"]], table[-1, COLUMN["tile_start"]] = programs, tiles
    return table


def _squared_sums_triton(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``squared_sums`` in one Triton pass: each program squares a strip of ``SUM_ROW_TILES`` tiles of
    ``STATS_TILE`` of one (R, C) slice in fp32 and writes each tile's row sums and the strip's column sums, then
    merges its largest |g| with an atomic max; the partial sums are added in a fixed order."""
    *batch, n_rows, n_cols = grad.shape
    slices = math.prod(batch)
    tile_rows, tile_cols = STATS_TILE
    row_groups, col_tiles = math.ceil(n_rows / (tile_rows * SUM_ROW_TILES)), math.ceil(n_cols / tile_cols)
    row_parts = torch.empty(col_tiles, slices * n_rows, device=grad.device)
    col_parts = torch.empty(row_groups, slices * n_cols, device=grad.device)
    grad_max = torch.zeros((), device=grad.device)
    _squared_sums_kernel[(slices * row_groups * col_tiles,)](
        grad, row_parts, col_parts, grad_max, n_rows, n_cols, slices,
        BLOCK_R=tile_rows, BLOCK_C=tile_cols, ROW_TILES=SUM_ROW_TILES, **TWIN_ROUNDING,
    )  # fmt: skip
    return row_parts.sum(0).view(*batch, n_rows), col_parts.sum(0).view(*batch, n_cols), grad_max


def _rank1_pass_triton(jobs: list[StepJob]) -> list[torch.Tensor]:
    """The rank-1 statistics pass of at most ``MAX_TENSORS_PER_LAUNCH`` jobs (contiguous grads of one dtype on one
    device) in one launch: sets each job's ``new_stats`` and returns its 0-d largest |g|, all views of one zeroed
    buffer (v >= 0 and |g| >= 0, so zero is the identity of the atomic maxima; an empty tensor's stay zero)."""
    sizes = [n for job in jobs for n in (job.v_scales[0].numel(), job.v_scales[1].numel(), 1)]
    views = torch.zeros(sum(sizes), device=jobs[0].param.device).split(sizes)
    for i, job in enumerate(jobs):
        job.new_stats = list(views[3 * i : 3 * i + 2])
    grad_maxima = [views[3 * i + 2].view(()) for i in range(len(jobs))]
    table = _launch_table(jobs, 2, True, grad_maxima)
    tiles = int(table[-1, COLUMN["tile_start"]])
    if tiles:
        tile_rows, tile_cols = STATS_TILE
        on_device = table.to(jobs[0].param.device)
        _rank1_stats_kernel[(tiles,)](
            on_device, on_device.view(torch.float32), len(jobs), quant4.linear_map(on_device.device),
            G_DTYPE=_TL_DTYPES[jobs[0].grad.dtype], BLOCK_R=tile_rows, BLOCK_C=tile_cols,
            MAX_TENSORS=MAX_TENSORS_PER_LAUNCH, COLUMNS=TABLE_WIDTH, **TWIN_ROUNDING,
        )  # fmt: skip
    return grad_maxima


FP32_TABLE_COLUMNS = ("param", "grad", "m", "v", "numel", "program_start", "scalars")  # _adamw_fp32_kernel's
FP32_TABLE_WIDTH = len(FP32_TABLE_COLUMNS) + 3
FP32_BLOCK = 1024  # elements per program of the fp32-state kernel


def _adamw_fp32_steps_triton(params, grads, ms, vs, scalars) -> None:
    """``adamw_fp32_steps`` of at most ``MAX_TENSORS_PER_LAUNCH`` non-empty contiguous tensors (params of one dtype,
    grads of one dtype, one device) in one launch of ``_adamw_fp32_kernel``, through its own launch table."""
    table = torch.zeros(len(params) + 1, FP32_TABLE_WIDTH, dtype=torch.int64)
    programs = 0
    for i, tensors in enumerate(zip(params, grads, ms, vs, strict=True)):
        table[i, :4] = torch.tensor([t.data_ptr() for t in tensors])
        table[i, 4:6] = torch.tensor([tensors[0].numel(), programs])
        table[i, 6:].view(torch.float32)[:7] = _scalar_array(scalars[i])
        programs += math.ceil(tensors[0].numel() / FP32_BLOCK)
    table[-1, 5] = programs
    on_device = table.to(params[0].device)
    _adamw_fp32_kernel[(programs,)](
        on_device, on_device.view(torch.float32), len(params), BLOCK=FP32_BLOCK,
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        MAX_TENSORS=MAX_TENSORS_PER_LAUNCH, COLUMNS=FP32_TABLE_WIDTH, **TWIN_ROUNDING,
    )  # fmt: skip
    increment_version(params + ms + vs)


if triton is not None:  # TRITON_INTERPRET=1 must be set before triton is imported to run this on CPU
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _find_tensor(table_ptr, n_tensors, start_column, MAX_TENSORS: tl.constexpr, COLUMNS: tl.constexpr):
        """The launch-table row of this program and the program's index within that tensor's programs."""
        pid = tl.program_id(0)
        ids = tl.arange(0, MAX_TENSORS)
        starts = tl.load(table_ptr + ids * COLUMNS + start_column, mask=ids < n_tensors, other=1 << 62)
        t = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
        return t, pid - tl.load(table_ptr + t * COLUMNS + start_column)

    @triton.jit
    def _address(table_ptr, row, column, DTYPE: tl.constexpr):
        """The pointer to ``DTYPE`` elements in column ``column`` of the launch table's row ``row``."""
        return tl.load(table_ptr + row + column).to(tl.pointer_type(DTYPE))

    @triton.jit
    def _store_param(p_ptr, elem, p, valid, P_DTYPE: tl.constexpr):
        """Store the fp32 stepped parameter ``p`` in ``P_DTYPE``, bf16 rounded to nearest even by hand as torch's
        ``copy_`` does (finite values)."""
        if P_DTYPE == tl.bfloat16:
            bits = p.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(p_ptr + elem, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=valid)
        else:
            tl.store(p_ptr + elem, p.to(p_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _adamw_fp32_kernel(
        table_ptr, table_f32_ptr, n_tensors, BLOCK: tl.constexpr,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MAX_TENSORS: tl.constexpr, COLUMNS: tl.constexpr,
    ):  # fmt: skip
        """AdamW with fp32 m and v on ``BLOCK`` elements of one tensor of the launch table (FP32_TABLE_COLUMNS): the
        twin's separately rounded ops in its order, each array read and written once."""
        t, program = _find_tensor(table_ptr, n_tensors, 5, MAX_TENSORS, COLUMNS)
        row = t * COLUMNS
        p_ptr, g_ptr = _address(table_ptr, row, 0, P_DTYPE), _address(table_ptr, row, 1, G_DTYPE)
        m_ptr, v_ptr = _address(table_ptr, row, 2, tl.float32), _address(table_ptr, row, 3, tl.float32)
        scalars = table_f32_ptr + 2 * (row + 6)
        decay, one_minus_beta1, beta2 = tl.load(scalars), tl.load(scalars + 1), tl.load(scalars + 2)
        one_minus_beta2, bias_correction2_sqrt = tl.load(scalars + 3), tl.load(scalars + 4)
        neg_step_size, eps = tl.load(scalars + 5), tl.load(scalars + 6)
        elem = program * BLOCK + tl.arange(0, BLOCK)
        valid = elem < tl.load(table_ptr + row + 4)
        g = tl.load(g_ptr + elem, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + elem, mask=valid, other=0.0)
        v = tl.load(v_ptr + elem, mask=valid, other=0.0)
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + (one_minus_beta2 * g) * g
        tl.store(m_ptr + elem, m, mask=valid)
        tl.store(v_ptr + elem, v, mask=valid)
        denom = tl.math.div_rn(tl.math.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = tl.load(p_ptr + elem, mask=valid, other=0.0).to(tl.float32) * decay
        _store_param(p_ptr, elem, p + tl.math.div_rn(neg_step_size * m, denom), valid, P_DTYPE)

    @triton.jit
    def _adamw4bit_kernel(
        table_ptr, table_f32_ptr, n_tensors, de_ptr, de_mid_ptr, lin_ptr, lin_mid_ptr,
        BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, V_MODE: tl.constexpr,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MAX_TENSORS: tl.constexpr, COLUMNS: tl.constexpr,
    ):  # fmt: skip
        t, program = _find_tensor(table_ptr, n_tensors, 14, MAX_TENSORS, COLUMNS)  # columns: TABLE_COLUMNS
        row = t * COLUMNS
        p_ptr, g_ptr = _address(table_ptr, row, 0, P_DTYPE), _address(table_ptr, row, 1, G_DTYPE)
        m_codes_ptr, m_absmax_ptr = _address(table_ptr, row, 2, tl.uint8), _address(table_ptr, row, 3, tl.float32)
        v_codes_ptr, v_absmax_ptr = _address(table_ptr, row, 4, tl.uint8), _address(table_ptr, row, 5, tl.float32)
        old_row_ptr, old_col_ptr = _address(table_ptr, row, 6, tl.float32), _address(table_ptr, row, 7, tl.float32)
        new_row_ptr, new_col_ptr = _address(table_ptr, row, 8, tl.float32), _address(table_ptr, row, 9, tl.float32)
        numel, num_blocks = tl.load(table_ptr + row + 10), tl.load(table_ptr + row + 11)
        n_rows, n_cols = tl.load(table_ptr + row + 12), tl.load(table_ptr + row + 13)
        scalars = table_f32_ptr + 2 * (row + 18)
        decay, one_minus_beta1, beta2 = tl.load(scalars), tl.load(scalars + 1), tl.load(scalars + 2)
        one_minus_beta2, bias_correction2_sqrt = tl.load(scalars + 3), tl.load(scalars + 4)
        neg_step_size, eps = tl.load(scalars + 5), tl.load(scalars + 6)

        HALF: tl.constexpr = BLOCK // 2
        blocks = program * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
        block_ok = blocks < num_blocks
        byte = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (BPP, HALF): codes of elements 2*byte, +1
        elem = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (BPP, BLOCK) in flat order
        valid = elem < numel
        byte_ok = 2 * byte < numel

        packed_m = tl.load(m_codes_ptr + byte, mask=byte_ok, other=0).to(tl.int32)
        m_q = tl.reshape(tl.join(packed_m & 15, packed_m >> 4), (BLOCKS_PER_PROGRAM, BLOCK))
        m = tl.load(de_ptr + m_q) * tl.load(m_absmax_ptr + blocks, mask=block_ok, other=0.0)[:, None]
        p = tl.load(p_ptr + elem, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + elem, mask=valid, other=0.0).to(tl.float32)
        p = p * decay
        m = m + one_minus_beta1 * (g - m)
        if V_MODE == 3:  # V_FACTORED: v = (R / mean R)[row] * C[col] of each (R, C) slice, as factored_v
            flat_row, c = elem // n_cols, elem % n_cols
            v = tl.load(old_row_ptr + flat_row, mask=valid, other=0.0) * tl.load(
                old_col_ptr + (flat_row // n_rows) * n_cols + c, mask=valid, other=0.0
            )
        else:
            packed_v = tl.load(v_codes_ptr + byte, mask=byte_ok, other=0).to(tl.int32)
            v_q = tl.reshape(tl.join(packed_v & 15, packed_v >> 4), (BLOCKS_PER_PROGRAM, BLOCK))
            if V_MODE == 1:  # V_RANK1
                r, c = elem // n_cols, elem % n_cols
                old_scale = tl.minimum(
                    tl.load(old_row_ptr + r, mask=valid, other=0.0), tl.load(old_col_ptr + c, mask=valid, other=0.0)
                )
            else:
                old_scale = tl.load(v_absmax_ptr + blocks, mask=block_ok, other=0.0)[:, None]
            v = tl.load(lin_ptr + v_q) * old_scale
            v = v * beta2 + (one_minus_beta2 * g) * g
        m = tl.where(valid, m, 0.0)
        v = tl.where(valid, v, 0.0)
        denom = tl.math.div_rn(tl.math.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p + tl.math.div_rn(neg_step_size * m, denom)
        _store_param(p_ptr, elem, p, valid, P_DTYPE)

        m_scale = tl.max(tl.abs(m), axis=1)
        m_hat = tl.math.div_rn(m, tl.where(m_scale > 0, m_scale, 1.0)[:, None])
        m_q = tl.zeros((BLOCKS_PER_PROGRAM, BLOCK), dtype=tl.int32)
        for k in tl.static_range(15):  # nearest code = number of midpoints strictly below (ties go down; NaN: 15)
            m_q += 1 - (m_hat <= tl.load(de_mid_ptr + k)).to(tl.int32)
        m_lo, m_hi = tl.split(tl.reshape(m_q, (BLOCKS_PER_PROGRAM, HALF, 2)))
        tl.store(m_codes_ptr + byte, (m_lo | (m_hi << 4)).to(tl.uint8), mask=byte_ok)
        tl.store(m_absmax_ptr + blocks, m_scale, mask=block_ok)
        if V_MODE != 3:  # requantize v (a factored v is not stored)
            if V_MODE == 1:
                new_scale = tl.minimum(
                    tl.load(new_row_ptr + r, mask=valid, other=0.0), tl.load(new_col_ptr + c, mask=valid, other=0.0)
                )
            else:
                new_scale = tl.max(v, axis=1)[:, None]
                tl.store(v_absmax_ptr + blocks, tl.max(v, axis=1), mask=block_ok)
            v_hat = tl.math.div_rn(v, tl.where(new_scale > 0, new_scale, 1.0))
            v_q = tl.zeros((BLOCKS_PER_PROGRAM, BLOCK), dtype=tl.int32)
            for k in tl.static_range(15):
                v_q += 1 - (v_hat <= tl.load(lin_mid_ptr + k)).to(tl.int32)
            v_lo, v_hi = tl.split(tl.reshape(v_q, (BLOCKS_PER_PROGRAM, HALF, 2)))
            tl.store(v_codes_ptr + byte, (v_lo | (v_hi << 4)).to(tl.uint8), mask=byte_ok)

    @triton.jit
    def _squared_sums_kernel(
        g_ptr, row_parts_ptr, col_parts_ptr, grad_max_ptr, n_rows, n_cols, n_slices,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        row_groups, col_tiles = tl.cdiv(n_rows, BLOCK_R * ROW_TILES), tl.cdiv(n_cols, BLOCK_C)
        slice_ = pid // (row_groups * col_tiles)
        row_group, col_tile = (pid // col_tiles) % row_groups, pid % col_tiles
        cols = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        col_sums = tl.zeros((BLOCK_C,), dtype=tl.float32)
        magnitude = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for k in tl.static_range(ROW_TILES):  # a column strip of ROW_TILES tiles: one column partial per strip
            rows = (row_group * ROW_TILES + k) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < n_rows
            flat_rows = slice_ * n_rows + rows
            elem = flat_rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            g = tl.load(g_ptr + elem, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            squared = g * g
            tl.store(row_parts_ptr + col_tile * n_slices * n_rows + flat_rows, tl.sum(squared, axis=1), mask=row_ok)
            col_sums += tl.sum(squared, axis=0)
            magnitude = tl.maximum(magnitude, tl.max(tl.where(g == g, tl.abs(g), float("inf")), axis=0))  # NaN: inf
        tl.store(col_parts_ptr + (row_group * n_slices + slice_) * n_cols + cols, col_sums, mask=col_ok)
        tl.atomic_max(grad_max_ptr, tl.max(magnitude, axis=0))

    @triton.jit
    def _rank1_stats_kernel(
        table_ptr, table_f32_ptr, n_tensors, lin_ptr,
        G_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        MAX_TENSORS: tl.constexpr, COLUMNS: tl.constexpr,
    ):  # fmt: skip
        t, tile = _find_tensor(table_ptr, n_tensors, 15, MAX_TENSORS, COLUMNS)  # columns: TABLE_COLUMNS
        row = t * COLUMNS
        g_ptr, v_codes_ptr = _address(table_ptr, row, 1, G_DTYPE), _address(table_ptr, row, 4, tl.uint8)
        old_row_ptr, old_col_ptr = _address(table_ptr, row, 6, tl.float32), _address(table_ptr, row, 7, tl.float32)
        new_row_ptr, new_col_ptr = _address(table_ptr, row, 8, tl.float32), _address(table_ptr, row, 9, tl.float32)
        grad_max_ptr = _address(table_ptr, row, 17, tl.float32)
        n_rows, n_cols = tl.load(table_ptr + row + 12), tl.load(table_ptr + row + 13)
        across = tl.load(table_ptr + row + 16)
        scalars = table_f32_ptr + 2 * (row + 18)
        beta2, one_minus_beta2 = tl.load(scalars + 2), tl.load(scalars + 3)

        rows = (tile // across) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile % across) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok, col_ok = rows < n_rows, cols < n_cols
        valid = row_ok[:, None] & col_ok[None, :]
        elem = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        packed = tl.load(v_codes_ptr + elem // 2, mask=valid, other=0).to(tl.int32)
        q = (packed >> ((elem % 2) * 4).to(tl.int32)) & 15  # element 2j in the low nibble of byte j
        old_scale = tl.minimum(
            tl.load(old_row_ptr + rows, mask=row_ok, other=0.0)[:, None],
            tl.load(old_col_ptr + cols, mask=col_ok, other=0.0)[None, :],
        )
        g = tl.load(g_ptr + elem, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(lin_ptr + q) * old_scale
        v = v * beta2 + (one_minus_beta2 * g) * g
        v = tl.where(valid, v, 0.0)
        tl.atomic_max(new_row_ptr + rows, tl.max(v, axis=1), mask=row_ok)
        tl.atomic_max(new_col_ptr + cols, tl.max(v, axis=0), mask=col_ok)
        magnitude = tl.where(g == g, tl.abs(g), float("inf"))  # NaN as inf: the max must not drop it
        tl.atomic_max(grad_max_ptr, tl.max(tl.max(magnitude, axis=1), axis=0))
