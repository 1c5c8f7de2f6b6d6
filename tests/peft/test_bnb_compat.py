"""Contract tests for what hf_ext.peft.bnb_compat takes from bitsandbytes (weight classes, quantization state, the
8-bit row scales, the 4-bit block and nibble layout), on bitsandbytes' CPU backend: each fails with a message naming
the upstream symbol."""

import inspect

import bitsandbytes as bnb
import pytest
import torch
from test_peft_compat import changed, upstream
from torch import nn

from hf_ext.peft.bnb_compat import dequantize, dequantized_spec, quantized_kind, row_dequantizer, storage_tensors


BLOCKSIZE = 64


def dense_weight(d_in: int, d_out: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0))


def quantized(layer: nn.Module, quantize: bool) -> nn.Module:
    """``layer`` holding ``dense_weight``, quantized (moved to the CPU) when ``quantize``."""
    layer.load_state_dict({"weight": dense_weight(layer.in_features, layer.out_features)}, strict=False)
    return layer.to("cpu") if quantize else layer


def linear4bit(d_in=128, d_out=6, quant_type="nf4", nested=False, storage=torch.uint8, quantize=True):
    layer = bnb.nn.Linear4bit(
        d_in,
        d_out,
        compute_dtype=torch.float32,
        quant_type=quant_type,
        compress_statistics=nested,
        quant_storage=storage,
    )
    return quantized(layer, quantize)


def linear8bit(d_in=32, d_out=6, quantize=True):
    return quantized(bnb.nn.Linear8bitLt(d_in, d_out, has_fp16_weights=False, threshold=0.0), quantize)


def decode_4bit(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The layout hf_ext relies on, decoded by hand: byte k holds elements 2k (high nibble) and 2k + 1 (low), each
    ``code[index]`` scaled by the absmax of its block of ``blocksize`` consecutive values."""
    data = packed.view(torch.uint8).reshape(-1)
    indices = torch.stack([(data >> 4).long(), (data & 15).long()], dim=1).reshape(-1)
    return (code[indices].reshape(-1, blocksize) * absmax.float()[:, None]).reshape(-1)


# ---------------------------------------------------------------- weight classes


def test_weight_classes_mark_quantized_layers():
    params4bit, int8params = upstream("bitsandbytes.nn.Params4bit"), upstream("bitsandbytes.nn.Int8Params")
    assert quantized_kind(linear4bit(quantize=False)) is None, changed(
        "bitsandbytes.nn.Params4bit.quant_state", "set before the layer is moved to its device"
    )
    layer = linear4bit()
    assert isinstance(layer.weight, params4bit) and quantized_kind(layer) == "4bit", changed(
        "bitsandbytes.nn.Params4bit", f"a quantized Linear4bit holds {type(layer.weight)} without a quant_state"
    )
    assert quantized_kind(linear8bit(quantize=False)) is None, changed(
        "bitsandbytes.nn.Int8Params", "data is int8 before the layer is moved to its device"
    )
    layer = linear8bit()
    assert isinstance(layer.weight, int8params) and quantized_kind(layer) == "8bit", changed(
        "bitsandbytes.nn.Int8Params", f"a quantized Linear8bitLt holds {type(layer.weight)} of {layer.weight.dtype}"
    )
    assert quantized_kind(nn.Linear(4, 4)) is None and quantized_kind(nn.ReLU()) is None


# ---------------------------------------------------------------- 8-bit


def test_int8_scales_move_from_the_weight_to_the_layer_state():
    layer = linear8bit()
    scb = getattr(layer.weight, "SCB", None)
    assert scb is not None and scb.shape == (6,) and scb.dtype == torch.float32, changed(
        "bitsandbytes.nn.Int8Params.SCB", f"not the (d_out,) fp32 row absmax after quantization: {scb}"
    )
    torch.testing.assert_close(  # of the weight as bitsandbytes stores it before quantizing (fp16)
        scb,
        dense_weight(32, 6).abs().amax(1),
        rtol=1e-3,
        atol=0,
        msg=lambda m: changed("bitsandbytes.nn.Int8Params.SCB", f"not the row absmax: {m}"),
    )
    before = dequantize(layer)
    layer(torch.randn(2, 32))
    assert getattr(layer.weight, "SCB", None) is None and layer.state.SCB is not None, changed(
        "bitsandbytes.nn.Linear8bitLt.state.SCB", "the first forward no longer moves SCB from the weight to the state"
    )
    assert storage_tensors(layer)[1] is layer.state.SCB and torch.equal(dequantize(layer), before), changed(
        "bitsandbytes.nn.Linear8bitLt.state.SCB", "the row scales read from the state differ"
    )


def test_int8_vectorwise_dequant_is_row_wise():
    symbol = "bitsandbytes.functional.int8_vectorwise_dequant"
    dequant = upstream(symbol)
    assert list(inspect.signature(dequant).parameters) == ["A", "stats"], changed(symbol, "signature")
    data = torch.randint(-127, 128, (5, 16), dtype=torch.int8)
    stats = torch.rand(5) + 0.5
    full = dequant(data, stats)
    assert full.dtype == torch.float32, changed(symbol, f"returns {full.dtype}")
    torch.testing.assert_close(
        full, data.float() * stats[:, None] / 127, msg=lambda m: changed(symbol, f"not A * stats / 127 by row: {m}")
    )
    assert torch.equal(dequant(data[1:4], stats[1:4]), full[1:4]), changed(symbol, "row slices differ")
    layer = linear8bit()
    read = row_dequantizer(layer)
    assert torch.equal(read(2, 5), dequantize(layer)[2:5]), changed(symbol, "rows of a layer differ")


# ---------------------------------------------------------------- 4-bit


def test_quant_state_fields():
    symbol = "bitsandbytes.nn.Params4bit.quant_state"
    for nested in (False, True):
        state = getattr(linear4bit(nested=nested).weight, "quant_state", None)
        assert state is not None, changed(symbol, "missing after quantization")
        expected = {
            "shape": torch.Size([6, 128]),
            "dtype": torch.float32,
            "blocksize": BLOCKSIZE,
            "quant_type": "nf4",
            "nested": nested,
        }
        found = {name: getattr(state, name, "<missing>") for name in expected}
        assert found == expected, changed(symbol, f"fields {found}, expected {expected}")
        for name in ("absmax", "code") + (("state2", "offset") if nested else ()):
            assert getattr(state, name, None) is not None, changed(f"{symbol}.{name}", "missing")
    assert dequantized_spec(linear4bit()) == (torch.Size([6, 128]), torch.float32)
    parameters = inspect.signature(upstream("bitsandbytes.functional.QuantState")).parameters
    for name in ("absmax", "shape", "code", "blocksize", "quant_type", "dtype"):
        assert name in parameters, changed("bitsandbytes.functional.QuantState", f"no {name!r} argument")


def test_nf4_bytes_of_a_known_tensor():
    """Values that are exactly nf4 codes quantize to known indices: their bytes show the nibble order."""
    symbol = "bitsandbytes.functional.quantize_4bit"
    _, probe = upstream(symbol)(torch.ones(1, BLOCKSIZE), blocksize=BLOCKSIZE, quant_type="nf4")
    indices = (torch.arange(2 * BLOCKSIZE) * 7) % 16  # every code, in both nibbles; each block holds -1 and 1
    values = probe.code[indices].reshape(2, BLOCKSIZE) * torch.tensor([[2.0], [0.5]])
    for storage in (torch.uint8, torch.bfloat16):
        packed, state = upstream(symbol)(values, blocksize=BLOCKSIZE, quant_type="nf4", quant_storage=storage)
        expected = (indices[0::2] * 16 + indices[1::2]).to(torch.uint8)
        assert torch.equal(packed.view(torch.uint8).reshape(-1), expected), changed(
            symbol, f"bytes are no longer (code index of element 2k) << 4 | (index of 2k + 1) for {storage} storage"
        )
        assert torch.equal(state.absmax, torch.tensor([2.0, 0.5])), changed(symbol, "absmax is not per block")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_dequantize_4bit_follows_the_block_and_nibble_layout(quant_type, nested):
    symbol = "bitsandbytes.functional.dequantize_4bit"
    layer = linear4bit(quant_type=quant_type, nested=nested)
    state = layer.weight.quant_state
    absmax = state.absmax
    if nested:
        absmax = upstream("bitsandbytes.functional.dequantize_blockwise")(state.absmax, state.state2) + state.offset
    expected = decode_4bit(layer.weight.data, state.code, absmax, state.blocksize).reshape(6, 128)
    assert torch.equal(upstream(symbol)(layer.weight.data, state), expected), changed(
        symbol, f"{quant_type} (nested={nested}) is no longer code[nibble] * absmax[block], high nibble first"
    )
    assert torch.equal(dequantize(layer), expected)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_4bit_row_slices_dequantize_alone(storage, nested):
    """A row slice of the packed bytes with its block scales, through a new QuantState, gives those rows."""
    symbol = "bitsandbytes.functional.QuantState"
    layer = linear4bit(nested=nested, storage=storage)
    read = row_dequantizer(layer)
    full = dequantize(layer)
    for start, stop in [(0, 6), (0, 1), (2, 5), (5, 6)]:
        assert torch.equal(read(start, stop), full[start:stop]), changed(
            symbol, f"rows {start}:{stop} dequantized alone differ ({storage} storage, nested={nested})"
        )


def test_rows_splitting_blocks_have_no_row_reader():
    assert row_dequantizer(linear4bit(d_in=80)) is None
    assert row_dequantizer(linear4bit(d_in=128)) is not None


# ---------------------------------------------------------------- bitsandbytes' CPU repacking for inference


@pytest.mark.parametrize("adapter", ["allora", "qdora"])
def test_adapted_4bit_layers_keep_the_training_layout_through_an_eval_pass(adapter):
    """On a CPU with AVX512-BF16 bitsandbytes would repack an eval-mode Linear4bit's weight in place (a layout
    that training after the eval pass and dequantizing cannot read). The switch is set here as such a CPU sets it, so
    the test runs on every machine: the adapted layers turn it off, warn once, and an eval pass then training work."""
    from peft import LoraConfig, get_peft_model
    from test_qdora import QuantizedNet

    import hf_ext.peft.bnb_compat as bnb_compat
    from hf_ext.peft import enable_allora, enable_fast_dora

    net = QuantizedNet("4bit")
    for layer in (net.up, net.down):
        layer.support_avx512bf16_for_cpu = True
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["up", "down"], use_dora=adapter == "qdora")
    enable = enable_fast_dora if adapter == "qdora" else lambda c: enable_allora(c, 2.0)
    bnb_compat._warn_repacking_off.cache_clear()
    with pytest.warns(UserWarning, match="AVX512-BF16 repacking of 4-bit weights for CPU inference is turned off"):
        model = get_peft_model(net, enable(config))
    assert [layer.support_avx512bf16_for_cpu for layer in (net.up.base_layer, net.down.base_layer)] == [False] * 2
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()(x)
    bases = (net.up.base_layer, net.down.base_layer)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in bases)
    model.train()(x).square().mean().backward()


def test_a_weight_repacked_already_is_converted_back():
    """A weight repacked before the adapter arrived (bitsandbytes' own converter, pure torch, so on any CPU) is
    converted back: the dequantized weight is the original one but for the bf16 rounding of the block statistics."""
    import bitsandbytes.functional as bnbF

    from hf_ext.peft.bnb_compat import keep_training_layout

    layer = linear4bit(d_in=128, d_out=64, nested=True)
    before = dequantize(layer)
    layer.weight.data, layer.weight.quant_state = bnbF._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert not torch.allclose(dequantize(layer).float(), before, rtol=1e-2)  # the repacked layout reads wrong
    keep_training_layout(layer)
    assert not layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(dequantize(layer).float(), before, rtol=2**-8, atol=0)
