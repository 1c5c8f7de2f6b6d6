"""QDoRA on the fast path (hf_ext.peft.dora with hf_ext.peft.quantized_rows): bitsandbytes Linear4bit / Linear8bitLt
bases on CPU (bitsandbytes quantizes and dequantizes 4-bit nf4/fp4 and 8-bit on CPU tensors), compared with PEFT's
own QDoRA (which dequantizes the whole weight every forward).

Tolerances as tests/peft/test_fast_dora.py: forward 1e-6 absolute, gradients 1e-5 relative to the largest entry (fp32
compute; same dequantized values on both sides). PEFT's 8-bit path on CPU breaks from its second forward on (its
``dequantize_module_weight`` re-assigns the CPU weight and the base layer then loses its statistics), so the 8-bit
comparisons use one fresh PEFT model per forward.
"""

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight
from test_fast_dora import FORWARD_ATOL, assert_close_grad, assert_same_outputs_and_grads, run_with_grads
from torch import nn

from hf_ext.kernels import dora_norm
from hf_ext.peft.dora import FastDoraLinear4bit, FastDoraLinear8bitLt, FastDoraLinearVariant, enable_fast_dora
from hf_ext.peft.quantized_rows import QuantizedRows


def quantized_linear(
    kind, d_in, d_out, bias, dtype=torch.float32, quant_type="nf4", nested=True, seed=0, storage=torch.uint8
):
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out, bias=bias)
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(
            d_in,
            d_out,
            bias=bias,
            compute_dtype=dtype,
            quant_type=quant_type,
            compress_statistics=nested,
            quant_storage=storage,
        )
    else:
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict({k: v.to(dtype) for k, v in dense.state_dict().items()})
    return layer.to("cpu")  # quantizes


class QuantizedNet(nn.Module):
    """Two quantized layers (64 -> 128 with bias -> 64 without), flagged the way transformers flags bnb models."""

    def __init__(self, kind, **kwargs):
        super().__init__()
        self.up = quantized_linear(kind, 64, 128, True, seed=0, **kwargs)
        self.down = quantized_linear(kind, 128, 64, False, seed=1, **kwargs)
        setattr(self, "is_loaded_in_4bit" if kind == "4bit" else "is_loaded_in_8bit", True)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def qdora_config(dropout=0.0):
    return LoraConfig(
        r=8, lora_alpha=16, use_dora=True, target_modules=["up", "down"], lora_dropout=dropout, init_lora_weights=False
    )


def peft_and_fast(kind, dropout=0.0, **kwargs):
    """PEFT's QDoRA and fast QDoRA on identically quantized bases with the same non-trivial adapters."""
    reference = get_peft_model(QuantizedNet(kind, **kwargs), qdora_config(dropout))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    fast = get_peft_model(QuantizedNet(kind, **kwargs), enable_fast_dora(qdora_config(dropout)))
    adapters = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    assert not fast.load_state_dict(adapters, strict=False).unexpected_keys
    return reference, fast


@pytest.mark.parametrize(
    "quant", [dict(quant_type="nf4", nested=True), dict(quant_type="fp4", nested=False)], ids=["nf4_nested", "fp4"]
)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_4bit_outputs_and_gradients_match_peft_qdora(quant, dropout):
    reference, fast = peft_and_fast("4bit", dropout, **quant)
    layers = [m for m in fast.modules() if isinstance(m, FastDoraLinear4bit)]
    assert len(layers) == 2 and all(type(m.lora_variant["default"]) is FastDoraLinearVariant for m in layers)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))
    for training in (True, False):
        reference.train(training)
        fast.train(training)
        assert_same_outputs_and_grads(reference, fast, x)


def test_4bit_bf16_storage_matches_peft_qdora():
    """bf16 quantization and compute dtype, fp32 adapters and input (PEFT's default): the norm reads the same bf16
    dequantized values PEFT does."""
    reference, fast = peft_and_fast("4bit", dtype=torch.bfloat16)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    ref_out, _, ref_grads = run_with_grads(reference, x)
    out, _, grads = run_with_grads(fast, x)
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out, ref_out, atol=FORWARD_ATOL, rtol=0)
    for name, grad in grads.items():
        assert_close_grad(grad, ref_grads[name], name)


@pytest.mark.parametrize(
    ("training", "dropout"), [(True, 0.0), (False, 0.0), (True, 0.3)], ids=["train", "eval", "dropout"]
)
def test_8bit_outputs_and_gradients_match_peft_qdora(training, dropout):
    reference, fast = peft_and_fast("8bit", dropout)
    assert sum(isinstance(m, FastDoraLinear8bitLt) for m in fast.modules()) == 2
    reference.train(training)
    fast.train(training)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))
    assert_same_outputs_and_grads(reference, fast, x)  # PEFT's first forward: the one that works on CPU
    for _ in range(2):  # the fast path keeps working and gives the same values
        fast.train(not fast.training)
        run_with_grads(fast, x)
    fast.train(training)
    assert_same_outputs_and_grads(peft_and_fast("8bit", dropout)[0].train(training), fast, x)


@pytest.mark.parametrize(
    ("kind", "d_in", "extra"),
    [("4bit", 128, dict(quant_type="nf4")), ("4bit", 96, dict(quant_type="fp4", nested=False)), ("4bit", 80, {})]
    + [("4bit", 128, dict(dtype=torch.bfloat16)), ("8bit", 72, {})]
    # 4-bit codes stored in bf16 / fp32 words (quant_storage, as FSDP-QLoRA sets it): rows are still byte offsets
    + [("4bit", 128, dict(storage=torch.bfloat16)), ("4bit", 128, dict(storage=torch.float32))],
)
def test_quantized_rows_equal_peft_dequantization_in_any_chunking(kind, d_in, extra):
    """d_in 80 with blocksize 64 splits blocks across rows: rows then come from one whole dequantization."""
    layer = quantized_linear(kind, d_in, 37, True, **extra)
    rows = QuantizedRows(layer)
    dense = dequantize_module_weight(layer)
    assert rows.shape == dense.shape and rows.dtype == dense.dtype
    for start, stop in [(0, 37), (0, 1), (5, 17), (36, 37)]:
        assert torch.equal(rows[start:stop], dense[start:stop])
    assert (rows._dense is not None) == (kind == "4bit" and d_in % 64 != 0)  # whole-block rows need no dense copy
    assert torch.equal(rows.dense(), dense)


def test_factored_norm_on_quantized_rows_equals_norm_on_the_dequantized_weight():
    layer = quantized_linear("4bit", 128, 41, False)
    gen = torch.Generator().manual_seed(3)
    lora_A, lora_B = torch.randn(8, 128, generator=gen) / 11, torch.randn(41, 8, generator=gen) * 0.3
    dense = dequantize_module_weight(layer)
    expected = dora_norm.factored_row_norm(dense, lora_A, lora_B, 2.0)
    for chunk_bytes in (1, 3000, dora_norm.DEFAULT_CHUNK_BYTES):  # one row, a few rows, all rows per chunk
        got = dora_norm.factored_row_norm(QuantizedRows(layer), lora_A, lora_B, 2.0, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert torch.equal(dora_norm.weight_sq_norms(QuantizedRows(layer)), dora_norm.weight_sq_norms(dense))


def test_no_dropout_path_never_dequantizes_the_whole_weight(monkeypatch):
    reference, fast = peft_and_fast("4bit")

    def refuse(self):
        raise AssertionError("whole-weight dequantization on the no-dropout path")

    monkeypatch.setattr(QuantizedRows, "dense", refuse)
    assert_same_outputs_and_grads(reference, fast.train(), torch.randn(2, 64))


def test_weight_sq_cache_follows_the_quantized_storage():
    _, fast = peft_and_fast("4bit")
    layer = fast.base_model.model.up
    x = torch.randn(2, 64)
    with torch.no_grad():
        fast(x)
        key, cached = layer._fast_dora_weight_sq
        fast(x)
    assert layer._fast_dora_weight_sq[1] is cached  # same quantized storage: reused
    expected = dora_norm.weight_sq_norms(dequantize_module_weight(layer.get_base_layer()))
    torch.testing.assert_close(cached, expected, rtol=1e-6, atol=0)

    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear"):
        layer.merge()  # re-quantizes W + delta into a new Params4bit
    with pytest.warns(UserWarning, match="Unmerge lora module to 4-bit linear"):
        layer.unmerge()
    with torch.no_grad():
        fast(x)
    new_key, recomputed = layer._fast_dora_weight_sq
    assert new_key != key and recomputed is not cached
    expected = dora_norm.weight_sq_norms(dequantize_module_weight(layer.get_base_layer()))
    torch.testing.assert_close(recomputed, expected, rtol=1e-6, atol=0)


def test_bnb_layer_outside_a_quantized_model_falls_back_to_peft_with_a_warning():
    """PEFT takes bnb layers only in a model flagged as loaded in 4/8 bit; the fast path uses the same rule."""
    model = QuantizedNet("4bit")
    del model.is_loaded_in_4bit
    with pytest.warns(UserWarning, match=r"bitsandbytes\.nn\.modules\.Linear4bit falls back to PEFT's own DoRA"):
        peft_model = get_peft_model(model, enable_fast_dora(copy.deepcopy(qdora_config())))
    assert type(peft_model.base_model.model.up.lora_variant["default"]) is DoraLinearVariant


def test_mismatched_adapter_dtype_is_a_clear_error_on_the_quantized_path():
    _, fast = peft_and_fast("4bit")
    fast.base_model.model.up.lora_B["default"].double()
    with pytest.raises(ValueError, match="Mismatched dtypes or devices between base and adapter"):
        fast(torch.randn(2, 64))
