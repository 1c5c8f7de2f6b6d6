"""DoRA's fused compose (hf_ext.kernels.dora_compose): the twin's autograd vs the plain formula, float64 gradcheck,
what backward keeps, and the Triton kernels vs the twin under TRITON_INTERPRET=1.

Tolerances: twin vs autograd of the plain formula (fp32): 1e-6 relative to the largest entry (same fp32 ops in
another order). Kernel vs twin: fp32 1e-6 relative + 1e-6 absolute (fp32 rounding order); bf16 outputs one bf16
rounding of the same fp32 value, so they may differ by one bf16 ulp: 8e-3 relative + 1e-2 absolute; the fp32 d_m
partial sums 1e-5 relative (summation order). Layer-level parity with PEFT's DoRA is in test_fast_dora.py.
"""

import pytest
import torch
from triton_interpreter import interpreted

from hf_ext.kernels import dora_compose as dc


def inputs(n_tokens, d_out, base_given, bias=True, dtype=torch.float32, seed=0, lead=()):
    """result, base, bias, lora, magnitude, norm with g = m / n spread around 1 (0.5 .. 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, n_tokens, d_out)
    result = torch.randn(shape, generator=gen).to(dtype)
    base = torch.randn(shape, generator=gen).to(dtype) if base_given else None
    bias_t = torch.randn(d_out, generator=gen).to(dtype) if bias else None
    lora = torch.randn(shape, generator=gen).to(dtype)
    norm = torch.rand(d_out, generator=gen) + 0.5
    magnitude = (norm * (torch.rand(d_out, generator=gen) + 0.5)).to(dtype)
    return result, base, bias_t, lora, magnitude, norm


def plain_formula(result, base, bias, lora, magnitude, norm, scaling):
    """PEFT's expression, left to autograd: n detached, base = result - bias unless given."""
    g = magnitude / norm.detach().clamp_min(1e-12)
    if base is None:
        base = result - bias if bias is not None else result
    return result + ((g - 1) * base + g * lora * scaling)


def grads_of(fn, tensors, dy):
    """Output and gradients of every given tensor but the last (the norm, which takes none)."""
    leaves = [
        t.detach().clone().requires_grad_(i < len(tensors) - 1) if t is not None else None
        for i, t in enumerate(tensors)
    ]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return out.detach(), torch.autograd.grad(out, wanted, dy, materialize_grads=True)  # bias unused with a base


def assert_close_rel(got, ref, rel, name=""):
    atol = rel * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got, ref, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("base_given", [False, True], ids=["base_from_result", "base_given"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "3d"])
def test_twin_gradients_match_autograd_of_the_plain_formula(base_given, bias, lead):
    result, base, bias_t, lora, magnitude, norm = inputs(37, 23, base_given, bias, lead=lead)
    dy = torch.randn(result.shape, generator=torch.Generator().manual_seed(9))

    def fused(r, b, bi, lo, m, n):
        return dc.dora_compose(r, lo, m, n, 0.7, base=b, bias=bi)

    def plain(r, b, bi, lo, m, n):
        return plain_formula(r, b, bi, lo, m, n, 0.7)

    tensors = (result, base, bias_t, lora, magnitude, norm)
    out, grads = grads_of(fused, tensors, dy)
    ref_out, ref_grads = grads_of(plain, tensors, dy)
    assert_close_rel(out, ref_out, 1e-6, "output")
    for i, (grad, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close_rel(grad, ref, 1e-6, f"grad {i}")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_output_is_exactly_the_base_result_at_dora_init(bias, dtype):
    """Where g = 1 (m = ||W + s B A||, as DoRA initializes it) and the LoRA branch is 0 (B = 0), the twin returns
    the base layer's result bit for bit, with or without a bias, as PEFT's formula does."""
    result, _, bias_t, lora, _, norm = inputs(33, 70, False, bias=bias, dtype=dtype)
    out = dc.compose_forward_torch(result, None, bias_t, torch.zeros_like(lora), torch.ones(70), 2.0, True)[0]
    assert torch.equal(out, result.to(out.dtype))


def test_norm_gets_no_gradient_and_magnitude_gradient_is_the_stated_sum():
    result, _, bias, lora, magnitude, norm = inputs(8, 5, False)
    magnitude.requires_grad_()
    norm.requires_grad_()
    dy = torch.randn(8, 5)
    dc.dora_compose(result, lora, magnitude, norm, 2.0, bias=bias).backward(dy)
    assert norm.grad is None
    by_hand = (dy * (result - bias + 2.0 * lora)).sum(0) / norm.detach()
    torch.testing.assert_close(magnitude.grad, by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base_given", [False, True], ids=["base_from_result", "base_given"])
def test_gradcheck_float64(base_given):
    result, base, bias, lora, magnitude, norm = inputs(4, 3, base_given, dtype=torch.float64)
    norm = norm.double()
    leaves = [t.requires_grad_() for t in (result, base, bias, lora, magnitude) if t is not None]

    def fn(*args):
        r, *rest = args
        b = rest.pop(0) if base_given else None
        bi, lo, m = rest
        return dc.dora_compose(r, lo, m, norm, 0.3, base=b, bias=bi)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def saved_bytes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd keeps for backward while ``fn`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("base_given", [False, True], ids=["base_from_result", "base_given"])
def test_backward_keeps_one_activation_sized_tensor_and_none_with_a_frozen_magnitude(base_given):
    result, base, bias, lora, magnitude, norm = inputs(64, 48, base_given)
    for t in (result, base, lora, magnitude):
        if t is not None:
            t.requires_grad_()
    saved = saved_bytes(lambda: dc.dora_compose(result, lora, magnitude, norm, 1.5, base=base, bias=bias))
    assert sorted(saved) == [(48,), (48,), (64, 48)]  # g, n and inner = base + s lora
    magnitude.requires_grad_(False)
    saved = saved_bytes(lambda: dc.dora_compose(result, lora, magnitude, norm, 1.5, base=base, bias=bias))
    assert saved == [(48,)]  # g only
    # the plain formula keeps far more: PEFT's graph saves lora and base/g products
    plain_saved = saved_bytes(lambda: plain_formula(result, base, bias, lora, magnitude.requires_grad_(), norm, 1.5))
    assert sum(torch.Size(s).numel() for s in plain_saved) >= 2 * 64 * 48


def test_no_grad_path_skips_the_autograd_function():
    result, _, bias, lora, magnitude, norm = inputs(6, 4, False)
    magnitude.requires_grad_()
    with torch.no_grad():
        out = dc.dora_compose(result, lora, magnitude, norm, 0.5, bias=bias)
    assert out.grad_fn is None
    torch.testing.assert_close(out, plain_formula(result, None, bias, lora, magnitude, norm, 0.5).detach())


def test_mixed_dtypes_follow_peft_promotion_and_cast_gradients_back():
    """bf16 base output with fp32 LoRA output and magnitude (PEFT's default with a bf16 base): fp32 out.

    PEFT rounds ``result - bias`` to bf16 before promoting; the compose subtracts in fp32, so it differs from PEFT
    by at most that one rounding, |g - 1| * 2^-8 * |base|, and matches the fp32 formula.
    """
    result, _, bias, lora, magnitude, norm = inputs(10, 6, False)
    result, bias = result.bfloat16().requires_grad_(), bias.bfloat16()
    lora, magnitude = lora.requires_grad_(), magnitude.requires_grad_()
    out = dc.dora_compose(result, lora, magnitude, norm, 0.5, bias=bias)
    fp32 = plain_formula(result.detach().float(), None, bias.float(), lora.detach(), magnitude.detach(), norm, 0.5)
    peft = plain_formula(result.detach(), None, bias, lora.detach(), magnitude.detach(), norm, 0.5)
    assert out.dtype == peft.dtype == torch.float32
    torch.testing.assert_close(out, fp32, rtol=1e-6, atol=1e-6)
    g = magnitude.detach() / norm
    bound = (g - 1).abs() * 2**-8 * (result.detach().float() - bias.float()).abs() + 1e-6
    assert ((out.detach() - peft).abs() <= bound).all()
    out.sum().backward()
    assert (result.grad.dtype, lora.grad.dtype, magnitude.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_no_tokens_give_empty_outputs_and_zero_magnitude_gradient():
    result, _, bias, lora, magnitude, norm = inputs(0, 5, False)
    magnitude.requires_grad_()
    out = dc.dora_compose(result, lora.requires_grad_(), magnitude, norm, 0.5, bias=bias)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert torch.equal(magnitude.grad, torch.zeros(5)) and lora.grad.shape == (0, 5)


def test_shape_mismatch_is_a_clear_error():
    result, _, bias, lora, magnitude, norm = inputs(6, 4, False)
    with pytest.raises(ValueError, match=r"magnitude, norm and bias shape \(4,\); got norm \(5,\)"):
        dc.dora_compose(result, lora, magnitude, torch.ones(5), 0.5, bias=bias)
    with pytest.raises(ValueError, match=r"got lora \(6, 3\)"):
        dc.dora_compose(result, lora[:, :3], magnitude, norm, 0.5, bias=bias)


# ---------------------------------------------------------------- Triton kernels under the interpreter


KERNEL_SHAPES = [(0, 7), (1, 1), (5, 123), (33, 257), (130, 64)]  # 130 tokens: two backward programs, one partial
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-2)}


@interpreted
@pytest.mark.parametrize("n_tokens, d_out", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_given", [False, True], ids=["base_from_result", "base_given"])
def test_interpreted_kernels_match_torch_twin(n_tokens, d_out, dtype, base_given):
    result, base, bias, lora, magnitude, norm = inputs(n_tokens, d_out, base_given, dtype=dtype, seed=n_tokens)
    g = dc.magnitude_scale(magnitude, norm)
    for save_inner in (True, False):
        twin = dc.compose_forward_torch(result, base, bias, lora, g, 0.7, save_inner)
        kernel = dc.compose_forward_triton(result, base, bias, lora, g, 0.7, save_inner)
        for got, ref in zip(kernel, twin, strict=True):
            assert (got is None) == (ref is None)
            if ref is not None:
                assert got.dtype == ref.dtype == dtype
                torch.testing.assert_close(got, ref, **TOL[dtype])
    inner = dc.compose_forward_torch(result, base, bias, lora, g, 0.7, True)[1]
    dy = torch.randn(n_tokens, d_out, generator=torch.Generator().manual_seed(1)).to(dtype)
    shift = 1.0 if base_given else 0.0
    twin = dc.compose_backward_torch(dy, g, inner, 0.7, shift, dtype, torch.float32)
    kernel = dc.compose_backward_triton(dy, g, inner, 0.7, shift, dtype, torch.float32)
    assert (kernel[0].dtype, kernel[1].dtype) == (dtype, torch.float32)
    torch.testing.assert_close(kernel[0], twin[0], **TOL[dtype])
    torch.testing.assert_close(kernel[1], twin[1], rtol=1e-6, atol=1e-6)
    assert_close_rel(kernel[2], twin[2], 1e-5, "d_m partial sums")
    partial = dc.compose_backward_triton(dy, g, None, 0.7, shift, None, dtype)
    assert partial[0] is None and partial[2] is None
    torch.testing.assert_close(partial[1], twin[1].to(dtype), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("base_given", [False, True], ids=["base_from_result", "base_given"])
def test_interpreted_autograd_through_the_kernels_matches_twin(monkeypatch, base_given):
    """Force the Triton branch of the dispatch on CPU tensors: outputs and all gradients as with the twin."""
    tensors = inputs(45, 70, base_given, lead=(2,), seed=3)
    dy = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(4))
    runs = []
    for force in (False, True):
        monkeypatch.setattr(dc, "use_triton", lambda tensor, kernel, force=force: force)
        fused = lambda r, b, bi, lo, m, n: dc.dora_compose(r, lo, m, n, 1.3, base=b, bias=bi)  # noqa: E731
        runs.append(grads_of(fused, tensors, dy))
    (twin_out, twin_grads), (kernel_out, kernel_grads) = runs
    torch.testing.assert_close(kernel_out, twin_out, rtol=1e-6, atol=1e-6)
    for got, ref in zip(kernel_grads, twin_grads, strict=True):
        assert_close_rel(got, ref, 1e-5)
