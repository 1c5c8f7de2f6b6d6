"""The 4-bit AdamW step's C kernel (hf_ext/kernels/adamw4bit_step.c) against its torch twin, and its build.

Both sides round every fp32 op once (no FMA, correctly rounded sqrt and division), so parameters, codes, block
scales and rank-1 statistics are expected to be identical: the tolerance is 0. Work is split across threads by
ranges of blocks and rows; the small ``CPU_CHUNK_ELEMENTS`` of ``many_chunks`` makes every tensor here span several.
"""

import subprocess
import sys
import warnings

import pytest
import torch
from test_kernel_adamw4bit import (
    assert_factor_checks_gradients_in_its_statistics_pass,
    assert_factor_runs_match,
    assert_fp32_state_steps_equal_the_twin,
    assert_runs_equal,
    clone_state,
    optimizer_run,
    random_state,
)

from hf_ext.kernels import adamw4bit_step as fused
from hf_ext.kernels import cpu_library, dispatch
from hf_ext.kernels import quant4 as quant
from hf_ext.optim import AdamW4bit, AdamW4bitFactor


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def many_chunks(monkeypatch):
    monkeypatch.setattr(fused, "CPU_CHUNK_ELEMENTS", 256)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(previous)


def test_the_c_kernel_builds_here():
    """CI machines have a C compiler: the fast path must be the one the other tests exercise."""
    assert dispatch.cpu_kernel(torch.empty(1), "adamw4bit_step") is not None, cpu_library.load_error("adamw4bit_step")


@pytest.mark.parametrize(
    "shape, rank1, block_size",
    [
        ((301,), False, 128),  # odd count: a pad nibble
        ((257,), False, 64),
        ((5, 123), True, 128),
        ((5, 123), False, 128),
        ((64, 130), True, 128),
        ((97, 301), True, 32),  # blocks that cut rows, odd element count
        ((40, 257), False, 2),  # the smallest block
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_fp32", [False, True])
def test_c_kernel_equals_torch_twin(shape, rank1, block_size, dtype, grad_fp32, many_chunks):
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(shape, generator=gen).to(dtype)
    state = random_state(shape, rank1, block_size, seed=1)
    param_c, state_c = param.clone(), clone_state(state)
    for step in (1, 2, 3):
        grad = (torch.randn(shape, generator=gen) * 0.1).to(torch.float32 if grad_fp32 else dtype)
        scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
        fused.adamw4bit_step_torch(param, grad, *state, scalars, block_size, rank1)
        fused.adamw4bit_step_cpu(param_c, grad, *state_c, scalars, block_size, rank1)
        for a, b in zip(state[:3] + state[3], state_c[:3] + state_c[3], strict=True):
            assert torch.equal(a, b)  # codes, block absmax and rank-1 statistics identical
        assert torch.equal(param_c, param)


def test_c_kernel_sees_zero_rows_and_a_single_row_shard(many_chunks):
    """Rank-1 statistics of one row (a shard's shape) and a gradient with zero rows: zero scales divide as 1."""
    shape = (1, 700)
    gen = torch.Generator().manual_seed(2)
    v = torch.rand(shape, generator=gen) * 1e-4
    lin = quant.linear_map()
    m_codes, m_absmax = quant.quantize_blockwise(torch.zeros(shape), quant.dynamic_exponent_map(), 128)
    v_codes, stats = quant.quantize_rank1(v, lin, shape=shape)
    state = [m_codes, m_absmax, v_codes, stats]
    param = torch.randn(shape, generator=gen)
    param_c, state_c = param.clone(), clone_state(state)
    grad = torch.randn(shape, generator=gen)
    grad[:, :300] = 0.0
    scalars = fused.StepScalars.from_group(1e-2, 0.9, 0.999, 1e-8, 0.0, 1)
    fused.adamw4bit_step_torch(param, grad, *state, scalars, 128, True)
    fused.adamw4bit_step_cpu(param_c, grad, *state_c, scalars, 128, True)
    assert torch.equal(param_c, param)
    for a, b in zip(state[:3] + state[3], state_c[:3] + state_c[3], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_c_statistics_pass_equals_the_twin_and_sees_a_nonfinite_gradient(dtype, bad, many_chunks):
    """The rank-1 first pass in C over several ranges of rows: the twin's statistics bit for bit and the largest |g|,
    which is not finite when one g (here in the last range) is NaN or inf."""
    shape = (37, 129)
    _, _, v_codes, v_scales = random_state(shape, True, 128, seed=2)
    grad = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    if bad is not None:
        grad[36, 5] = bad
    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, 4)
    stats, grad_max = fused.rank1_next_statistics_cpu(grad, v_codes, v_scales, scalars)
    assert grad_max.shape == ()
    if bad is None:
        want = fused.rank1_next_statistics(grad, v_codes, v_scales, scalars)
        assert all(torch.equal(a, b) for a, b in zip(stats, want, strict=True))
        assert grad_max == grad.float().abs().max()
    else:
        assert not grad_max.isfinite()


@pytest.mark.parametrize("shape", [(70, 70), (5000,)])
def test_c_kernel_bumps_the_version_of_what_it_writes(shape):
    """As an in-place torch op would: code that caches on ``tensor._version`` sees the parameter and state change."""
    param = torch.randn(shape, requires_grad=True)
    opt = AdamW4bit([param])
    param.grad = torch.randn(shape)
    opt.step()
    versions = [param._version] + [v._version for v in opt.state[param].values()]
    opt.step()
    assert all(t._version > v for t, v in zip([param, *opt.state[param].values()], versions, strict=True))


def test_c_kernel_hands_the_new_statistics_to_reduce_before_choosing_codes():
    """A sharded parameter's statistics are changed by ``reduce`` (a MAX across ranks) before any v code."""
    shape = (33, 300)
    state = random_state(shape, True, 128, seed=3)
    state_c = clone_state(state)
    gen = torch.Generator().manual_seed(4)
    param, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 0.1
    param_c = param.clone()
    seen = []

    def reduce(stats):  # as another rank's larger maxima would
        seen.append([s.clone() for s in stats])
        stats[1].mul_(2.0)

    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    expected = fused.rank1_next_statistics(grad, state[2], state[3], scalars)
    fused.adamw4bit_step_torch(param, grad, *state, scalars, 128, True, reduce)
    fused.adamw4bit_step_cpu(param_c, grad, *state_c, scalars, 128, True, reduce)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen[1], expected, strict=True))
    assert torch.equal(state_c[3][1], expected[1] * 2.0)
    assert torch.equal(state_c[2], state[2]) and torch.equal(param_c, param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 129), (3, 20, 70)])  # blocks that cut rows; a stack of (R, C) slices
def test_c_factored_step_equals_quantized_m_then_stepped_param(dtype, shape, many_chunks):
    """``adamw4bit_step_factored`` in the C kernel (v = ratio_i col_j formed per element) against the twin's
    ``step_quantized_m`` and ``stepped_param`` with ``factored_v``: parameter, m codes and scales bit for bit."""
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(shape, generator=gen).to(dtype)
    m_codes, m_absmax = quant.quantize_blockwise(
        torch.randn(shape, generator=gen) * 1e-2, quant.dynamic_exponent_map(), 64
    )
    grad = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    ratio, col = torch.rand(shape[:-1], generator=gen) + 0.5, torch.rand(*shape[:-2], shape[-1], generator=gen) * 1e-3
    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, 2)
    param_c, m_codes_c, m_absmax_c = param.clone(), m_codes.clone(), m_absmax.clone()
    fused.adamw4bit_step_factored(param_c, grad, m_codes_c, m_absmax_c, ratio, col, scalars, 64)
    m = fused.step_quantized_m(m_codes, m_absmax, grad.float(), scalars, 64)
    v = fused.factored_v(ratio, col)
    param.copy_(fused.stepped_param([param.float()], [m.view(shape)], [v], [scalars])[0])
    assert torch.equal(param_c, param) and torch.equal(m_codes_c, m_codes) and torch.equal(m_absmax_c, m_absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 129), (3, 20, 70), (1, 5000), (300, 1)])
def test_c_squared_means_are_the_fp64_means_rounded_once_for_any_thread_count(dtype, shape, monkeypatch):
    """The C statistics pass: the means of g^2 over the last and second-to-last dimension equal the fp64 means
    rounded to fp32 (fp64 sums of exact squares), the same bits on 1 and 3 threads (groups of 4 rows, split into
    ranges differently); the largest |g| exact, NaN when a g is NaN, inf for an inf."""
    monkeypatch.setattr(fused, "SUM_GROUP_ROWS", 4)
    monkeypatch.setattr(fused, "CPU_CHUNK_ELEMENTS", 64)
    grad = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    squared = grad.double() ** 2
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append(fused.squared_means(grad))
    finally:
        torch.set_num_threads(previous)
    for (rows, cols, grad_max), threads in zip(runs, (1, 3), strict=True):
        torch.testing.assert_close(rows, squared.mean(-1).float(), rtol=2.0**-23, atol=0, msg=f"{threads} threads")
        torch.testing.assert_close(cols, squared.mean(-2).float(), rtol=2.0**-23, atol=0, msg=f"{threads} threads")
        assert grad_max.item() == grad.float().abs().max().item()
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    for bad, finite in ((float("nan"), "nan"), (float("-inf"), "inf")):
        grad.view(-1)[-1] = bad
        assert str(fused.squared_means(grad)[2].item()) == finite


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_fp32", [False, True])
def test_c_fp32_state_step_equals_the_twin(dtype, grad_fp32, monkeypatch):
    """The tensors with fp32 m and v: one C call for all contiguous ones per step (an empty one skipped, a
    non-contiguous one left to the twin); for 3 steps with per-tensor scalars, parameters, m and v bit for bit the
    twin's multi-tensor ops."""
    calls, real = [], fused._adamw_fp32_steps_cpu
    monkeypatch.setattr(
        fused, "_adamw_fp32_steps_cpu", lambda *columns: calls.append(len(columns[0])) or real(*columns)
    )
    shapes = [(1,), (255,), (0,), (257,), (4096,), (30, 40), (3, 5)]
    assert_fp32_state_steps_equal_the_twin(shapes, dtype, grad_fp32)
    assert calls == [5, 5, 5]


def test_optimizer_through_the_c_kernel_equals_the_twin(monkeypatch):
    """Whole runs, every layout (rank-1, block-wise, 3-d rank-1 on the twin, fp32), C kernel vs twins only."""
    shapes = [(40, 130), (5000,), (2, 30, 90), (8, 8), (300, 7)]
    runs = []
    for disabled in ("1", "0"):
        monkeypatch.setenv("HF_EXT_DISABLE_CPU_KERNELS", disabled)
        runs.append(optimizer_run(AdamW4bit, shapes, torch.bfloat16, lr=1e-2, weight_decay=0.1))
    assert_runs_equal(*runs)


def test_factor_optimizer_through_the_c_kernel_matches_the_twin(monkeypatch):
    """AdamW4bitFactor with the C kernel against the twin: m codes and scales and the fp32-state tensors identical
    (m does not depend on v), the factored statistics and the parameters within fp32 rounding of the means (the C
    pass sums in fp64, the twin in fp32)."""
    shapes = [(40, 130), (5000,), (2, 30, 90), (8, 8), (300, 7)]
    runs = []
    for disabled in ("1", "0"):
        monkeypatch.setenv("HF_EXT_DISABLE_CPU_KERNELS", disabled)
        runs.append(optimizer_run(AdamW4bitFactor, shapes, torch.float32, lr=1e-2, weight_decay=0.1))
    assert_factor_runs_match(*runs, rtol=1e-5, atol=1e-6)  # a wrong v moves p by about lr = 1e-2


def test_factor_optimizer_checks_gradients_in_its_c_statistics_pass(monkeypatch):
    """On the CPU too, a factored tensor's gradient is checked through the largest |g| of its statistics pass (no
    separate read), from the first step: an inf leaves that tensor and its state as they were, the other steps."""
    assert_factor_checks_gradients_in_its_statistics_pass(monkeypatch)


def test_chunks_cover_the_range_once():
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert cpu_library.chunks(10, 3) == [(0, 3), (3, 6), (6, 10)]
        assert cpu_library.chunks(1000, 1) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
        assert cpu_library.chunks(5, 100) == [(0, 5)]
    finally:
        torch.set_num_threads(torch_threads)


def test_library_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path))
    cpu_library.load.cache_clear()
    try:
        assert cpu_library.load("adamw4bit_step") is not None
        built = list((tmp_path / "kernels").glob("adamw4bit_step-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_library.load.cache_clear()
        assert cpu_library.load("adamw4bit_step") is not None
        assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*.so")] == [stamp]  # reused, not rebuilt
    finally:
        cpu_library.load.cache_clear()


def test_without_a_compiler_the_twin_runs_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-hf-ext")
    cpu_library.load.cache_clear()
    dispatch._warn_twin_runs.cache_clear()
    try:
        shape = (5, 123)
        state = random_state(shape, True, 128, seed=1)
        state_twin = clone_state(state)
        param = torch.randn(shape)
        param_twin, grad = param.clone(), torch.randn(shape) * 0.1
        scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
        with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-compiler-hf-ext'.*HF_EXT_DISABLE_CPU_KERNELS"):
            fused.adamw4bit_step(param, grad, *state, scalars, 128, True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused.adamw4bit_step(param, grad, *clone_state(state), scalars, 128, True)  # said once
        fused.adamw4bit_step_torch(param_twin, grad, *state_twin, scalars, 128, True)
        assert torch.equal(state[2], state_twin[2])
        with pytest.raises(ValueError, match="needs a built C kernel"):
            fused.adamw4bit_step_cpu(param, grad, *state, scalars, 128, True)
    finally:
        cpu_library.load.cache_clear()
        dispatch._warn_twin_runs.cache_clear()


def test_a_failing_build_says_what_the_compiler_said(tmp_path, monkeypatch):
    compiler = tmp_path / "cc"
    compiler.write_text(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho 'boom: bad flag' >&2\nexit 1\n"
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    cpu_library.load.cache_clear()
    try:
        assert cpu_library.load("adamw4bit_step") is None
        assert "failed to build adamw4bit_step.c: boom: bad flag" in cpu_library.load_error("adamw4bit_step")
    finally:
        cpu_library.load.cache_clear()


FIRST_CALL = """
import torch
from hf_ext.kernels import adamw4bit_step as fused
torch.manual_seed(1)
torch.set_num_threads(2)
n, block_size = 300_001, 128
param, grad = torch.randn(n), torch.randn(n) * 0.1
blocks = -(-n // block_size)
state = [torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8), torch.rand(blocks),
         torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8), [torch.rand(blocks)]]
twin_state = [state[0].clone(), state[1].clone(), state[2].clone(), [state[3][0].clone()]]
scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
twin = param.clone()
fused.adamw4bit_step_cpu(param, grad, *state, scalars, block_size, False)  # the process's first call, 2 threads
fused.adamw4bit_step_torch(twin, grad, *twin_state, scalars, block_size, False)
same = torch.equal(param, twin) and all(torch.equal(a, b) for a, b in zip(state[:3], twin_state[:3]))
print("identical" if same and torch.equal(state[3][0], twin_state[3][0]) else "DIFFER")
"""


def test_the_first_threaded_call_of_a_process_equals_the_twin():
    """Every thread gets the codebooks' addresses from the caller, which holds them: on a cold cache, building them
    in each thread once left one thread reading a freed tensor (results differed run to run)."""
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, timeout=300)
        assert done.stdout.strip() == "identical", done.stdout + done.stderr[-2000:]


FORK = """
import os, signal, threading
from hf_ext.kernels import cpu_library
both = threading.Barrier(2)
cpu_library.run_chunks(lambda *_: both.wait(timeout=20), [(0, 1), (1, 2)])  # the parent's pool has 2 threads now
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a child that inherited the parent's pool would wait forever for its threads
    seen = []
    cpu_library.run_chunks(lambda index, begin, end: seen.append(index), [(0, 1), (1, 2)])
    os._exit(0 if sorted(seen) == [0, 1] else 1)
_, status = os.waitpid(pid, 0)
print("child ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else f"child status {status}")
"""


def test_a_forked_child_gets_a_thread_pool_of_its_own():
    done = subprocess.run([sys.executable, "-c", FORK], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "child ok", done.stdout + done.stderr[-2000:]


def test_a_large_block_and_overflowing_moments_equal_the_twin():
    """A block of 2^20 elements (scratch on the heap, not the stack) and gradients so large that v overflows to inf:
    the 0/0 of the overflowed block is NaN, which takes code 15 in the C kernel as in torch.searchsorted."""
    for block_size, shape, scale in ((1 << 20, ((1 << 20) + 3,), 0.1), (128, (37, 300), 1e25), (128, (5001,), 1e25)):
        rank1 = len(shape) == 2
        state = random_state(shape, rank1, block_size, seed=6)
        state_c = clone_state(state)
        gen = torch.Generator().manual_seed(7)
        param, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * scale
        param_c = param.clone()
        scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
        fused.adamw4bit_step_torch(param, grad, *state, scalars, block_size, rank1)
        fused.adamw4bit_step_cpu(param_c, grad, *state_c, scalars, block_size, rank1)
        for a, b in zip(state[:3] + state[3], state_c[:3] + state_c[3], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(param_c.isnan(), param.isnan())
        assert torch.equal(param_c.nan_to_num(), param.nan_to_num())


def test_an_odd_block_size_is_refused():
    state = random_state((300,), False, 128, seed=1)
    with pytest.raises(ValueError, match="even block_size >= 2, got 3"):
        fused.adamw4bit_step_cpu(torch.randn(300), torch.randn(300), *state, fused.StepScalars.from_group(
            1e-3, 0.9, 0.999, 1e-8, 0.0, 1), 3, False)  # fmt: skip
