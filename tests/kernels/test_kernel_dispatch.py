"""The kernels' one dispatch rule (hf_ext.kernels.dispatch): Triton on CUDA, the twin elsewhere, never silently."""

import types
import warnings

import pytest
import torch

from hf_ext.kernels import dispatch


def test_twin_off_cuda_and_when_disabled(monkeypatch):
    assert not dispatch.use_triton(torch.zeros(4), "dora_norm")
    monkeypatch.setenv("HF_EXT_DISABLE_TRITON", "1")
    assert dispatch.triton_disabled()
    assert not dispatch.use_triton(types.SimpleNamespace(is_cuda=True), "dora_norm")
    monkeypatch.setenv("HF_EXT_DISABLE_TRITON", "0")
    assert not dispatch.triton_disabled()


def test_cuda_without_triton_warns_once_per_kernel_naming_it(monkeypatch):
    monkeypatch.setattr(dispatch, "triton", None)
    monkeypatch.setattr(dispatch, "TRITON_IMPORT_ERROR", ImportError("libcuda.so.1: cannot open shared object file"))
    monkeypatch.delenv("HF_EXT_DISABLE_TRITON", raising=False)
    dispatch._warn_twin_runs.cache_clear()
    cuda_tensor = types.SimpleNamespace(is_cuda=True)  # use_triton reads only .is_cuda
    with pytest.warns(RuntimeWarning, match=r"'adamw4bit_step'.*libcuda\.so\.1.*HF_EXT_DISABLE_TRITON=1"):
        assert not dispatch.use_triton(cuda_tensor, "adamw4bit_step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not dispatch.use_triton(cuda_tensor, "adamw4bit_step")  # once per kernel
    with pytest.warns(RuntimeWarning, match="'dora_norm'"):
        dispatch.use_triton(cuda_tensor, "dora_norm")
    dispatch._warn_twin_runs.cache_clear()
