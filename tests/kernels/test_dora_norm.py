"""DoRA factored row norm (hf_ext.kernels.dora_norm) vs a float64 dense reference, PEFT's DoRA weight norm, and
its kernel.

Tolerances: fp32 inputs 2e-5 relative to the float64 ``||W + s B A||_row``; bf16 inputs: 1e-5 relative to the
float64 norm of the same bf16 values (accumulation is fp32, so rounding the inputs is the only loss) and 5e-3
relative to the unrounded fp32 values. The kernel vs the twin runs under
TRITON_INTERPRET=1 in a subprocess (see test_kernel_adamw4bit.py for why) at 1e-6 relative: the two sum in a
different order, so they agree to fp32 rounding, not bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_interpreter import interpreted

from hf_ext.kernels import dora_norm


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from peak_memory import FRESH_PROCESS_ENV  # noqa: E402


def factors(d_out, d_in, rank, seed=0, dtype=torch.float32):
    """W ~ N(0, 1/d_in), A ~ N(0, 1/d_in), B ~ N(0, 0.3^2): LoRA terms comparable to W, so cancellation is real."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    lora_A = torch.randn(rank, d_in, generator=gen) / d_in**0.5
    lora_B = torch.randn(d_out, rank, generator=gen) * 0.3
    return weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)


def dense_reference(weight, lora_A, lora_B, scaling):
    w, a, b = weight.double(), lora_A.double(), lora_B.double()
    return torch.linalg.norm(w + scaling * b @ a, dim=1)


def max_rel_err(got, ref):
    return ((got.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()


CASES = [((128, 256), 1), ((128, 256), 8), ((128, 256), 64), ((33, 17), 1), ((33, 17), 8), ((257, 64), 8)]
CASES += [((257, 64), 64), ((400, 512), 384)]


@pytest.mark.parametrize("shape, rank", CASES)
@pytest.mark.parametrize("scaling", [0.0, 0.1, 2.0])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_factored_norm_matches_float64_dense_fp32(shape, rank, scaling, fan_in_fan_out):
    weight, lora_A, lora_B = factors(*shape, rank)
    ref = dense_reference(weight, lora_A, lora_B, scaling)
    stored = weight.t().contiguous() if fan_in_fan_out else weight
    got = dora_norm.factored_row_norm(stored, lora_A, lora_B, scaling, fan_in_fan_out=fan_in_fan_out)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    assert max_rel_err(got, ref) < 2e-5


@pytest.mark.parametrize("shape, rank", [((128, 256), 8), ((257, 64), 64), ((400, 512), 384)])
def test_bf16_inputs_accumulate_in_fp32(shape, rank):
    weight, lora_A, lora_B = factors(*shape, rank)
    bf16 = [t.bfloat16() for t in (weight, lora_A, lora_B)]
    got = dora_norm.factored_row_norm(*bf16, 2.0)
    assert got.dtype == torch.float32
    assert max_rel_err(got, dense_reference(*bf16, 2.0)) < 1e-5  # same bf16 values: only fp32 rounding
    assert max_rel_err(got, dense_reference(weight, lora_A, lora_B, 2.0)) < 5e-3  # vs unrounded inputs


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_precomputed_weight_sq_equals_default(fan_in_fan_out):
    weight, lora_A, lora_B = factors(96, 80, 8)
    stored = weight.t().contiguous() if fan_in_fan_out else weight
    weight_sq = dora_norm.weight_sq_norms(stored, fan_in_fan_out=fan_in_fan_out)
    assert weight_sq.dtype == torch.float32
    torch.testing.assert_close(weight_sq.double(), weight.double().pow(2).sum(1), rtol=1e-6, atol=0)
    for scaling in (0.0, 0.5):
        default = dora_norm.factored_row_norm(stored, lora_A, lora_B, scaling, fan_in_fan_out)
        cached = dora_norm.factored_row_norm(stored, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq=weight_sq)
        assert torch.equal(default, cached)


def test_tiny_chunk_budget_gives_the_same_norm():
    weight, lora_A, lora_B = factors(257, 64, 16)
    assert dora_norm.rows_per_chunk(257, 64, 16, 1) == 1  # a budget below the fixed part still makes progress
    whole = dora_norm.factored_row_norm(weight, lora_A, lora_B, 1.5)
    # fp32 W, A and B are used in place: G and the output are fixed, U and B G rows per row; 20 rows: 13 chunks
    budget = (16 * 16 + 257) * 4 + 20 * (2 * 16) * 4
    assert dora_norm.rows_per_chunk(257, 64, 16, budget, weight_row_bytes=0, upcast_factors=False) == 20
    for chunk_bytes in (1, budget):
        chunked = dora_norm.factored_row_norm(weight, lora_A, lora_B, 1.5, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    # a bf16 W pays for its upcast rows: the same budget plus 20 fp32 W rows gives 20 rows again
    bf16_budget = budget + 20 * 64 * 4
    assert dora_norm.rows_per_chunk(257, 64, 16, bf16_budget, weight_row_bytes=64 * 4, upcast_factors=False) == 20
    # a fixed part above the budget (bf16 A, r = 384, d = 4096: 6.6 MB) leaves the rows half of it, not 1 row
    assert dora_norm.rows_per_chunk(4096, 4096, 384, 4 * 2**20, weight_row_bytes=4096 * 4) == 2**21 // (
        (3 * 384 + 4096) * 4
    )
    w16 = weight.bfloat16()
    whole16 = dora_norm.factored_row_norm(w16, lora_A, lora_B, 1.5)
    chunked16 = dora_norm.factored_row_norm(w16, lora_A, lora_B, 1.5, chunk_bytes=bf16_budget)
    torch.testing.assert_close(chunked16, whole16, rtol=1e-6, atol=0)


def test_no_gradient_flows_into_the_norm():
    weight, lora_A, lora_B = factors(40, 24, 4)
    params = [t.requires_grad_() for t in (weight, lora_A, lora_B)]
    norm = dora_norm.factored_row_norm(*params, 2.0)
    assert not norm.requires_grad and norm.grad_fn is None
    assert not dora_norm.weight_sq_norms(weight).requires_grad


def test_negative_rounding_is_clamped_to_zero():
    """W = -s B A exactly: n^2 is rounding noise around 0 and must not become NaN."""
    gen = torch.Generator().manual_seed(3)
    lora_A, lora_B = torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)
    weight = -(lora_B @ lora_A)
    norm = dora_norm.factored_row_norm(weight, lora_A, lora_B, 1.0)
    assert torch.isfinite(norm).all() and (norm >= 0).all()
    assert norm.max() < 1e-2 * torch.linalg.norm(weight, dim=1).min()


def test_shape_errors_say_what_to_do():
    weight, lora_A, lora_B = factors(16, 8, 2)
    with pytest.raises(ValueError, match="fan_in_fan_out=True"):
        dora_norm.factored_row_norm(weight.t(), lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="weight_sq_norms"):
        dora_norm.factored_row_norm(weight, lora_A, lora_B, 1.0, weight_sq=torch.ones(3))


def peft_dora_layer(fan_in_fan_out: bool, rank=8, alpha=12, seed=0):
    import peft

    torch.manual_seed(seed)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(40, 48)  # weight stored (d_in=48, d_out=40)
    else:
        base = torch.nn.Linear(48, 40)
    model = torch.nn.Sequential()
    model.add_module("proj", base)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, use_dora=True, target_modules=["proj"], fan_in_fan_out=fan_in_fan_out
    )
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.3)  # B = 0 at init would hide the LoRA terms
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_matches_peft_dora_weight_norm(fan_in_fan_out):
    layer = peft_dora_layer(fan_in_fan_out)
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    scaling = layer.scaling["default"]
    weight = layer.get_base_layer().weight
    magnitude = layer.lora_magnitude_vector["default"]
    with torch.no_grad():  # PEFT's forward route: identity through both LoRA layers, then get_weight_norm
        lora_weight = magnitude.get_lora_weight(lora_A, lora_B)
        peft_norm = magnitude.get_weight_norm(weight, lora_weight, scaling)
    ours = dora_norm.factored_row_norm(weight, lora_A.weight, lora_B.weight, scaling, fan_in_fan_out=fan_in_fan_out)
    torch.testing.assert_close(ours, peft_norm.detach().float(), rtol=2e-6, atol=0)


_TRANSIENT_CHILD = """
import functools, json, sys, torch
sys.path.insert(0, sys.argv[1])
from peak_memory import cpu_transient_bytes
from hf_ext.kernels.dora_norm import factored_row_norm
torch.set_num_threads(2)
d, out = 4096, {}
weight = (torch.randn(d, d) / d**0.5).bfloat16()
for rank in (16, 384):
    lora_A, lora_B = torch.randn(rank, d) / d**0.5, torch.randn(d, rank) * 0.02
    norm = functools.partial(factored_row_norm, weight, lora_A, lora_B, 2.0)
    norm()  # warm-up
    out[rank] = cpu_transient_bytes(norm)
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_bf16_base_norm_transient_stays_under_5_percent_of_peft_at_4096():
    """bf16 W 4096 x 4096 with PEFT's default fp32 adapters, r = 16 and 384, in a fresh process, measured with
    benchmarks/peak_memory.py as benchmarks/bench_dora.py does. PEFT's norm forms an fp32 identity and B A, at least
    2 * 64 MiB here, so the bound is 5% of 128 MiB; the factored norm allocates about its chunk budget
    (``dora_norm.DEFAULT_CHUNK_BYTES``)."""
    env = {**os.environ, **FRESH_PROCESS_ENV}
    run = subprocess.run(
        [sys.executable, "-c", _TRANSIENT_CHILD, str(BENCHMARKS)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    transients = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(0 < t < 0.05 * 128 * 2**20 for t in transients.values()), transients


@interpreted
@pytest.mark.parametrize("n_rows, rank", [(5, 1), (33, 8), (70, 40), (64, 64)])
def test_interpreted_kernel_matches_torch_twin(n_rows, rank):
    gen = torch.Generator().manual_seed(rank)
    u, b = torch.randn(n_rows, rank, generator=gen), torch.randn(n_rows, rank, generator=gen)
    a = torch.randn(rank, 50, generator=gen)
    gram, wsq = a @ a.t(), torch.rand(n_rows, generator=gen) * 10
    for scaling in (0.1, 2.0):
        twin = dora_norm.combine_rows_torch(u, b, gram, wsq, scaling)
        kernel = dora_norm.combine_rows_triton(u, b, gram, wsq, scaling)
        torch.testing.assert_close(kernel, twin, rtol=1e-6, atol=1e-6)


@interpreted
@pytest.mark.parametrize("n_rows, d_in, rank", [(1, 5, 1), (45, 100, 8), (70, 129, 130), (33, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_interpreted_product_kernel_matches_float64(n_rows, d_in, rank, dtype, transposed):
    """U = W A^T and ||W||^2 from W in its own dtype (a transposed view: GPT-2's Conv1D), against fp64 of the same
    values: fp32 accumulation of exact products, so a few fp32 ulps of the sum of magnitudes; ranks above one
    program's (130 > 64) run side by side."""
    gen = torch.Generator().manual_seed(rank)
    w = torch.randn(d_in, n_rows, generator=gen).to(dtype).t() if transposed else torch.randn(n_rows, d_in).to(dtype)
    a = torch.randn(rank, d_in, generator=gen)
    u, row_sq = dora_norm.weight_lora_product_triton(w, a, True)
    w64 = w.double()
    bound_u = 1e-6 * (w64.abs() @ a.double().abs().t())
    assert ((u.double() - w64 @ a.double().t()).abs() <= bound_u).all()
    torch.testing.assert_close(row_sq.double(), (w64 * w64).sum(1), rtol=1e-6, atol=0)
    twin_u, twin_sq = dora_norm.weight_lora_product_torch(w, a, True)
    torch.testing.assert_close(u, twin_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_sq, twin_sq, rtol=1e-6, atol=0)
    assert dora_norm.weight_lora_product_triton(w, a, False)[1] is None


@interpreted
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_interpreted_dispatch_through_the_kernel_matches_reference(monkeypatch, fan_in_fan_out):
    """Force the Triton branch of factored_row_norm on CPU tensors, with several chunks and a bf16 weight."""
    weight, lora_A, lora_B = factors(45, 36, 40, seed=5)
    stored = weight.t().contiguous() if fan_in_fan_out else weight
    runs = []
    for force in (False, True):
        monkeypatch.setattr(dora_norm, "use_triton", lambda tensor, kernel, force=force: force)
        runs.append(dora_norm.factored_row_norm(stored, lora_A, lora_B, 0.7, fan_in_fan_out, chunk_bytes=20_000))
    twin, kernel = runs
    torch.testing.assert_close(kernel, twin, rtol=1e-6, atol=0)
    assert max_rel_err(kernel, dense_reference(weight, lora_A, lora_B, 0.7)) < 2e-5
    bf16 = [t.bfloat16() for t in (stored, lora_A, lora_B)]
    kernel_bf16 = dora_norm.factored_row_norm(*bf16, 0.7, fan_in_fan_out)
    ref_bf16 = dense_reference(bf16[0].t() if fan_in_fan_out else bf16[0], bf16[1], bf16[2], 0.7)
    assert max_rel_err(kernel_bf16, ref_bf16) < 1e-5


def test_dispatch_uses_the_twin_off_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(dora_norm, "combine_rows_torch", lambda *args: calls.append(1) or torch.ones(8))
    weight, lora_A, lora_B = factors(8, 6, 2)
    dora_norm.factored_row_norm(weight, lora_A, lora_B, 1.0)
    assert calls == [1]
