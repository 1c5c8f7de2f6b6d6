"""The one dispatch rule of hf_ext's kernels: Triton on CUDA tensors when it imports and is not disabled
(``HF_EXT_DISABLE_TRITON=1``), the kernel's torch twin elsewhere. Triton is optional: without it (or when importing
it fails) ``triton`` and ``tl`` are None here and every kernel module runs its twin; on CUDA tensors that is said
once per kernel in a warning, since the twin is the slow path there."""

import functools
import os
import warnings

import torch


try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except Exception as error:  # noqa: BLE001 - a broken install raises more than ImportError  # pragma: no cover
    triton = tl = None
    TRITON_IMPORT_ERROR = error


def triton_disabled() -> bool:
    return os.environ.get("HF_EXT_DISABLE_TRITON", "0").lower() in ("1", "true", "yes")


def use_triton(tensor: torch.Tensor, kernel: str) -> bool:
    """Whether ``kernel`` runs its Triton version on ``tensor``; warns once per kernel when CUDA lacks Triton."""
    if not tensor.is_cuda or triton_disabled():
        return False
    if triton is None:
        _warn_no_triton(kernel)
        return False
    return True


@functools.cache
def _warn_no_triton(kernel: str) -> None:
    warnings.warn(
        f"hf_ext kernel {kernel!r}: Triton is unavailable ({TRITON_IMPORT_ERROR!r}), so its pure-torch twin runs on "
        "CUDA (correct, slower). Install a Triton that matches torch (`pip install triton`), or set "
        "HF_EXT_DISABLE_TRITON=1 to choose the twin and silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
