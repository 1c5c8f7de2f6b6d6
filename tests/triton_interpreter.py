"""The Triton kernels' CPU tests: ``tests/conftest.py`` turns the Triton interpreter on (TRITON_INTERPRET=1, before
triton is first imported) for the whole session when no CUDA GPU is present, so the kernel tests (marked
``interpreted``) run on CPU tensors in this process, beside every other test. With a GPU the interpreter stays off so
that the kernels compile for it."""

import os

import pytest

from hf_ext.kernels.dispatch import triton


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    triton is None or not INTERPRETING,
    reason="needs triton under TRITON_INTERPRET=1 (set by tests/conftest.py when no CUDA GPU is present)",
)
