"""Correctness of hf_ext's three Triton kernels on one device, before any timing: each against its torch twin and an
fp64 evaluation of its formula, in fp32 / bf16 / fp16, on awkward shapes, forward and backward.

On ``--device cuda`` the kernels are compiled for the GPU (the dispatch picks them for CUDA tensors); on ``--device
cpu`` they run under Triton's interpreter (``run.sh`` sets ``TRITON_INTERPRET=1``) with the dispatch forced, which
is how CI keeps this script from rotting. Prints one markdown table row per check and exits 1 if any fails.

Tolerances: the 4-bit step's kernels round the same fp32 operations as their twin, in its order, and are launched
with FP fusion off (no FMA contraction), so kernel vs twin is held to 0 on every device: codes, scales, statistics
and parameters (AdamW4bitFactor's means are summed in another order: held to fp32 rounding). The DoRA kernels may
contract, so they are held to a few fp32 ulps of the result; against fp64 the bound is the input dtype's rounding of
the inputs and the output.
"""

import argparse
import contextlib
import math
import sys

import torch

from hf_ext.kernels import adamw4bit_step as fused
from hf_ext.kernels import dora_compose as compose_module
from hf_ext.kernels import dora_norm as norm_module
from hf_ext.kernels import quant4


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
MODULES = (norm_module, compose_module, fused)
rows = []


@contextlib.contextmanager
def dispatch(kernel: bool):
    """Every kernel module's dispatch says ``kernel`` for the duration (Triton kernel or torch twin)."""
    saved = [module.use_triton for module in MODULES]
    for module in MODULES:
        module.use_triton = lambda tensor, name: kernel
    try:
        yield
    finally:
        for module, original in zip(MODULES, saved, strict=True):
            module.use_triton = original


def record(check: str, case: str, error: float, bound: float) -> None:
    rows.append((check, case, error, bound, error <= bound))


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def check_norm(device, dtype, d_out, d_in, r, label):
    gen = torch.Generator(device="cpu").manual_seed(d_out * 31 + d_in)
    weight = torch.randn(d_out, d_in, generator=gen).to(device, dtype)
    lora_A = (torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)).to(device, dtype)
    lora_B = (torch.randn(d_out, r, generator=gen) * 0.1).to(device, dtype)
    with dispatch(True):
        kernel = norm_module.factored_row_norm(weight, lora_A, lora_B, 2.0)
    with dispatch(False):
        twin = norm_module.factored_row_norm(weight, lora_A, lora_B, 2.0)
    dense = weight.double() + 2.0 * lora_B.double() @ lora_A.double()
    reference = dense.norm(dim=1)
    record("dora_norm kernel vs twin", label, relative(kernel, twin), 64 * EPS[torch.float32])
    record("dora_norm vs fp64", label, relative(kernel, reference), 8 * math.sqrt(d_in) * EPS[torch.float32])


def check_product(device, dtype, d_out, d_in, r, label, transposed):
    """U = W A^T and ||W||^2 straight from W's dtype and strides, against fp64 (error over the sum of magnitudes)."""
    gen = torch.Generator(device="cpu").manual_seed(d_out + r)
    weight = torch.randn(d_in, d_out, generator=gen).t() if transposed else torch.randn(d_out, d_in, generator=gen)
    weight, lora_A = weight.to(device, dtype), torch.randn(r, d_in, generator=gen).to(device)
    u, row_sq = norm_module.weight_lora_product_triton(weight, lora_A, True)
    w64 = weight.double()
    error = ((u.double() - w64 @ lora_A.double().t()).abs() / (w64.abs() @ lora_A.double().abs().t())).max().item()
    bound = 4 * math.sqrt(d_in) * EPS[torch.float32]  # fp32 accumulation over d_in terms
    record("dora_norm W A^T kernel vs fp64 (/ sum of |terms|)", label, error, bound)
    record("dora_norm ||W||^2 kernel vs fp64", label, relative(row_sq, (w64 * w64).sum(1)), bound)


def check_compose(device, dtype, shape, label, transposed=False):
    gen = torch.Generator(device="cpu").manual_seed(sum(shape))
    d_out = shape[-1]
    make = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    result, lora = make(*shape), make(*shape) * 0.1
    if transposed:  # a non-contiguous output, as a transposed matmul gives
        result = make(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    magnitude = (torch.rand(d_out, generator=gen) + 0.5).to(device, torch.float32)
    norm = (torch.rand(d_out, generator=gen) + 0.5).to(device, torch.float32)
    bias = make(d_out)
    outputs = {}
    for name, kernel in (("kernel", True), ("twin", False)):
        inputs = [t.detach().clone().requires_grad_() for t in (result, lora, magnitude, bias)]
        with dispatch(kernel):
            y = compose_module.dora_compose(inputs[0], inputs[1], inputs[2], norm, 0.5, bias=inputs[3])
            grads = torch.autograd.grad(y, inputs, grad_outputs=torch.ones_like(y))
        outputs[name] = (y, grads)
    inputs64 = [t.detach().double().requires_grad_() for t in (result, lora, magnitude, bias)]
    g = inputs64[2] / norm.double().clamp(min=1e-12)
    base = inputs64[0] - inputs64[3]
    y64 = inputs64[0] + (g - 1) * base + g * inputs64[1] * 0.5
    grads64 = torch.autograd.grad(y64, inputs64, grad_outputs=torch.ones_like(y64))
    (y_k, grads_k), (y_t, grads_t) = outputs["kernel"], outputs["twin"]
    record("dora_compose fwd kernel vs twin", label, relative(y_k, y_t), 2 * EPS[dtype])
    record("dora_compose fwd vs fp64", label, relative(y_k, y64), 8 * EPS[dtype])
    names = ("d result", "d lora", "d magnitude", "d bias")
    for name, got, twin, want in zip(names, grads_k, grads_t, grads64, strict=True):
        reduced = want.numel() < y64.numel()  # summed over rows: rounding grows with their number
        bound = (16 * math.sqrt(y64.numel() / want.numel()) if reduced else 4) * EPS[dtype]
        record(f"dora_compose {name} kernel vs twin", label, relative(got, twin), max(bound, 2 * EPS[dtype]))
        record(f"dora_compose {name} vs fp64", label, relative(got, want), max(bound, 8 * EPS[dtype]))


def adam_state(shape, rank1, block_size, device):
    gen = torch.Generator(device="cpu").manual_seed(7)
    m = (torch.randn(shape, generator=gen) * 1e-2).to(device)
    v = (torch.rand(shape, generator=gen) * 1e-4).to(device)
    m_codes, m_absmax = quant4.quantize_blockwise(m, quant4.dynamic_exponent_map(device), block_size)
    if rank1:
        v_codes, v_scales = quant4.quantize_rank1(v, quant4.linear_map(device))
    else:
        v_codes, absmax = quant4.quantize_blockwise(v, quant4.linear_map(device), block_size)
        v_scales = [absmax]
    return [m_codes, m_absmax, v_codes, v_scales]


def check_adamw4bit(device, dtype, shape, rank1, label):
    block_size = 128
    gen = torch.Generator(device="cpu").manual_seed(3)
    param = torch.randn(shape, generator=gen).to(device, dtype)
    state = adam_state(shape, rank1, block_size, device)
    param_k, state_k = param.clone(), [[t.clone() for t in x] if isinstance(x, list) else x.clone() for x in state]
    codes_differ = codes_total = 0
    worst = 0.0
    for step in (1, 2, 3):
        grad = (torch.randn(shape, generator=gen) * 0.1).to(device, dtype)
        scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
        fused.adamw4bit_step_torch(param, grad, *state, scalars, block_size, rank1)
        fused.adamw4bit_step_triton(param_k, grad, *state_k, scalars, block_size, rank1)
        for packed_twin, packed_kernel in ((state[0], state_k[0]), (state[2], state_k[2])):
            twin_codes = quant4.unpack_4bit(packed_twin, param.numel())
            kernel_codes = quant4.unpack_4bit(packed_kernel, param.numel())
            codes_differ += (twin_codes != kernel_codes).sum().item()
            codes_total += twin_codes.numel()
        worst = max(worst, ((param_k.double() - param.double()).abs().max() / 1e-3).item())  # in units of lr
    record("adamw4bit codes kernel vs twin (share differing)", label, codes_differ / codes_total, 0.0)
    record("adamw4bit param kernel vs twin (max dp / lr)", label, worst, 0.0)


def check_rank1_statistics(device, dtype, shape, label):
    """The rank-1 step's first pass (new v's row/column maxima, atomic max per tile) against its torch twin: equal
    (the new v rounds as the twin's, and max is exact)."""
    _, _, v_codes, v_scales = adam_state(shape, True, 128, device)
    grad = (torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(5)) * 0.1).to(device, dtype)
    grad = grad.reshape(v_scales[0].numel(), -1)
    scalars = fused.StepScalars.from_group(1e-3, 0.9, 0.999, 1e-8, 1e-2, 2)
    want = fused.rank1_next_statistics(grad, v_codes, v_scales, scalars)
    got, grad_max = fused.rank1_next_statistics_triton(grad, v_codes, v_scales, scalars)
    error = max(relative(a, b) for a, b in zip(got, want, strict=True))
    record("adamw4bit rank-1 statistics pass vs twin (max rel)", label, error, 0.0)
    record("adamw4bit rank-1 pass: largest |g| (abs error)", label, (grad_max - grad.abs().max()).abs().item(), 0.0)
    grad.view(-1)[-1] = float("nan")
    nan_max = fused.rank1_next_statistics_triton(grad, v_codes, v_scales, scalars)[1]
    record("adamw4bit rank-1 pass: NaN g missed (1 = missed)", label, float(nan_max.isfinite().item()), 0.0)


def check_squared_means(device, dtype, shape, label):
    """AdamW4bitFactor's statistics pass (means of g^2 over the last and second-to-last dimension, the largest |g|)
    against fp64."""
    grad = (torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(9)) * 0.1).to(device, dtype)
    with dispatch(True):
        rows, cols, grad_max = fused.squared_means(grad)
    squared = grad.double() ** 2
    error = max(relative(rows, squared.mean(-1)), relative(cols, squared.mean(-2)))
    grad_max_error = (grad_max - grad.abs().max()).abs().item()
    record("AdamW4bitFactor statistics pass: largest |g| (abs error)", label, grad_max_error, 0.0)
    record(
        "AdamW4bitFactor squared means vs fp64 (max rel)", label, error, 8 * math.sqrt(max(shape)) * EPS[torch.float32]
    )


def check_many_tensors(device, dtype, quick: bool, optimizer_cls):
    """The optimizer's multi-tensor launches (several tensors per Triton launch; for AdamW4bitFactor, 4-bit m with
    the factored v given to the kernel) against the twin, stepping the same decoder-like set of shapes (rank-1 and
    block-wise v, an odd size, a small fp32-state tensor) for 3 steps."""
    large = [(512, 512), (1536, 512), (512, 1536), (130, 77), (8193,), (2048,)]
    shapes = [(64, 96), (130, 77), (5001,), (64,)] if quick else large
    runs = []
    for kernel in (False, True):
        gen = torch.Generator(device="cpu").manual_seed(11)
        params = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for shape in shapes]
        optimizer = optimizer_cls(params, lr=1e-3, weight_decay=0.01)
        for _ in range(3):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(device, dtype)
            with dispatch(kernel):
                optimizer.step()
        runs.append(params)
    worst = max(((a.double() - b.double()).abs().max() / 1e-3).item() for a, b in zip(*runs, strict=True))
    exact = not optimizer_cls.factor_second_moment  # Factor: the kernel sums in another order
    record(f"{optimizer_cls.__name__} multi-tensor launches vs twin (max dp / lr)", f"{len(shapes)} tensors", worst,
           0.0 if exact else 1e-2)  # fmt: skip


def check_nonfinite_gradient(device):
    from hf_ext.optim import AdamW4bit

    param = torch.randn(300, 200, device=device, requires_grad=True)
    before = param.detach().clone()
    optimizer = AdamW4bit([param], nonfinite_grads="skip")
    param.grad = torch.randn_like(param)
    param.grad[3, 5] = float("nan")
    with dispatch(True):
        optimizer.step()
    record("adamw4bit NaN gradient skipped (max dp)", "300x200", (param.detach() - before).abs().max().item(), 0.0)
    optimizer = AdamW4bit([param])
    param.grad[3, 5] = float("inf")
    try:
        with dispatch(True):
            optimizer.step()
        raised = 0.0
    except (ValueError, RuntimeError):
        raised = 1.0
    record("adamw4bit inf gradient refused (raise mode)", "300x200", 1.0 - raised, 0.0)


def main() -> int:
    from hf_ext.optim import AdamW4bit, AdamW4bitFactor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes only (the CPU interpreter)")
    args = parser.parse_args()
    device = args.device
    dtypes = [torch.float32] if args.quick else list(DTYPES.values())
    norm_shapes = [(1, 16, 4), (7, 13, 3), (33, 64, 8)]
    compose_shapes = [((1, 5),), ((3, 7, 19),)]
    adam_shapes = [((301,), False), ((5, 123), True), ((3, 1, 77), True)]
    if not args.quick:
        norm_shapes += [(4096, 4096, 16), (4096, 4096, 384), (70000, 8, 4)]  # more rows than one grid dimension
        compose_shapes += [((2, 1024, 4096),), ((8, 4096),)]
        adam_shapes += [((4096, 4096), True), ((4096, 11008), True), ((1 << 20,), False)]
    for dtype in dtypes:
        name = next(k for k, v in DTYPES.items() if v is dtype)
        for d_out, d_in, r in norm_shapes:
            check_norm(device, dtype, d_out, d_in, r, f"{name} {d_out}x{d_in} r{r}")
            for transposed in (False, True):
                label = f"{name} {d_out}x{d_in} r{r}{' transposed' if transposed else ''}"
                check_product(device, dtype, d_out, d_in, r, label, transposed)
        for (shape,) in compose_shapes:
            check_compose(device, dtype, shape, f"{name} {'x'.join(map(str, shape))}")
        check_compose(device, dtype, (4, 6, 9), f"{name} 4x6x9 non-contiguous", transposed=True)
        for shape, rank1 in adam_shapes:
            if dtype is not torch.float16:
                label = f"{name} {'x'.join(map(str, shape))} rank1={rank1}"
                check_adamw4bit(device, dtype, shape, rank1, label)
                if rank1:
                    check_rank1_statistics(device, dtype, shape, label)
        for shape in [(37, 129), (2, 30, 90)] + ([] if args.quick else [(4096, 11008), (1, 1 << 20)]):
            check_squared_means(device, dtype, shape, f"{name} {'x'.join(map(str, shape))}")
        if dtype is not torch.float16:
            for optimizer_cls in (AdamW4bit, AdamW4bitFactor):
                check_many_tensors(device, dtype, args.quick, optimizer_cls)
    check_nonfinite_gradient(device)
    print("| check | case | error | bound | ok |\n|---|---|---:|---:|---|")
    for check, case, error, bound, ok in rows:
        print(f"| {check} | {case} | {error:.3g} | {bound:.3g} | {'yes' if ok else '**NO**'} |")
    failed = [row for row in rows if not row[4]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks within their bounds.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
