"""Fused 4-bit AdamW step (hf_ext.kernels.adamw4bit_step): the Triton kernel under TRITON_INTERPRET=1 vs its twin.

The ``interpreted`` tests run in the interpreter that tests/conftest.py turns on when no CUDA GPU is present.
Both sides round every fp32 op once (no FMA): codes, scales and parameters are expected to be identical, so the
tolerance is 0.
"""

import pytest
import torch
from triton_interpreter import interpreted

from hf_ext.kernels import adamw4bit_step as fused
from hf_ext.kernels import quant4 as quant
from hf_ext.optim import AdamW4bit, adamw4bit


def random_state(shape, rank1: bool, block_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen) * 1e-2
    v = torch.rand(shape, generator=gen) * 1e-4
    v.view(-1)[::7] = 0.0  # zero entries, a zero row when a dim is small
    m_codes, m_absmax = quant.quantize_blockwise(m, quant.dynamic_exponent_map(), block_size)
    if rank1:
        v_codes, v_scales = quant.quantize_rank1(v, quant.linear_map())
    else:
        v_codes, absmax = quant.quantize_blockwise(v, quant.linear_map(), block_size)
        v_scales = [absmax]
    return [m_codes, m_absmax, v_codes, v_scales]


def clone_state(state):
    return [[t.clone() for t in x] if isinstance(x, list) else x.clone() for x in state]


@interpreted
@pytest.mark.parametrize(
    "shape, rank1",
    [((301,), False), ((5, 123), True), ((5, 123), False), ((64, 130), True), ((3, 1, 77), True), ((257,), False)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_kernel_matches_torch_twin(shape, rank1, dtype):
    block_size = 64 if shape == (257,) else 128
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(shape, generator=gen).to(dtype)
    state = random_state(shape, rank1, block_size, seed=1)
    param_k, state_k = param.clone(), clone_state(state)
    for step in (1, 2, 3):
        grad = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
        scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
        fused.adamw4bit_step_torch(param, grad, *state, scalars, block_size, rank1)
        fused.adamw4bit_step_triton(param_k, grad, *state_k, scalars, block_size, rank1)
        for a, b in zip(state[:3] + state[3], state_k[:3] + state_k[3], strict=True):
            assert torch.equal(a, b)  # codes, block absmax and rank-1 statistics identical
        torch.testing.assert_close(param_k, param, rtol=0, atol=0)


@interpreted
@pytest.mark.parametrize("shape", [(5, 123), (17, 129), (33, 300), (2, 1000)])  # tiles cut in both directions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_rank1_statistics_pass_equals_its_twin(shape, dtype):
    """The first pass of a rank-1 step: the new v's row and column maxima from g and the old codes, bit for bit the
    twin's (max is exact), and the largest |g|; a zero row of v and g stays 0."""
    _, _, v_codes, v_scales = random_state(shape, True, 128, seed=2)
    grad = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    grad[1] = 0.0
    v_scales[0][1] = 0.0
    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, 4)
    want = fused.rank1_next_statistics(grad, v_codes, v_scales, scalars)
    got, grad_max = fused.rank1_next_statistics_triton(grad, v_codes, v_scales, scalars)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[0][1] == 0 and (got[0] > 0).sum() == shape[0] - 1
    assert grad_max.shape == () and grad_max == grad.float().abs().max()


@interpreted
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_interpreted_rank1_statistics_pass_sees_a_nonfinite_gradient(bad):
    """One NaN or inf anywhere in g (here in the last tile) makes the pass's largest |g| non-finite: the optimizer's
    finiteness check of a rank-1 tensor rests on it."""
    shape = (33, 300)
    _, _, v_codes, v_scales = random_state(shape, True, 128, seed=2)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.1
    grad[32, 299] = bad
    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, 4)
    assert not fused.rank1_next_statistics_triton(grad, v_codes, v_scales, scalars)[1].isfinite()


@interpreted
def test_interpreted_optimizer_through_the_kernel_equals_the_twin(monkeypatch):
    """The optimizer's dispatch: force the Triton branch on CPU tensors and compare whole runs with the twin's (rank-1,
    block-wise and fp32-state tensors)."""
    shapes = [(40, 130), (5000,), (2, 30, 90), (300,), (12, 20)]
    monkeypatch.setenv("HF_EXT_DISABLE_CPU_KERNELS", "1")
    runs = []
    for force in (False, True):
        monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel, force=force: force)
        runs.append(optimizer_run(AdamW4bit, shapes))
    assert_runs_equal(*runs)


@interpreted
def test_interpreted_optimizer_skips_a_nonfinite_rank1_tensor_found_by_the_statistics_pass(monkeypatch):
    """Through the Triton branch, a rank-1 tensor with state is checked by the statistics pass's largest |g|: an inf
    in its gradient leaves it and its state as they were, and the other tensor (same launch) steps as the twin's."""
    monkeypatch.setenv("HF_EXT_DISABLE_CPU_KERNELS", "1")
    read, real = [], adamw4bit._largest_magnitudes
    monkeypatch.setattr(adamw4bit, "_largest_magnitudes", lambda grads: read.append(len(grads)) or real(grads))
    runs = []
    for force in (True, False):
        monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel, force=force: force)
        (a, b), opt = optimizer_run(AdamW4bit, [(40, 130), (33, 129)], steps=2, nonfinite_grads="skip")
        a_before, state_before = a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}
        gen = torch.Generator().manual_seed(7)
        a.grad, b.grad = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        a.grad[39, 129] = float("inf")
        b_version = b._version
        opt.step()
        assert read[-3:] == [0 if force else 2] * 3  # with the kernel, no separate read: the first step's neither
        assert b._version > b_version  # the kernel's in-place write is seen, as a torch op's would be
        assert torch.equal(a, a_before) and all(torch.equal(v, opt.state[a][k]) for k, v in state_before.items())
        runs.append(([a, b], opt))
    assert_runs_equal(*runs)


@interpreted
def test_interpreted_factor_optimizer_checks_gradients_in_its_statistics_pass(monkeypatch):
    """Through the Triton branch, AdamW4bitFactor checks a factored tensor through the largest |g| of its statistics
    pass (no separate read): an inf leaves that tensor and its state as they were, the other one steps."""
    monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel: True)
    assert_factor_checks_gradients_in_its_statistics_pass(monkeypatch)


def assert_factor_checks_gradients_in_its_statistics_pass(monkeypatch) -> None:
    """Two factored tensors, 2 steps, then an inf in the first one's gradient: no step reads a gradient apart from
    the statistics pass, the first tensor and its state stay as they were, the second steps."""
    from hf_ext.optim import AdamW4bitFactor

    read, real = [], adamw4bit._largest_magnitudes
    monkeypatch.setattr(adamw4bit, "_largest_magnitudes", lambda grads: read.append(len(grads)) or real(grads))
    (a, b), opt = optimizer_run(AdamW4bitFactor, [(40, 130), (2, 30, 90)], steps=2, nonfinite_grads="skip")
    a_before, b_before = a.detach().clone(), b.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[a].items()}
    a.grad, b.grad = torch.randn(a.shape), torch.randn(b.shape)
    a.grad[7, 3] = float("inf")
    opt.step()
    assert read == [0, 0, 0]  # every step, the first too: a factored state needs no history for the pass
    assert torch.equal(a, a_before) and all(torch.equal(v, opt.state[a][k]) for k, v in state_before.items())
    assert not torch.equal(b, b_before)


@interpreted
@pytest.mark.parametrize("shape", [(37, 129), (2, 30, 90)])  # blocks that cut rows; (R, C) slices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_factored_step_equals_its_twin(shape, dtype, monkeypatch):
    """``adamw4bit_step_factored`` (AdamW4bitFactor's step) through the Triton kernel, v formed in registers from the
    row ratios and columns: parameter, m codes and scales bit for bit the twin's (``adamw4bit_step_given_v`` with
    ``factored_v``)."""
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(shape, generator=gen).to(dtype)
    m = torch.randn(shape, generator=gen) * 1e-2
    m_codes, m_absmax = quant.quantize_blockwise(m, quant.dynamic_exponent_map(), 64)
    grad = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    ratio, col = torch.rand(shape[:-1], generator=gen) * 2, torch.rand(shape[:-2] + shape[-1:], generator=gen) * 1e-3
    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, 2)
    runs = []
    for force in (True, False):
        monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel, force=force: force)
        monkeypatch.setenv("HF_EXT_DISABLE_CPU_KERNELS", "1")
        state = (param.clone(), m_codes.clone(), m_absmax.clone())
        fused.adamw4bit_step_factored(state[0], grad, state[1], state[2], ratio, col, scalars, 64)
        runs.append(state)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True)) and not torch.equal(runs[0][0], param)


@interpreted
@pytest.mark.parametrize("shape", [(37, 129), (2, 30, 90), (1, 300), (130, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_squared_means_match_fp64(shape, dtype, monkeypatch):
    """The Triton pass behind AdamW4bitFactor's statistics: means of g^2 over the last and second-to-last dimension,
    within fp32 rounding of fp64 (another summation order than the twin's, so not its bits), and the largest |g|,
    which a NaN or inf in the last element makes non-finite."""
    monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel: True)
    grad = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    rows, cols, grad_max = fused.squared_means(grad)
    squared = grad.double() ** 2
    torch.testing.assert_close(rows.double(), squared.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(cols.double(), squared.mean(-2), rtol=1e-6, atol=0)
    assert grad_max == grad.float().abs().max()
    for bad in (float("nan"), -float("inf")):
        grad.view(-1)[-1] = bad
        assert not fused.squared_means(grad)[2].isfinite()


@interpreted
def test_interpreted_factor_optimizer_through_the_kernels_matches_the_twin(monkeypatch):
    """AdamW4bitFactor through the Triton kernels (statistics pass, v in registers) against the twin: m codes and
    scales identical (m does not depend on v), statistics and parameters within fp32 rounding of the means."""
    from hf_ext.optim import AdamW4bitFactor

    monkeypatch.setenv("HF_EXT_DISABLE_CPU_KERNELS", "1")
    runs = []
    for force in (False, True):
        monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel, force=force: force)
        runs.append(optimizer_run(AdamW4bitFactor, [(40, 130), (5000,), (2, 30, 90)]))
    assert_factor_runs_match(*runs, rtol=1e-6, atol=1e-7)  # a last-ulp flip; a wrong v moves p by ~lr


def assert_factor_runs_match(run_a, run_b, rtol: float, atol: float) -> None:
    """Two AdamW4bitFactor runs whose means of g^2 were summed in different orders: parameters within (rtol, atol),
    the factored statistics within rtol, every other state entry (m codes and scales, fp32 states) identical."""
    (params_a, opt_a), (params_b, opt_b) = run_a, run_b
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for key, value in opt_a.state[a].items():
            if key in ("exp_avg_sq_row", "exp_avg_sq_col"):
                torch.testing.assert_close(value, opt_b.state[b][key], rtol=rtol, atol=0)
            else:
                assert torch.equal(value, opt_b.state[b][key]), key


def optimizer_run(optimizer, shapes, dtype=torch.float32, steps=3, **kwargs):
    """(params, optimizer) after ``steps`` steps on seeded random parameters of ``shapes`` and gradients."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    opt = optimizer(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params, opt


def assert_runs_equal(run_a, run_b) -> None:
    """The two runs' parameters and every state entry are identical."""
    (params_a, opt_a), (params_b, opt_b) = run_a, run_b
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(opt_a.state[a][k], opt_b.state[b][k]) for k in opt_a.state[a])


class CountingLaunches:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@interpreted
@pytest.mark.parametrize("rank1", [True, False])
def test_interpreted_many_tensors_in_two_launches_equal_the_twin(rank1, monkeypatch):
    """Six tensors, four per launch: two launches of each kernel, every tensor's result the twin's, every job's
    ``reduce_stats`` called once with its own statistics, in job order; an empty shard's statistics are zeros."""
    monkeypatch.setattr(fused, "MAX_TENSORS_PER_LAUNCH", 4)
    monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel: True)
    step_kernel = CountingLaunches(fused._adamw4bit_kernel)
    stats_kernel = CountingLaunches(fused._rank1_stats_kernel)
    monkeypatch.setattr(fused, "_adamw4bit_kernel", step_kernel)
    monkeypatch.setattr(fused, "_rank1_stats_kernel", stats_kernel)
    shapes = [(5, 123), (64, 130), (0, 40), (17, 300), (3, 7), (33, 129)] if rank1 else [(301,), (257,), (0,)] * 2
    gen = torch.Generator().manual_seed(0)
    twins, jobs, seen = [], [], []
    for index, shape in enumerate(shapes):
        param = torch.randn(shape, generator=gen).to(torch.bfloat16)
        grad = torch.randn(shape, generator=gen) * 0.1
        state = random_state(shape, rank1, 128, seed=index) if param.numel() else empty_state(shape, rank1)
        scalars = fused.StepScalars.from_group(1e-3 * (index + 1), 0.9, 0.999, 1e-8, 1e-2, index + 1)
        twins.append((param.clone(), grad, clone_state(state), scalars))
        reduce = (lambda stats, index=index: seen.append((index, [s.clone() for s in stats]))) if rank1 else None
        jobs.append(fused.StepJob(param, grad, *state[:3], state[3], scalars, reduce))
    fused.adamw4bit_steps(jobs, 128, rank1)
    assert step_kernel.launches == 2 and stats_kernel.launches == (2 if rank1 else 0)
    for index, (job, (param, grad, state, scalars)) in enumerate(zip(jobs, twins, strict=True)):
        expected = fused.rank1_next_statistics(grad, state[2], state[3], scalars) if rank1 and param.numel() else None
        if param.numel():
            fused.adamw4bit_step_torch(param, grad, *state, scalars, 128, rank1)
        assert torch.equal(job.param, param)
        for a, b in zip([job.m_codes, job.m_absmax, job.v_codes, *job.v_scales], state[:3] + state[3], strict=True):
            assert torch.equal(a, b if param.numel() else torch.zeros_like(a))
        if expected is not None:
            assert all(torch.equal(a, b) for a, b in zip(seen[index][1], expected, strict=True))
    assert [index for index, _ in seen] == (list(range(len(shapes))) if rank1 else [])


@interpreted
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_fp32", [True, False])
def test_interpreted_fp32_state_kernel_equals_the_twin(p_dtype, grad_fp32, monkeypatch):
    """The fp32-state kernel (tensors too small to quantize): seven tensors, four per launch, so two launches (an
    empty one, sizes that cut a program's block, a non-contiguous one that the twin steps); for 3 steps parameters
    and fp32 m, v bit for bit the twin's multi-tensor ops, with different step scalars per tensor."""
    monkeypatch.setattr(fused, "MAX_TENSORS_PER_LAUNCH", 4)
    monkeypatch.setattr(fused, "use_triton", lambda tensor, kernel: True)
    kernel = CountingLaunches(fused._adamw_fp32_kernel)
    monkeypatch.setattr(fused, "_adamw_fp32_kernel", kernel)
    assert_fp32_state_steps_equal_the_twin(
        [(1,), (1023,), (0,), (1025,), (64, 33), (4096,), (3, 5)], p_dtype, grad_fp32
    )
    assert kernel.launches == 2 * 3


def assert_fp32_state_steps_equal_the_twin(shapes, p_dtype, grad_fp32: bool) -> None:
    """3 steps of ``adamw_fp32_steps`` on parameters of ``shapes`` (the last one made non-contiguous) against the
    twin's ``adamw_fp32_steps_torch``, per-tensor scalars: parameters, m and v bit for bit equal, and every non-empty
    parameter moved."""
    gen = torch.Generator().manual_seed(0)
    sides = []
    for _ in range(2):
        params = [(torch.randn(shape, generator=gen)).to(p_dtype) for shape in shapes]
        params[-1] = params[-1].t()  # non-contiguous
        sides.append([params, [torch.zeros(p.shape) for p in params], [torch.zeros(p.shape) for p in params]])
    for a, b in zip(sides[0][0], sides[1][0], strict=True):
        b.copy_(a)
    initial = [p.clone() for p in sides[0][0]]
    for step in (1, 2, 3):
        grads = [torch.randn(p.shape, generator=gen) * 10.0 ** -(i % 3) for i, p in enumerate(sides[0][0])]
        grads = [g if grad_fp32 else g.to(p_dtype) for g in grads]
        scalars = [
            fused.StepScalars.from_group(0.05 * (i + 1), 0.9, 0.999, 1e-8, 1e-2, step) for i in range(len(grads))
        ]
        fused.adamw_fp32_steps(sides[0][0], grads, sides[0][1], sides[0][2], scalars)
        fused.adamw_fp32_steps_torch(sides[1][0], grads, sides[1][1], sides[1][2], scalars)
        for a, b in zip(sum(sides[0], []), sum(sides[1], []), strict=True):
            assert torch.equal(a, b)
    assert all(not torch.equal(p, p0) for p, p0 in zip(sides[0][0], initial, strict=True) if p.numel())


def empty_state(shape, rank1: bool):
    """The state of a shard with no rows: empty codes and block scales, a zero-length row statistic."""
    empty_u8, empty_f32 = torch.zeros(0, dtype=torch.uint8), torch.zeros(0)
    v_scales = [torch.zeros(0), torch.ones(shape[1])] if rank1 else [empty_f32.clone()]
    return [empty_u8, empty_f32, empty_u8.clone(), v_scales]


@interpreted
@pytest.mark.parametrize("shape, rank1", [((37, 300), True), ((5001,), False)])
def test_interpreted_overflowing_v_takes_the_twins_codes(shape, rank1):
    """Finite gradients so large that v overflows to inf: the block's inf/inf is NaN, code 15 as in
    torch.searchsorted (a ``>`` count would give 0)."""
    state = random_state(shape, rank1, 128, seed=6)
    state_k = clone_state(state)
    gen = torch.Generator().manual_seed(7)
    param, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 1e25
    param_k = param.clone()
    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    fused.adamw4bit_step_torch(param, grad, *state, scalars, 128, rank1)
    fused.adamw4bit_step_triton(param_k, grad, *state_k, scalars, 128, rank1)
    assert torch.equal(state_k[2], state[2]) and torch.equal(state_k[0], state[0])
