"""AdamW with 4-bit states — Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States", arXiv 2309.01507.

Per parameter p with gradient g, step t (1-based), in fp32 whatever p's dtype (lpmm's order, PyTorch's AdamW eps):

    m, v <- dequant(state)                         (zeros at t = 1)
    p    <- p * (1 - lr * wd)                      (decoupled weight decay, before the Adam step)
    m    <- m + (1 - beta1) (g - m)
    v    <- beta2 v + (1 - beta2) g^2              (Factor, ndim >= 2: R, C below instead)
    p    <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)    (the new, unquantized m and v)
    state <- quant(m), quant(v)                    (quantization error only reaches the next step)

State of a tensor with more than ``min_quantized_numel`` elements: m as 4-bit codes with block-wise absmax (block
128, signed dynamic-exponent map); v as 4-bit codes of the linear map (i+1)/16 (no zero) with rank-1 scales min(row
absmax, column absmax) (n-d: min over per-dimension absmax, after dropping singleton dimensions). When fewer than
two non-singleton dimensions remain, v uses block-wise scales; this is also the path of the flat 1-D shards that
FSDP1 and DeepSpeed ZeRO hand to the optimizer. Smaller tensors keep fp32 m and v. Codes and block scales of a
tensor whose rows (dim-0 slices) are whole blocks are stored row by row, (n0, ...), the same bytes as the flat
layout, so that they shard with the rows.

DTensor parameters (FSDP2's ``fully_shard``: rows split across ranks, ``hf_ext.optim.sharded``) keep DTensor
states: the entries indexed by rows (``row_keys``) are sharded like the parameter, the rest replicated. Layouts are
chosen on the logical tensor, so they do not depend on the mesh. Statistics over rows are those of the whole
tensor: the rank-1 scales of dimensions other than dim 0 are MAX-reduced across the shard group before any v code
is chosen, and the factored means over rows are SUM-reduced; everything else is local. A quantized tensor whose
rows are not whole blocks (large 1-D tensors, odd row sizes) keeps its whole state on every rank and steps the
gathered parameter (warned once). 2 ranks compute what 1 process computes from the same gradients, except for
the order of the factored sums. ``AdamW4bitFactor`` replaces v of every tensor with ndim >= 2 by fp32 Adafactor
statistics (no eps added to g^2; a zero mean(R) divides as 1):

    R <- beta2 R + (1 - beta2) mean_last(g^2),   C <- beta2 C + (1 - beta2) mean_{-2}(g^2),
    v <- (R / mean_last(R))[..., :, None] * C[..., None, :]

The codebooks, quantizers and packing are ``hf_ext.kernels.quant4``'s. The quantized m / v step runs
``hf_ext.kernels.adamw4bit_step`` (Triton on CUDA, C on the CPU, the torch twin elsewhere); fp32 and factored states go
through that module's element-wise ops too (``next_m``, ``next_v``, ``stepped_param``: separately rounded fp32 ops,
correctly rounded sqrt), so every layout computes the same bits on every CPU, except for the factored means, reductions
whose summation order may depend on the CPU. The formula is ``torch.optim.AdamW``'s; torch evaluates it in another op
order (FMA-contracted ``lerp``, and on CPU MKL's sqrt, not correctly rounded on every CPU), so the two agree to a few
fp32 roundings of each term, not bit for bit. ``state_dict()`` holds plain tensors (uint8 codes, fp32 scales and
states, a CPU fp32 ``step``) and primitives, so ``torch.load(weights_only=True)`` reads it; loading keeps codes uint8
and scales fp32, reads each tensor's layout back from its keys and refuses (``StateDictError``) state dicts of other
optimizers, layouts other than the one the saved settings give the parameter, and values no step writes
(``state_value_problem``). Rounding is deterministic, so a resumed run is bit-identical to an uninterrupted one.

Every gradient is checked for NaN and Inf before anything is updated (``nonfinite_grads``): a tensor with a 4-bit
rank-1 v that a compiled kernel steps (from its first step), or a factored v of a plain tensor stepped by one, is
checked through the largest |g| of its step's statistics pass, run for all such tensors ahead of the steps; the
others by one multi-tensor inf-norm over their gradients.
"""

import math
import warnings
from typing import NamedTuple

import torch
from torch.optim import Optimizer

from hf_ext.kernels import adamw4bit_step as fused
from hf_ext.kernels import quant4
from hf_ext.optim import sharded


Q4_FORMAT = 2  # version of the state-dict layout below (lpmm tie-breaking and nibble order; 2: row-wise codes)
NONFINITE_POLICIES = ("raise", "skip")
M_LAYOUTS = ("fp32", "q4")
V_LAYOUTS = ("fp32", "block", "rank1", "factored")
VALID_LAYOUTS = {("fp32", "fp32"), ("fp32", "factored"), ("q4", "block"), ("q4", "rank1"), ("q4", "factored")}
LAYOUT_SETTINGS = ("quantize", "min_quantized_numel", "factor_second_moment")  # group keys that pick a layout


def state_spec(param: torch.Tensor, m_layout: str, v_layout: str, block_size: int) -> dict[str, tuple]:
    """The keys, dtypes and shapes of one parameter's state: the single definition used to create and to check it.

    Args:
        param: the parameter, N elements (only its shape is read).
        m_layout: one of ``M_LAYOUTS``; v_layout: one of ``V_LAYOUTS`` (together in ``VALID_LAYOUTS``).
        block_size: elements per quantisation block.

    Returns:
        key -> (dtype, shape): ``step`` fp32 (); m as ``exp_avg`` fp32 (param shape) or ``exp_avg_codes`` uint8
        (ceil(N / 2),) and ``exp_avg_absmax`` fp32 (ceil(N / block_size),); v as ``exp_avg_sq`` fp32 (param
        shape), block-wise codes and ``exp_avg_sq_absmax``, rank-1 codes and ``exp_avg_sq_stat{k}`` fp32 (n_k,)
        per dimension of the squeezed shape, or factored ``exp_avg_sq_row`` fp32 shape[:-1] and
        ``exp_avg_sq_col`` fp32 shape[:-2] + shape[-1:]. Where ``whole_block_rows`` holds, codes are (n0, N / (2
        n0)) and block scales (n0, N / (block_size n0)): the flat arrays, row by row.
    """
    numel, shape = param.numel(), tuple(param.shape)
    packed, blocks = (math.ceil(numel / 2),), (quant4.num_blocks(numel, block_size),)
    if whole_block_rows(shape, block_size):
        packed, blocks = (shape[0], numel // shape[0] // 2), (shape[0], numel // shape[0] // block_size)
    spec = {"step": (torch.float32, ())}
    if m_layout == "fp32":
        spec["exp_avg"] = (torch.float32, shape)
    else:
        spec.update(exp_avg_codes=(torch.uint8, packed), exp_avg_absmax=(torch.float32, blocks))
    if v_layout == "fp32":
        spec["exp_avg_sq"] = (torch.float32, shape)
    elif v_layout == "block":
        spec.update(exp_avg_sq_codes=(torch.uint8, packed), exp_avg_sq_absmax=(torch.float32, blocks))
    elif v_layout == "rank1":
        spec["exp_avg_sq_codes"] = (torch.uint8, packed)
        for k, size in enumerate(quant4.squeezed_shape(shape)):
            spec[f"exp_avg_sq_stat{k}"] = (torch.float32, (size,))
    else:
        spec["exp_avg_sq_row"] = (torch.float32, shape[:-1])
        spec["exp_avg_sq_col"] = (torch.float32, shape[:-2] + shape[-1:])
    return spec


def whole_block_rows(shape: tuple[int, ...], block_size: int) -> bool:
    """Whether every dim-0 slice of a tensor of ``shape`` is a whole number of quantisation blocks (ndim >= 2):
    then its codes and block scales split at row boundaries."""
    return len(shape) >= 2 and shape[0] > 0 and (math.prod(shape) // shape[0]) % block_size == 0


def row_keys(shape: tuple[int, ...], spec: dict[str, tuple]) -> set[str]:
    """The state entries whose dim 0 indexes the parameter's rows, which shard with them under FSDP2.

    Args:
        shape: the parameter's (logical) shape; spec: its ``state_spec``.

    Returns:
        fp32 moments, row-wise codes and block scales, the factored row statistic (and the column one for ndim >=
        3) and the rank-1 statistic of dim 0 when dim 0 is not a singleton; never ``step``. None at all when m's
        codes are flat (rows that are not whole blocks): that state is replicated whole (``shards_state``).
    """
    if "exp_avg_codes" in spec and len(spec["exp_avg_codes"][1]) == 1:
        return set()
    keys = {"exp_avg", "exp_avg_sq", "exp_avg_sq_row"} & spec.keys()
    keys |= {
        k
        for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
        if len(spec.get(k, ((), ()))[1]) == 2
    }
    if "exp_avg_sq_stat0" in spec and shape[0] != 1:
        keys.add("exp_avg_sq_stat0")
    if "exp_avg_sq_col" in spec and len(shape) >= 3:
        keys.add("exp_avg_sq_col")
    return keys


def shards_state(shape: tuple[int, ...], m_layout: str, block_size: int) -> bool:
    """Whether a DTensor parameter's state can be sharded with its rows: fp32 m, or codes that split at rows."""
    return m_layout == "fp32" or whole_block_rows(shape, block_size)


def state_layout(state: dict) -> tuple[str, str] | None:
    """The layout of a state, read back from its keys.

    Args:
        state: one parameter's state dict (keys as ``state_spec`` names them).

    Returns:
        (m layout, v layout), a member of ``VALID_LAYOUTS``, or None when the keys match no known layout.
    """
    m_layout = "fp32" if "exp_avg" in state else "q4"
    if "exp_avg_sq" in state:
        v_layout = "fp32"
    elif "exp_avg_sq_row" in state:
        v_layout = "factored"
    elif "exp_avg_sq_stat0" in state:
        v_layout = "rank1"
    else:
        v_layout = "block"
    return (m_layout, v_layout) if (m_layout, v_layout) in VALID_LAYOUTS else None


def choose_layout(param: torch.Tensor, group: dict) -> tuple[str, str]:
    """The layout of a fresh state: fp32 up to ``min_quantized_numel`` elements, rank-1 v when >= 2 non-singleton
    dims, block-wise v otherwise, factored v for ndim >= 2 under ``factor_second_moment``.

    Args:
        param: the parameter (only its shape is read).
        group: its param group (``quantize``, ``min_quantized_numel``, ``factor_second_moment``).

    Returns:
        (m layout, v layout), a member of ``VALID_LAYOUTS``.
    """
    quantized = group["quantize"] and param.numel() > group["min_quantized_numel"]
    if group["factor_second_moment"] and param.dim() >= 2:
        return ("q4" if quantized else "fp32"), "factored"
    if not quantized:
        return "fp32", "fp32"
    return "q4", "rank1" if quant4.uses_rank1(param.shape) else "block"


def _largest_magnitudes(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """max |g| of each gradient as a 0-d fp32 tensor, NaN when it holds one, from one reading pass of all of them
    (``torch._foreach_norm``'s inf-norm, a multi-tensor reduction that propagates NaN); 0 for an empty gradient (an
    empty shard)."""
    nonempty = [g for g in grads if g.numel()]
    norms = iter(torch._foreach_norm(nonempty, float("inf")) if nonempty else [])
    return [next(norms) if g.numel() else g.new_zeros(()) for g in grads]


def _finite(magnitudes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whether each 0-d magnitude is finite, as 0-d bool tensors: two launches when they share a device."""
    if len({m.device for m in magnitudes}) == 1:
        return list(torch.stack(magnitudes).isfinite().unbind())
    return [m.isfinite() for m in magnitudes]


def state_nbytes(optimizer: Optimizer) -> int:
    """Bytes held in the tensors of any optimizer's ``state`` (for AdamW4bit: codes, scales, fp32 states, steps).

    Args:
        optimizer: any ``torch.optim.Optimizer``.

    Returns:
        The sum of ``numel * element_size`` over the tensor values of every parameter's state; a tensor subclass
        that wraps inner tensors (``__tensor_flatten__``: torchao's quantized states, DTensor) counts those.
    """
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(_tensor_nbytes(t) for t in tensors)


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    names = tensor.__tensor_flatten__()[0] if hasattr(type(tensor), "__tensor_flatten__") else []
    inner = [getattr(tensor, name) for name in names if torch.is_tensor(getattr(tensor, name))]
    if inner:
        return sum(_tensor_nbytes(t) for t in inner)
    return tensor.numel() * tensor.element_size()


class StateDictError(ValueError):
    """A state dict that ``AdamW4bit.load_state_dict`` refuses. ``param`` is the live parameter whose saved state is
    at fault (None for faults of the whole dict), so that a caller knowing parameter names and files can add them."""

    def __init__(self, message: str, param: torch.Tensor | None = None):
        super().__init__(message)
        self.param = param


def state_value_problem(state: dict, param: torch.Tensor, m_layout: str, v_layout: str, block_size: int):
    """The first entry of one parameter's state that holds values no step writes.

    Args:
        state: the state, its keys, dtypes and shapes already checked against ``state_spec``.
        param: the parameter it belongs to (only its shape is read).
        m_layout, v_layout: the state's layout (``state_layout``).
        block_size: elements per quantisation block.

    Returns:
        (key, what is wrong) as two strings, or None when every value could have been written by a step.

    A step writes a whole ``step`` >= 1, finite fp32 tensors, scales and second moments >= 0, and codes that agree
    with their scales: where a scale is 0 every code is the zero code (m: ``DE_ZERO_CODE``, v: ``LINEAR_ZERO_CODE``),
    where it is > 0 its block (rank-1: its row, column, ... of the squeezed shape) holds the code of +-1 (m: 0 or
    15, v: 15), which its largest element gets; rank-1 statistics share one maximum (the largest v); and the pad
    nibble of an odd-sized tensor is the zero code.
    """
    numel, step = param.numel(), state["step"]
    if not (torch.isfinite(step) and step >= 1 and step == step.round()):
        return "step", f"is {step.item()}, not a whole number >= 1"
    for key, value in state.items():
        if key == "step" or value.dtype != torch.float32:
            continue
        if not torch.isfinite(value).all():
            first = (~torch.isfinite(value)).flatten().nonzero()[0].item()
            return key, f"holds NaN or Inf (first at flat index {first}: {value.flatten()[first].item()})"
        if key != "exp_avg" and (value < 0).any():
            first = (value < 0).flatten().nonzero()[0].item()
            return key, f"holds a negative value (flat index {first}: {value.flatten()[first].item()})"
    if m_layout == "q4":
        codes, scales = state["exp_avg_codes"].reshape(-1), state["exp_avg_absmax"].reshape(-1)
        problem = _blockwise_codes_problem(codes, scales, numel, block_size, quant4.DE_ZERO_CODE, (0, 15))
        if problem:
            return "exp_avg_codes", problem
    if v_layout == "block":
        codes, scales = state["exp_avg_sq_codes"].reshape(-1), state["exp_avg_sq_absmax"].reshape(-1)
        problem = _blockwise_codes_problem(codes, scales, numel, block_size, quant4.LINEAR_ZERO_CODE, (15,))
        if problem:
            return "exp_avg_sq_codes", problem
    if v_layout == "rank1":
        stats = [state[f"exp_avg_sq_stat{k}"] for k in range(len(quant4.squeezed_shape(param.shape)))]
        return _rank1_codes_problem(state["exp_avg_sq_codes"].reshape(-1), stats, numel)
    return None


def _pad_problem(nibbles: torch.Tensor, numel: int, zero_code: int) -> str | None:
    if numel % 2 and nibbles[-1] != zero_code:
        return (
            f"has pad nibble {nibbles[-1].item()} (the high 4 bits of the last byte, as the tensor has an odd number "
            f"of elements, {numel}), expected the zero code {zero_code}"
        )
    return None


def _blockwise_codes_problem(packed, scales, numel: int, block_size: int, zero_code: int, top_codes: tuple):
    nibbles = quant4.unpack_4bit(packed, 2 * packed.numel())
    problem = _pad_problem(nibbles, numel, zero_code)
    if problem:
        return problem
    codes = quant4.as_blocks(nibbles[:numel], block_size)
    valid = quant4.as_blocks(torch.ones(numel, dtype=torch.bool, device=packed.device), block_size)
    stray = ((scales == 0)[:, None] & valid & (codes != zero_code)).any(dim=1)
    if stray.any():
        block = stray.nonzero()[0].item()
        return f"has codes other than the zero code {zero_code} in block {block}, whose scale is 0 (an all-zero block)"
    top = (valid & torch.isin(codes, torch.tensor(top_codes, device=codes.device))).any(dim=1)
    missing = (scales > 0) & ~top
    if missing.any():
        block = missing.nonzero()[0].item()
        return (
            f"has no code {' or '.join(map(str, top_codes))} in block {block}, whose scale is "
            f"{scales[block].item()} > 0 (its largest element, at +-scale, gets one)"
        )
    return None


def _rank1_codes_problem(packed, stats: list[torch.Tensor], numel: int) -> tuple | None:
    nibbles = quant4.unpack_4bit(packed, 2 * packed.numel())
    problem = _pad_problem(nibbles, numel, quant4.LINEAR_ZERO_CODE)
    if problem:
        return "exp_avg_sq_codes", problem
    for k, stat in enumerate(stats[1:], start=1):
        if stat.max() != stats[0].max():
            return (
                f"exp_avg_sq_stat{k}",
                f"has maximum {stat.max().item()}, exp_avg_sq_stat0 {stats[0].max().item()}: both are the largest v",
            )
    codes = nibbles[:numel].view([stat.numel() for stat in stats])
    for k, stat in enumerate(stats):
        others = tuple(d for d in range(codes.dim()) if d != k)
        zero_line, top_line = (codes == quant4.LINEAR_ZERO_CODE).all(dim=others), (codes == 15).any(dim=others)
        wrong = ((stat == 0) & ~zero_line) | ((stat > 0) & ~top_line)
        if wrong.any():
            i = wrong.nonzero()[0].item()
            expected = f"all {quant4.LINEAR_ZERO_CODE}" if stat[i] == 0 else "a code 15 (its largest element's)"
            return (
                "exp_avg_sq_codes",
                f"disagree with exp_avg_sq_stat{k}[{i}] = {stat[i].item()}: index {i} of dimension {k} should hold "
                f"{expected}",
            )
    return None


def _check_group(owner: str, group: dict) -> None:
    """Clear errors for invalid hyper-parameters; ``owner`` names the optimizer class."""

    def fail(name: str, allowed: str) -> None:
        raise ValueError(f"{owner}: {name} must be {allowed}, got {group[name]!r}.")

    def is_number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (is_number(group["lr"]) and group["lr"] >= 0):
        fail("lr", "a finite float >= 0 (a Python number; tensor learning rates are not supported)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        fail("betas", "a pair (beta1, beta2) of floats in [0, 1)")
    group["betas"] = tuple(betas)
    if not (is_number(group["eps"]) and group["eps"] >= 0):
        fail("eps", "a finite float >= 0")
    if not (is_number(group["weight_decay"]) and group["weight_decay"] >= 0):
        fail("weight_decay", "a finite float >= 0")
    block = group["block_size"]
    if not (isinstance(block, int) and not isinstance(block, bool) and block >= 2 and block & (block - 1) == 0):
        fail("block_size", "a power-of-two int >= 2 (the paper uses 128)")
    threshold = group["min_quantized_numel"]
    if not (isinstance(threshold, int) and not isinstance(threshold, bool) and threshold >= 0):
        fail("min_quantized_numel", "an int >= 0 (states of tensors with more elements are quantized)")
    if group["nonfinite_grads"] not in NONFINITE_POLICIES:
        fail("nonfinite_grads", f"one of {NONFINITE_POLICIES}")


class _Prepared(NamedTuple):
    """What ``AdamW4bit._prepass`` readies for one parameter's step."""

    step: object  # a rank-1 StepJob with this step's statistics, or a factored step's (row, column) means of g^2
    grad_max: torch.Tensor | None  # the largest |g| from the same read; None when that pass gives none
    fresh_state: dict | None = None  # a first step's state the job was built on, kept once the parameter steps


class AdamW4bit(Optimizer):
    """AdamW with 4-bit states (arXiv 2309.01507): m block-wise with the DE map, v rank-1 with the linear map without
    zero; the update and the layouts are in the module docstring.

    Args:
        params: parameters or param groups, as for ``torch.optim.Optimizer``: fp32, bf16 or fp16 tensors, not
            DTensor. A group may set ``quantize=False`` to keep fp32 states for its tensors (e.g. embeddings, bnb's
            convention).
        lr: learning rate, a finite Python float >= 0.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the bias-corrected sqrt(v), >= 0.
        weight_decay: decoupled weight decay, >= 0.
        block_size: elements per quantisation block, a power of two >= 2.
        min_quantized_numel: states of tensors with more elements than this are quantized (lpmm's
            ``numel > 4096``); smaller tensors keep fp32 states.
        nonfinite_grads: "raise" raises a ValueError naming the parameter before anything is updated; "skip" leaves
            that parameter and its state untouched for this step and updates the others.

    Raises:
        ValueError: on an invalid hyper-parameter, here or in ``add_param_group``.
    """

    factor_second_moment = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        block_size: int = 128,
        min_quantized_numel: int = 4096,
        nonfinite_grads: str = "raise",
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            min_quantized_numel=min_quantized_numel,
            nonfinite_grads=nonfinite_grads,
            factor_second_moment=self.factor_second_moment,
            quantize=True,
            q4_format=Q4_FORMAT,
        )
        _check_group(type(self).__name__, defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(type(self).__name__, self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient, in place, with its state.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss (run with grad enabled).

        Returns:
            The closure's loss, or None without a closure.

        Raises:
            ValueError: a gradient holds NaN or Inf under ``nonfinite_grads="raise"`` (nothing is updated).
            RuntimeError: a sparse gradient. TypeError: a DTensor parameter that is not sharded along dim 0 only.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [
            (group, index, p)
            for group in self.param_groups
            for index, p in enumerate(group["params"])
            if p.grad is not None
        ]
        for _, _, p in work:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
        splits = [sharded.shards_of(p, type(self).__name__) for _, _, p in work]
        prepared = self._prepass(work, splits)
        finite = self._finite_grads([p for _, _, p in work], splits, prepared)
        for (group, index, p), ok in zip(work, finite, strict=True):
            if not ok and group["nonfinite_grads"] == "raise":
                raise ValueError(self._nonfinite_message(group, index, p))
        fused_jobs = {}  # (block_size, rank-1 v) -> the 4-bit steps; "fp32" -> fp32-state steps; run together
        for (group, _, p), shards, ok, ready in zip(work, splits, finite, prepared, strict=True):
            if ok:
                self._update(p, group, shards, fused_jobs, ready)
        for key, jobs in fused_jobs.items():
            if key == "fp32":
                self._fp32_steps(jobs)
            else:
                fused.adamw4bit_steps(jobs, *key)
        return loss

    def _prepass(self, work: list, splits: list) -> list:
        """The first pass over g of the steps that have one, run for all of them before anything changes, so that
        the largest |g| it gives checks g without another read. For each ``work[i]``, a ``_Prepared`` or None:

        - a 4-bit rank-1 v stepped by a compiled kernel (plain or row-sharded tensor): its ``StepJob`` for this step
          with the new statistics (``fused.rank1_statistics_pass``; its g and old v codes read once). On a first step
          the job is built on a fresh state (zero m and v), kept aside until the parameter steps;
        - a factored v of a plain tensor: the means of g^2 (``fused.squared_means``; |g|max from its Triton or C pass).

        Nothing in ``self.state`` changes here."""
        prepared: list = [None] * len(work)
        jobs, where = [], []
        for i, ((group, _, p), shards) in enumerate(zip(work, splits, strict=True)):
            state = self.state.get(p, {})  # no entry is created for a parameter that has no state yet
            layout = state_layout(state) if state else choose_layout(p, group)
            if layout == ("q4", "rank1"):
                fresh = None
                if not state:
                    state = fresh = {}
                    self._init_state(p, group, fresh, shards)
                if local := self._local_step(p, state, group, shards):
                    jobs.append(self._job(*local, self._scalars(group, state["step"].item() + 1)))
                    where.append((i, fresh))
            elif layout[1] == "factored" and shards is None:
                *means, grad_max = fused.squared_means(p.grad)
                prepared[i] = _Prepared(means, grad_max)
        for (i, fresh), job, grad_max in zip(where, jobs, fused.rank1_statistics_pass(jobs), strict=True):
            if grad_max is not None:
                prepared[i] = _Prepared(job, grad_max, fresh)
        return prepared

    def _finite_grads(self, params: list[torch.Tensor], splits: list, prepared: list) -> list[bool]:
        """Whether each gradient is finite: from the largest |g| of ``prepared`` (``_prepass``), else from one
        multi-tensor read; one device sync for all of them (per device), DTensor flags agreed across their shard
        group."""
        magnitudes = [None if ready is None else ready.grad_max for ready in prepared]
        rest = [i for i, magnitude in enumerate(magnitudes) if magnitude is None]
        for i, magnitude in zip(rest, _largest_magnitudes([sharded.local(params[i].grad) for i in rest]), strict=True):
            magnitudes[i] = magnitude
        flags = sharded.all_finite(splits, _finite(magnitudes))
        if len({f.device for f in flags}) == 1:
            return torch.stack(flags).tolist() if flags else []
        return [bool(f) for f in flags]

    def _nonfinite_message(self, group: dict, index: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        where = f"param_groups[{self.param_groups.index(group)}]['params'][{index}]"
        name = f"'{names[index]}' ({where})" if names else where
        return (
            f"{type(self).__name__}: the gradient of parameter {name}, shape {tuple(p.shape)}, holds NaN or Inf. "
            "Nothing was updated. Lower the learning rate or loss scale, clip gradients, or pass "
            "nonfinite_grads='skip' to skip such parameters' updates (their state stays untouched)."
        )

    def _init_state(self, p: torch.Tensor, group: dict, state: dict, shards) -> None:
        m_layout, v_layout = choose_layout(p, group)
        spec = state_spec(p, m_layout, v_layout, group["block_size"])
        rows = row_keys(tuple(p.shape), spec) if shards else set()
        if shards and not rows and m_layout == "q4":
            self._warn_replicated(p, group)
        for key, (dtype, shape) in spec.items():
            device = "cpu" if key == "step" else sharded.local(p).device
            fill = 0x11 * quant4.DE_ZERO_CODE if key == "exp_avg_codes" else 0  # m = 0 is code 7 in both nibbles
            local_shape = (shards.local_rows, *shape[1:]) if key in rows else shape
            value = torch.full(local_shape, fill, dtype=dtype, device=device)
            state[key] = shards.wrap(value, shape, key in rows) if shards and key != "step" else value

    def _warn_replicated(self, p: torch.Tensor, group: dict) -> None:
        if getattr(self, "_warned_replicated", False):
            return
        self._warned_replicated = True
        warnings.warn(
            f"{type(self).__name__}: a sharded parameter of shape {tuple(p.shape)} has rows that are not whole "
            f"quantisation blocks (block_size={group['block_size']}), so its 4-bit state is kept whole on every rank "
            "and it steps the gathered parameter (other such parameters are not named again). Raise "
            "min_quantized_numel above its size to keep fp32 states sharded instead.",
            stacklevel=4,
        )

    def _update(self, p: torch.Tensor, group: dict, shards, fused_jobs: dict, ready=None) -> None:
        """Step ``p`` and its state, or add its 4-bit step to ``fused_jobs``; ``shards``: ``sharded.shards_of(p)``;
        ``ready``: the ``_Prepared`` of ``_prepass`` for its step, if any."""
        state = self.state[p]
        if not state and ready is not None and ready.fresh_state is not None:
            state.update(ready.fresh_state)
        elif not state:
            self._init_state(p, group, state, shards)
        state["step"] += 1
        layout, block_size = state_layout(state), group["block_size"]
        if ready is not None and isinstance(ready.step, fused.StepJob):
            fused_jobs.setdefault((block_size, True), []).append(ready.step)
            return
        scalars = self._scalars(group, state["step"].item())
        local = self._local_step(p, state, group, shards)
        if local is not None:
            means = None if ready is None else ready.step
            self._step_tensor(*local, scalars, block_size, layout, fused_jobs, means=means)
        else:  # replicated state: step the gathered parameter now, keep this rank's rows
            whole, local_state = p.full_tensor(), {k: sharded.local(v) for k, v in state.items()}
            self._step_tensor(whole, p.grad.full_tensor(), local_state, None, scalars, block_size, layout, None)
            p.to_local().copy_(shards.rows_of(whole))

    @staticmethod
    def _scalars(group: dict, step: int) -> fused.StepScalars:
        beta1, beta2 = group["betas"]
        return fused.StepScalars.from_group(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step)

    @staticmethod
    def _local_step(p: torch.Tensor, state: dict, group: dict, shards):
        """(param, grad, state, shards) as the step takes them: ``p`` itself for a plain tensor; this rank's rows, its
        state's local tensors and ``shards`` for a DTensor with a sharded state; None for a replicated state."""
        if shards is None:
            return p, p.grad, state, None
        if not shards_state(p.shape, state_layout(state)[0], group["block_size"]):
            return None
        return p.to_local(), p.grad.to_local(), {k: sharded.local(v) for k, v in state.items()}, shards

    def _step_tensor(self, p, grad, state, shards, scalars, block_size, layout, fused_jobs, means=None) -> None:
        """Step a plain tensor ``p`` (a shard's rows when ``shards`` is set) with its plain state tensors; a 4-bit or
        fp32-state step joins ``fused_jobs`` (run at once when it is None); ``means``: a factored step's means of g^2
        when ``_prepass`` has them."""
        m_layout, v_layout = layout
        if m_layout == "q4" and v_layout in ("block", "rank1"):
            job = self._job(p, grad, state, shards, scalars)
            if fused_jobs is None:
                fused.adamw4bit_steps([job], block_size, v_layout == "rank1")
            else:
                fused_jobs.setdefault((block_size, v_layout == "rank1"), []).append(job)
        elif layout == ("fp32", "fp32"):
            job = (p, grad, state, scalars)
            if fused_jobs is None:
                self._fp32_steps([job])
            else:
                fused_jobs.setdefault("fp32", []).append(job)
        else:
            self._factored_step(p, grad, state, scalars, block_size, m_layout, shards, means)

    def _job(self, p, grad, state: dict, shards, scalars: fused.StepScalars) -> fused.StepJob:
        """The 4-bit step of plain tensors ``p`` and ``grad`` with their 4-bit ``state`` (``_step_tensor``'s)."""
        rank1 = "exp_avg_sq_stat0" in state
        if rank1:  # as many statistics as the logical tensor has non-singleton dims (a shard may have one row)
            count = sum(k.startswith("exp_avg_sq_stat") for k in state)
            v_scales = [state[f"exp_avg_sq_stat{k}"] for k in range(count)]
        else:
            v_scales = [state["exp_avg_sq_absmax"].view(-1)]
        reduce = self._rank1_reduce(shards) if rank1 and shards else None
        return fused.StepJob(
            p, grad, state["exp_avg_codes"].view(-1), state["exp_avg_absmax"].view(-1),
            state["exp_avg_sq_codes"].view(-1), v_scales, scalars, reduce,
        )  # fmt: skip

    @staticmethod
    def _rank1_reduce(shards):
        """MAX across the shard group of the statistics that run over rows: all but dim 0's own (all of them when
        dim 0 is a singleton, which then is not a statistic's dimension)."""
        return lambda new: shards.all_max(new[1:] if shards.rows != 1 else new)

    @staticmethod
    def _fp32_steps(jobs: list) -> None:
        """fp32 m and v of many tensors (``(p, grad, state, scalars)`` each), stepped together
        (``fused.adamw_fp32_steps``: one Triton launch per 64 tensors on CUDA)."""
        params, grads, states, scalars = (list(column) for column in zip(*jobs, strict=True))
        ms, vs = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
        fused.adamw_fp32_steps(params, grads, ms, vs, scalars)

    def _factored_step(self, p, grad, state, scalars, block_size, m_layout, shards, means=None) -> None:
        """Factored v: its statistics, then the fused step with v = (R / mean(R)) C (``adamw4bit_step_factored``) for
        4-bit m, the element-wise ops for fp32 m."""
        ratio, col = self._factored_second_moment(state, grad, scalars, shards, means)
        if m_layout == "q4":
            if p.numel():  # an empty shard took part in the factored sums above
                codes, absmax = state["exp_avg_codes"].view(-1), state["exp_avg_absmax"].view(-1)
                fused.adamw4bit_step_factored(p, grad, codes, absmax, ratio, col, scalars, block_size)
            return
        exp_avg = fused.next_m([state["exp_avg"]], [grad.float()], [scalars])[0]
        state["exp_avg"].copy_(exp_avg)
        p.copy_(fused.stepped_param([p.float()], [exp_avg], [fused.factored_v(ratio, col)], [scalars])[0])

    @staticmethod
    def _factored_second_moment(state: dict, grad: torch.Tensor, scalars, shards=None, means=None):
        """Update R, C in place (separately rounded fp32 ops) from the means of g^2 (``fused.squared_means``, or
        ``means`` when given) and return (R / mean(R), C), the factors of the new v (``fused.factored_v``); for a 2-D
        shard, the means over rows are sums across the shard group (``fused.squared_sums``) over the global row
        count."""
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]

        def mean_over_rows(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
            if shards is None or grad.dim() != 2:
                return x.mean(dim=dim, keepdim=keepdim)
            total = x.sum(dim=dim, keepdim=keepdim)
            shards.all_sum([total])
            return total / shards.rows

        if means is not None:
            row_in, col_in = means
        elif shards is None or grad.dim() != 2:
            row_in, col_in, _ = fused.squared_means(grad)
        else:  # this shard's rows are whole: their means are local, the column sums are summed across the group
            row_sums, col_sums = (sums.double() for sums in fused.squared_sums(grad)[:2])  # one dtype on every rank
            shards.all_sum([col_sums])
            row_in, col_in = (row_sums / grad.shape[-1]).float(), (col_sums / shards.rows).float()
        row.copy_(row * scalars.beta2 + scalars.one_minus_beta2 * row_in)
        col.copy_(col * scalars.beta2 + scalars.one_minus_beta2 * col_in)
        row_mean = mean_over_rows(row, -1, keepdim=True)
        row_mean = torch.where(row_mean > 0, row_mean, torch.ones_like(row_mean))
        return row / row_mean, col

    def load_state_dict(self, state_dict: dict) -> None:
        """Check the layout of every state against its parameter, then load without casting codes or scales.

        Saved DTensor entries are gathered whole for the checks; a DTensor parameter's entries are then split as its
        own state would be (``row_keys``), whatever mesh or state-dict type saved them.
        """
        owner = type(self).__name__
        whole = {i: {k: sharded.full(v) for k, v in saved.items()} for i, saved in state_dict.get("state", {}).items()}
        state_dict = {**state_dict, "state": whole} if isinstance(state_dict, dict) else state_dict
        id_map = self._check_state_dict(state_dict)
        loaded = {}
        for index, saved in state_dict["state"].items():
            p = id_map[index]
            loaded[p] = {k: v.to("cpu" if k == "step" else p.device).clone() for k, v in saved.items()}
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:
            _check_group(owner, group)
            for p in group["params"]:
                if p in loaded:
                    self.state[p] = self._placed(p, loaded[p], group["block_size"])

    def _placed(self, p: torch.Tensor, state: dict, block_size: int) -> dict:
        """A checked, whole state as ``p`` keeps it: as it is for a plain tensor, DTensors split like ``_init_state``
        for a DTensor parameter."""
        shards = sharded.shards_of(p, type(self).__name__)
        if shards is None:
            return state
        m_layout, v_layout = state_layout(state)
        rows = row_keys(tuple(p.shape), state_spec(p, m_layout, v_layout, block_size))
        return {
            k: v
            if k == "step"
            else shards.wrap((shards.rows_of(v) if k in rows else v).contiguous(), v.shape, k in rows)
            for k, v in state.items()
        }

    def _check_state_dict(self, state_dict: dict) -> dict:
        """Saved parameter index -> live parameter, after refusing foreign or mismatched state dicts."""
        owner = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise StateDictError(f"{owner}.load_state_dict: expected a dict with 'state' and 'param_groups'.")
        saved_groups = state_dict["param_groups"]
        for i, group in enumerate(saved_groups):
            if group.get("q4_format") != Q4_FORMAT:
                raise StateDictError(
                    f"{owner}.load_state_dict: param_groups[{i}] has q4_format={group.get('q4_format')!r}, expected "
                    f"{Q4_FORMAT}: this state dict was not saved by AdamW4bit/AdamW4bitFactor (of this version). "
                    "Load it into the optimizer that saved it, or start this optimizer from a fresh state."
                )
        if len(saved_groups) != len(self.param_groups):
            raise StateDictError(
                f"{owner}.load_state_dict: {len(saved_groups)} saved param groups, the optimizer has "
                f"{len(self.param_groups)}."
            )
        id_map = {}
        for i, (saved, live) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(live["params"]):
                raise StateDictError(
                    f"{owner}.load_state_dict: param_groups[{i}] saved {len(saved['params'])} parameters, "
                    f"the optimizer has {len(live['params'])}."
                )
            if saved.get("factor_second_moment") != live["factor_second_moment"]:
                raise StateDictError(
                    f"{owner}.load_state_dict: param_groups[{i}] was saved with factor_second_moment="
                    f"{saved.get('factor_second_moment')}, this optimizer uses {live['factor_second_moment']} "
                    "(AdamW4bit and AdamW4bitFactor states do not mix)."
                )
            id_map.update({index: (p, saved) for index, p in zip(saved["params"], live["params"], strict=True)})
        for index, state in state_dict["state"].items():
            if index not in id_map:
                raise StateDictError(f"{owner}.load_state_dict: state for unknown parameter index {index!r}.")
            self._check_param_state(index, state, *id_map[index])
        return {index: p for index, (p, _) in id_map.items()}

    def _check_param_state(self, index, state: dict, p: torch.Tensor, group: dict) -> None:
        """Keys, dtypes and shapes of the saved layout, that layout against the one the saved settings give ``p``,
        then the values (``state_value_problem``)."""
        owner = type(self).__name__
        where = f"{owner}.load_state_dict: state of parameter {index} (shape {tuple(p.shape)})"
        layout = state_layout(state)
        spec = state_spec(p, *layout, group["block_size"]) if layout is not None else {}
        if layout is None or set(state) != set(spec):
            raise StateDictError(
                f"{where} has keys {sorted(state)}, which match no {owner} layout (expected e.g. "
                f"{sorted(spec) or 'exp_avg_codes'}).",
                p,
            )
        for key, (dtype, shape) in spec.items():
            value = state[key]
            if not torch.is_tensor(value) or value.dtype != dtype or tuple(value.shape) != shape:
                got = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
                raise StateDictError(
                    f"{where}: state['{key}'] is {got}, expected {dtype} {shape}. The state dict belongs to another "
                    "model or block_size.",
                    p,
                )
        expected = choose_layout(p, group)
        if layout != expected:
            settings = ", ".join(f"{k}={group[k]}" for k in LAYOUT_SETTINGS)
            raise StateDictError(
                f"{where} has layout m={layout[0]}, v={layout[1]}, but the settings it was saved with ({settings}) "
                f"give this shape m={expected[0]}, v={expected[1]}: the state dict belongs to another model or was "
                "edited.",
                p,
            )
        problem = state_value_problem(state, p, *layout, group["block_size"])
        if problem is not None:
            key, what = problem
            raise StateDictError(
                f"{where}: state['{key}'] {what}. No {owner} step writes this: the state dict is damaged or was "
                "edited. Load an undamaged one (an earlier checkpoint) or start this optimizer from a fresh state.",
                p,
            )


class AdamW4bitFactor(AdamW4bit):
    """4-bit Factor: 4-bit m as in AdamW4bit; v of tensors with ndim >= 2 as fp32 row/column (Adafactor) statistics.

    1-D tensors keep AdamW4bit's block-wise 4-bit v (or fp32 states when small). Same arguments as AdamW4bit.
    """

    factor_second_moment = True
