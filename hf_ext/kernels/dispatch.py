"""The one dispatch rule of hf_ext's kernels: Triton on CUDA tensors when it imports and is not disabled
(``HF_EXT_DISABLE_TRITON=1``), the kernel's torch twin elsewhere. Triton is optional: without it ``triton`` and
``tl`` are None here and every kernel module runs its twin."""

import os

import torch


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None


def triton_disabled() -> bool:
    return os.environ.get("HF_EXT_DISABLE_TRITON", "0").lower() in ("1", "true", "yes")


def use_triton(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda and not triton_disabled()
