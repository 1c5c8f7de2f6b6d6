"""The one dispatch rule of hf_ext's kernels: Triton on CUDA tensors when it imports and is not disabled
(``HF_EXT_DISABLE_TRITON=1``); on CPU tensors, a kernel's C version where it has one and it builds
(``hf_ext.kernels.cpu_library``; ``HF_EXT_DISABLE_CPU_KERNELS=1`` disables them); the kernel's torch twin elsewhere.
Triton is optional: without it (or when importing it fails) ``triton`` and ``tl`` are None here and every kernel
module runs its twin. The twin is the slow path on CUDA and where a C version exists, so falling back to it there is
said once per kernel in a warning."""

import functools
import os
import warnings

import torch

from hf_ext.kernels import cpu_library


try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except Exception as error:  # noqa: BLE001 - a broken install raises more than ImportError  # pragma: no cover
    triton = tl = None
    TRITON_IMPORT_ERROR = error

# Compile options every launch passes, so that no Triton version's default decides whether a multiply and an add
# contract into one FMA: off where a kernel must round as its twin, bit for bit; on where it is held to fp32 rounding.
TWIN_ROUNDING = {"enable_fp_fusion": False}
FMA_ALLOWED = {"enable_fp_fusion": True}


def triton_disabled() -> bool:
    return os.environ.get("HF_EXT_DISABLE_TRITON", "0").lower() in ("1", "true", "yes")


def use_triton(tensor: torch.Tensor, kernel: str) -> bool:
    """Whether ``kernel`` runs its Triton version on ``tensor``; warns once per kernel when CUDA lacks Triton."""
    if not tensor.is_cuda or triton_disabled():
        return False
    if triton is None:
        _warn_twin_runs(
            kernel,
            "CUDA",
            f"Triton is unavailable ({TRITON_IMPORT_ERROR!r})",
            "Install a Triton that matches torch (`pip install triton`)",
            "HF_EXT_DISABLE_TRITON",
        )
        return False
    return True


def cpu_kernel(tensor: torch.Tensor, kernel: str):
    """The loaded C library of ``kernel`` (``hf_ext/kernels/<kernel>.c``) when it runs on ``tensor``, else None;
    warns once per kernel when the library cannot be built, since the twin is the slow path then."""
    if tensor.device.type != "cpu" or cpu_library.cpu_kernels_disabled():
        return None
    library = cpu_library.load(kernel)
    if library is None:
        _warn_twin_runs(
            kernel,
            "the CPU",
            f"its C version could not be built ({cpu_library.load_error(kernel)})",
            "Install a C compiler (gcc or clang, or set CC)",
            "HF_EXT_DISABLE_CPU_KERNELS",
        )
    return library


@functools.cache
def _warn_twin_runs(kernel: str, where: str, reason: str, remedy: str, switch: str) -> None:
    """Say once per kernel and cause that its pure-torch twin runs where a faster version was expected."""
    warnings.warn(
        f"hf_ext kernel {kernel!r}: {reason}, so its pure-torch twin runs on {where} (correct, slower). {remedy}, or "
        f"set {switch}=1 to choose the twin and silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
