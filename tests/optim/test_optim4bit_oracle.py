"""An independent multi-step oracle for AdamW4bit / AdamW4bitFactor (Li, Chen & Zhu, arXiv 2309.01507).

The reference below is written from the paper's definitions (lpmm's default configuration) and imports nothing
from ``hf_ext.kernels`` (the quantizers and the fused step): its own codebooks (the DE map from its fp32 bit table,
the linear map (i+1)/16 without zero), block-wise absmax (block 128, last block zero-padded), rank-1 scales (min over
the per-dimension absmax vectors after dropping singleton dimensions), nearest code with ties to the lower code, a
zero scale dividing as 1, nibble packing with element 2j in the low nibble (an odd count padded with the code of
0), fp32 states for tensors of at most 4096 elements. It computes in numpy float32, one IEEE-rounded op at a time
(numpy's float32 sqrt and division are correctly rounded), in the documented op order

    p * decay + (neg_step_size * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps),
    m + (1 - beta1) * (g - m),    v * beta2 + ((1 - beta2) * g) * g,

with each hyper-parameter expression evaluated in Python floats and rounded once to fp32 (``step_constants``), so
its codes, scales and parameters are bit-exact with any IEEE fp32 implementation of that sequence. Inputs come
from numpy's RNG, identical on every CPU (torch.randn's low bits depend on the CPU capability). Each step compares
uint8 codes, fp32 scales, fp32 states and parameters exactly; bf16 parameters are rounded to nearest even.

The factored second moment's row/column means are reductions whose summation order depends on the CPU, so R, C
and the parameters they reach are checked per step against an fp64 evaluation from the optimizer's previous
state, with bounds counted from the fp32 roundings (see ``check_factored``); m does not depend on v and is still
compared exactly over the whole run.
"""

import numpy as np
import pytest
import torch

from hf_ext.optim import AdamW4bit, AdamW4bitFactor


F32 = np.float32
U = 2.0**-24  # unit roundoff of fp32 round-to-nearest
BLOCK = 128
THRESHOLD = 4096  # states of tensors with more elements are quantized
DE_BITS = (
    0xBF633333, 0xBF29999A, 0xBEE00000, 0xBE599999, 0xBD9EB852, 0xBD051EB9, 0xBBB43958, 0x00000000,
    0x3BB43958, 0x3D051EB9, 0x3D9EB852, 0x3E599999, 0x3EE00000, 0x3F29999A, 0x3F633333, 0x3F800000,
)  # fmt: skip
DE = np.array(DE_BITS, dtype=np.uint32).view(F32)
LIN = np.arange(1, 17, dtype=F32) / F32(16)
STEPS = 12
HYPER = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def lr_at(step: int) -> float:
    """A learning rate that changes every step, as a scheduler writes it into the param group."""
    return 1e-2 / (1 + step % 4)


def step_constants(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, t: int) -> dict:
    """The fp32 constants of step t (1-based): each expression in Python floats, rounded once to fp32."""
    return dict(
        decay=F32(1 - lr * weight_decay),
        one_minus_beta1=F32(1 - beta1),
        beta2=F32(beta2),
        one_minus_beta2=F32(1 - beta2),
        bias_correction2_sqrt=F32((1 - beta2**t) ** 0.5),
        neg_step_size=F32(-lr / (1 - beta1**t)),
        eps=F32(eps),
    )


# ---------------------------------------------------------------- the quantizer, from its definitions


def nearest(normalized: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry: the number of fp32 midpoints (T[k] + T[k+1]) * 0.5 strictly below x."""
    midpoints = (codebook[:-1] + codebook[1:]) * F32(0.5)
    return (normalized[..., None] > midpoints).sum(axis=-1).astype(np.uint8)


def divide_by_scale(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x / np.where(scale > 0, scale, F32(1))


def pack(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """byte j = codes[2j] | codes[2j+1] << 4; an odd count is padded with the code of 0."""
    codes = codes.ravel()
    if codes.size % 2:
        codes = np.append(codes, nearest(np.zeros(1, F32), codebook))
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, numel: int) -> np.ndarray:
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2], codes[1::2] = packed & 15, packed >> 4
    return codes[:numel]


def blocks(x: np.ndarray) -> np.ndarray:
    flat = x.ravel()
    return np.concatenate([flat, np.zeros(-flat.size % BLOCK, F32)]).reshape(-1, BLOCK)


def quantize_block(x: np.ndarray, codebook: np.ndarray) -> dict:
    tiles = blocks(x)
    absmax = np.abs(tiles).max(axis=1)
    codes = nearest(divide_by_scale(tiles, absmax[:, None]), codebook).ravel()[: x.size]
    return dict(codes=pack(codes, codebook), absmax=absmax)


def dequantize_block(q: dict, codebook: np.ndarray, numel: int) -> np.ndarray:
    return codebook[unpack(q["codes"], numel)] * np.repeat(q["absmax"], BLOCK)[:numel]


def rank1_scale(stats: list[np.ndarray]) -> np.ndarray:
    scale = stats[0].reshape([-1] + [1] * (len(stats) - 1))
    for k, stat in enumerate(stats[1:], start=1):
        shape = [1] * len(stats)
        shape[k] = -1
        scale = np.minimum(scale, stat.reshape(shape))
    return scale


def quantize_rank1(v: np.ndarray) -> dict:
    """v in its squeezed shape; stats[k] = max |v| over every dimension but k."""
    dims = range(v.ndim)
    stats = [np.abs(v).max(axis=tuple(d for d in dims if d != k)) for k in dims]
    return dict(codes=pack(nearest(divide_by_scale(v, rank1_scale(stats)), LIN), LIN), stats=stats)


def dequantize_rank1(q: dict, numel: int) -> np.ndarray:
    return LIN[unpack(q["codes"], numel)] * rank1_scale(q["stats"]).ravel()


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round fp32 to the nearest bf16, ties to even (finite values), returned as fp32."""
    bits = x.view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
    return bits.view(F32)


# ---------------------------------------------------------------- the reference optimizer


def next_m(m, g, c):
    return m + c["one_minus_beta1"] * (g - m)


def next_v(v, g, c):
    return v * c["beta2"] + (c["one_minus_beta2"] * g) * g


class Reference:
    """One parameter's oracle state; the layout follows the definitions, not the optimizer's keys."""

    def __init__(self, param: np.ndarray, bf16: bool, factored: bool):
        self.p, self.bf16, self.shape = param.ravel().copy(), bf16, param.shape
        self.quantized = param.size > THRESHOLD
        self.squeezed = tuple(size for size in param.shape if size != 1)
        if factored and param.ndim >= 2:
            self.v_layout = "factored"
        elif not self.quantized:
            self.v_layout = "fp32"
        else:
            self.v_layout = "rank1" if len(self.squeezed) >= 2 else "block"
        zeros = np.zeros(param.size, F32)
        self.m = quantize_block(zeros, DE) if self.quantized else zeros
        self.new_m = zeros  # the last unquantized m, which the factored check needs
        if self.v_layout == "fp32":
            self.v = zeros
        elif self.v_layout == "block":
            self.v = quantize_block(zeros, LIN)
        elif self.v_layout == "rank1":
            self.v = quantize_rank1(zeros.reshape(self.squeezed))

    def step(self, g: np.ndarray, c: dict) -> None:
        """One step; the factored layout only updates m (its v and p are checked by ``check_factored``)."""
        g, n = g.ravel(), self.p.size
        m = next_m(dequantize_block(self.m, DE, n) if self.quantized else self.m, g, c)
        self.m, self.new_m = (quantize_block(m, DE) if self.quantized else m), m
        if self.v_layout == "factored":
            return
        if self.v_layout == "fp32":
            v = self.v = next_v(self.v, g, c)
        elif self.v_layout == "block":
            v = next_v(dequantize_block(self.v, LIN, n), g, c)
            self.v = quantize_block(v, LIN)
        else:
            v = next_v(dequantize_rank1(self.v, n), g, c)
            self.v = quantize_rank1(v.reshape(self.squeezed))
        p = self.p * c["decay"] + (c["neg_step_size"] * m) / (np.sqrt(v) / c["bias_correction2_sqrt"] + c["eps"])
        self.p = round_to_bf16(p) if self.bf16 else p

    def expected_state(self) -> dict:
        """Optimizer state key -> expected array (every state of the non-factored layouts, m of the factored one)."""
        expected = (
            {"exp_avg_codes": self.m["codes"], "exp_avg_absmax": self.m["absmax"]}
            if self.quantized
            else {"exp_avg": self.m}
        )
        if self.v_layout == "fp32":
            expected["exp_avg_sq"] = self.v
        elif self.v_layout == "block":
            expected.update(exp_avg_sq_codes=self.v["codes"], exp_avg_sq_absmax=self.v["absmax"])
        elif self.v_layout == "rank1":
            expected["exp_avg_sq_codes"] = self.v["codes"]
            expected.update({f"exp_avg_sq_stat{k}": stat for k, stat in enumerate(self.v["stats"])})
        return expected


# ---------------------------------------------------------------- inputs and comparisons


SHAPES = [
    (64, 96),  # rank-1 v, 2-D
    (65, 97),  # rank-1 v, odd numel
    (4, 1, 40, 33),  # rank-1 v, n-d with a singleton dimension
    (1, 5000),  # singleton -> block v, numel not a multiple of 128
    (4501,),  # 1-D block v, odd numel
    (30, 20),  # fp32 states
    (7,),
]


def make_inputs(seed: int):
    """Initial parameters and STEPS gradients per tensor from numpy's RNG. Gradient scales spread over 1e-8 .. 1
    (so that eps matters in some steps), with silent regions in every step: a zero row and a zero column of each
    tensor that has >= 2 non-singleton dimensions (zero rank-1 statistics), else a zero first block (zero absmax)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape).astype(F32) for shape in SHAPES]
    grads = []
    for _ in range(STEPS):
        step = []
        for shape in SHAPES:
            scale = 10.0 ** rng.uniform(-6, 0) * 10.0 ** rng.uniform(-2, 0, shape)
            g = (rng.standard_normal(shape) * scale).astype(F32)
            if shape[0] > 1 and len(shape) >= 2:
                g[1], g[..., 2] = 0, 0
            else:
                g.reshape(-1)[:BLOCK] = 0
            step.append(g)
        grads.append(step)
    return params, grads


def to_torch(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(x.copy()).to(dtype)


def assert_equal(got: torch.Tensor, expected: np.ndarray, what: str) -> None:
    """Same dtype, size and bits (fp32 compared as bit patterns; bf16 parameters through their exact fp32 values)."""
    got = got.detach()
    got = (got.float() if got.dtype == torch.bfloat16 else got).numpy().ravel()
    expected = expected.ravel()
    assert got.dtype == expected.dtype and got.size == expected.size, (what, got.dtype, got.size, expected.size)
    if got.dtype == F32:
        got, expected = got.view(np.uint32), expected.view(np.uint32)
    mismatches = np.flatnonzero(got != expected)
    assert mismatches.size == 0, f"{what}: {mismatches.size} of {got.size} differ, first at {mismatches[:5]}"


def assert_within(got: torch.Tensor, exact: np.ndarray, bound: np.ndarray, what: str) -> None:
    error = np.abs(got.detach().double().numpy() - exact)
    assert np.all(error <= bound), f"{what}: error / bound up to {(error / np.maximum(bound, 1e-300)).max():.2f}"


def check_factored(p: torch.Tensor, before, state: dict, m: np.ndarray, c: dict, where: str) -> None:
    """R, C and p of one factored step against fp64 from the optimizer's previous R, C, p and the oracle's new m.

    Counting fp32 roundings (first order, each |relative error| <= u = 2^-24), with n the length of a mean: the
    mean of n non-negative fp32 squares is within (1 + (n - 1) + 2) u (squares, any summation order, scaling by 1/n
    in one or two roundings); times (1 - beta2) and the add make it (n + 4) u, so |R - R*| <= (n + 5) u R* (C
    alike; the extra 1 covers the O(u^2) terms). v = (R / mean(R)) C from the new R, C: (n_r + 3) u, n_r =
    shape[-2]; its sqrt halves that and adds 1; the bias correction, + eps, (lr / bc1) * m and the division add 4:
    |p - p*| <= k u (|p decay| + |update*|) + u |p*| with k = (n_r + 3) / 2 + 6.
    """
    p_old, state_old = before
    squared = p.grad.double().numpy() ** 2
    for key, dim in (("exp_avg_sq_row", -1), ("exp_avg_sq_col", -2)):
        old = state_old[key].double().numpy() if key in state_old else 0.0  # no state before step 1
        exact = old * float(c["beta2"]) + float(c["one_minus_beta2"]) * squared.mean(axis=dim)
        assert_within(state[key], exact, (p.shape[dim] + 5) * U * exact, f"{where}: {key}")
    row, col = state["exp_avg_sq_row"].double().numpy(), state["exp_avg_sq_col"].double().numpy()
    row_mean = row.mean(axis=-1, keepdims=True)
    v = (row / np.where(row_mean > 0, row_mean, 1.0))[..., :, None] * col[..., None, :]
    denom = np.sqrt(v) / float(c["bias_correction2_sqrt"]) + float(c["eps"])
    update = float(c["neg_step_size"]) * m.astype(np.float64).reshape(p.shape) / denom
    decayed = p_old.astype(np.float64) * float(c["decay"])
    exact = decayed + update
    k = (p.shape[-2] + 3) / 2 + 6
    assert_within(p, exact, k * U * (np.abs(decayed) + np.abs(update)) + U * np.abs(exact), f"{where}: parameter")


def run_against_the_oracle(cls, dtype: torch.dtype, seed: int) -> None:
    params_np, grads_np = make_inputs(seed)
    bf16 = dtype == torch.bfloat16
    params = [to_torch(p, dtype).requires_grad_() for p in params_np]
    references = [Reference(p.detach().float().numpy(), bf16, cls.factor_second_moment) for p in params]
    opt = cls(params, lr=lr_at(1), **HYPER)
    for t in range(1, STEPS + 1):
        opt.param_groups[0]["lr"] = lr_at(t)
        c = step_constants(lr_at(t), *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"], t)
        before = [(p.detach().float().numpy().copy(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
        for p, g in zip(params, grads_np[t - 1], strict=True):
            p.grad = to_torch(g, dtype)
        opt.step()
        for i, (p, ref) in enumerate(zip(params, references, strict=True)):
            where = f"step {t}, tensor {i} {tuple(p.shape)} {ref.v_layout}"
            ref.step(p.grad.float().numpy(), c)
            state = opt.state[p]
            assert state["step"].item() == t
            expected = ref.expected_state()
            assert set(expected) <= set(state), (where, sorted(state))
            for key, value in expected.items():
                assert_equal(state[key], value, f"{where}: {key}")
            factored = ref.v_layout == "factored"
            v_keys = {"exp_avg_sq_row", "exp_avg_sq_col"} if factored else set()
            assert set(state) == set(expected) | v_keys | {"step"}, (where, sorted(state))
            if factored:
                check_factored(p, before[i], state, ref.new_m, c, where)
            else:
                assert_equal(p, ref.p.reshape(ref.shape), f"{where}: parameter")


def test_oracle_codebooks_follow_their_definitions():
    """DE: for i = 0, 1, 2 the midpoints of 2^i equal parts of [0.1, 1], times 10^(i - 2), both signs, with 0 and
    +1 (the bit table is within 1 ulp of it); linear: (i + 1) / 16, no zero."""
    magnitudes = [10.0 ** (i - 2) * (0.1 + 0.9 * (j + 0.5) / 2**i) for i in range(3) for j in range(2**i)]
    definition = np.sort(np.array([0.0, 1.0] + magnitudes + [-x for x in magnitudes], dtype=F32))
    assert np.all(np.abs(DE.astype(np.float64) - definition) <= np.spacing(np.abs(definition)))
    assert np.all(np.diff(DE) > 0) and LIN.tolist() == [(i + 1) / 16 for i in range(16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw4bit_equals_the_oracle_bit_for_bit(dtype):
    """Every layout of AdamW4bit, 12 steps: codes, scales, fp32 states and parameters identical to the oracle's."""
    run_against_the_oracle(AdamW4bit, dtype, seed=0)


def test_adamw4bit_factor_against_the_oracle():
    """AdamW4bitFactor, 12 steps: m (and every state of 1-D tensors) identical; R, C, p within the counted bounds."""
    run_against_the_oracle(AdamW4bitFactor, torch.float32, seed=1)
