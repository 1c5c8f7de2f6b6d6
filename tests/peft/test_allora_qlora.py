"""QLoRA + ALLoRA (hf_ext.peft.allora on bitsandbytes Linear4bit / Linear8bitLt bases, arXiv 2410.09692), on
bitsandbytes' CPU backend: parity with ALLoRA on the dequantized base, the ALLoRA scale against PEFT's plain QLoRA,
the adapter in vanilla PEFT, and the 4-bit recipe end to end.

The reference is ALLoRA on plain ``nn.Linear`` layers whose weights are the bnb layers' dequantized weights, with the
same A and B. ALLoRA's row scale reads only A and B, so the two differ only in the base matmul. Tolerances, as the
largest difference relative to the largest entry of the reference:

- fp32 compute (4-bit nf4 / fp4, 8-bit): the same dequantized values meet the same input, but bitsandbytes may
  order the base matmul differently (8-bit scales the int8 product's rows after it): forward 1e-6, gradients and
  parameters after the SGD steps 1e-5.
- bf16 compute (4-bit): bitsandbytes casts the input and the dequantized weight to bf16 and rounds the base output,
  and its input gradient, to bf16 (unit roundoff 2^-8 = 3.9e-3): 1e-2 everywhere.
"""

import json

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear4bit as LoraLinear4bit
from peft.tuners.lora import Linear8bitLt as LoraLinear8bitLt
from test_qdora import QuantizedNet
from torch import nn

from hf_ext.peft.allora import (
    ALLoRALinear,
    ALLoRALinear4bit,
    ALLoRALinear8bitLt,
    ALLoRAQuantizedVariant,
    allora_row_scale,
    enable_allora,
)
from hf_ext.peft.bnb_compat import dequantize


ETA = 2.0
FP32_TOLERANCES = {"forward": 1e-6, "grad": 1e-5, "step": 1e-5}
BF16_TOLERANCES = {"forward": 1e-2, "grad": 1e-2, "step": 1e-2}
CASES = {
    "4bit_nf4_fp32": ("4bit", dict(quant_type="nf4", nested=True), FP32_TOLERANCES),
    "4bit_fp4_fp32": ("4bit", dict(quant_type="fp4", nested=False), FP32_TOLERANCES),
    "4bit_nf4_bf16_compute": ("4bit", dict(quant_type="nf4", dtype=torch.bfloat16), BF16_TOLERANCES),
    "8bit": ("8bit", {}, FP32_TOLERANCES),
}
LAYER_CLASSES = {"4bit": ALLoRALinear4bit, "8bit": ALLoRALinear8bitLt}


def allora_lora_config() -> LoraConfig:
    """ALLoRA's LoRA settings; random A and B (init_lora_weights=False), so the row scale differs from row to row."""
    return LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["up", "down"], init_lora_weights=False)


def dense_linear(layer: nn.Module) -> nn.Linear:
    """An fp32 ``nn.Linear`` holding the bnb layer's dequantized weight and its bias."""
    weight = dequantize(layer).float()
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.float())
    return dense


class DequantizedNet(nn.Module):
    """``QuantizedNet`` with each bnb layer replaced by its dequantized ``nn.Linear``."""

    def __init__(self, quantized: QuantizedNet):
        super().__init__()
        self.up, self.down = dense_linear(quantized.up), dense_linear(quantized.down)

    forward = QuantizedNet.forward


def without_cpu_repacking(model: nn.Module) -> nn.Module:
    """``model`` with bitsandbytes' AVX512-BF16 repacking off, as hf_ext's adapters keep it
    (``bnb_compat.keep_training_layout``): on a CPU with that extension vanilla PEFT's eval forward would run
    bitsandbytes' bf16 inference kernel, and its merge would dequantize the repacked layout."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def quantized_and_reference(kind, quant):
    """ALLoRA on a quantized net and on its dequantized twin, both holding the quantized model's random A and B."""
    quantized = QuantizedNet(kind, **quant)
    reference = get_peft_model(DequantizedNet(quantized), enable_allora(allora_lora_config(), ETA))
    model = get_peft_model(quantized, enable_allora(allora_lora_config(), ETA))
    adapters = {name: value for name, value in model.state_dict().items() if "lora_" in name}
    assert len(adapters) == 4 and not reference.load_state_dict(adapters, strict=False).unexpected_keys
    return model, reference


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |got - expected|, that divided by max |expected|)."""
    diff = (got.double() - expected.double()).abs().max().item()
    return diff, diff / expected.double().abs().max().item()


def forward_backward(model, x, target):
    """Train-mode output and the gradients of the LoRA factors (zeroed first) for the loss mean((y - target)^2)."""
    model.train().zero_grad()
    y = model(x)
    (y - target).square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def parity_report(kind, quant, steps=3, lr=0.5):
    """Largest differences between ALLoRA on the quantized base and on the dequantized one: the forward, the LoRA
    gradients, then the LoRA parameters and the output after each of ``steps`` SGD steps (SGD, so that the ALLoRA
    scale sets the step size as in the paper; the loss falls by about 10% over the steps).

    Returns:
        {"forward": (abs, rel), "grad": (abs, rel), "step": (abs, rel)}, each the worst over its tensors.
    """
    model, reference = quantized_and_reference(kind, quant)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 64, generator=generator)
    target = torch.randn(3, 5, 64, generator=generator)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (model, reference)]
    worst = {"forward": (0.0, 0.0), "grad": (0.0, 0.0), "step": (0.0, 0.0)}

    def record(key, got, expected):
        worst[key] = max(worst[key], relative_difference(got, expected), key=lambda pair: pair[1])

    for step in range(steps + 1):
        y, grads = forward_backward(model, x, target)
        ref_y, ref_grads = forward_backward(reference, x, target)
        record("forward" if step == 0 else "step", y, ref_y)
        if step == 0:
            for name, grad in grads.items():
                record("grad", grad, ref_grads[name])
        else:
            ref_params = dict(reference.named_parameters())
            for name, param in model.named_parameters():
                if "lora_" in name:
                    record("step", param.detach(), ref_params[name].detach())
        if step < steps:
            for optimizer in optimizers:
                optimizer.step()
    return worst


# ---------------------------------------------------------------- parity with ALLoRA on the dequantized base


@pytest.mark.parametrize("case", CASES)
def test_matches_allora_on_the_dequantized_base(case):
    kind, quant, tolerances = CASES[case]
    model, reference = quantized_and_reference(kind, quant)
    layers = [m for m in model.modules() if isinstance(m, LAYER_CLASSES[kind])]
    assert len(layers) == 2 and all(type(m.lora_variant["default"]) is ALLoRAQuantizedVariant for m in layers)
    assert all(m.allora_eta == ETA for m in layers)
    assert sum(type(m) is ALLoRALinear for m in reference.modules()) == 2
    report = parity_report(kind, quant)
    for key, (_, relative) in report.items():
        assert relative <= tolerances[key], f"{case} {key}: {report[key]} (abs, rel) over tolerance {tolerances[key]}"


# ---------------------------------------------------------------- the ALLoRA scale is applied


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_b_gradient_is_plain_qlora_s_scaled_per_row_and_the_input_gradient_is_plain(kind):
    """Against PEFT's plain QLoRA with the same A and B: same output, dB = diag(c) dB_plain with
    c_i = 1/sqrt(||(BA)_i|| + 1/eta^2) (not 1: the test fails if the scale is dropped), dA differs, dx is plain."""
    allora = get_peft_model(QuantizedNet(kind), enable_allora(allora_lora_config(), ETA)).train()
    plain = get_peft_model(QuantizedNet(kind), allora_lora_config()).train()
    assert not any(isinstance(m, (ALLoRALinear4bit, ALLoRALinear8bitLt)) for m in plain.modules())
    assert not plain.load_state_dict({n: v for n, v in allora.state_dict().items() if "lora_" in n}, strict=False)[1]
    generator = torch.Generator().manual_seed(3)
    x, grad_y = torch.randn(6, 64, generator=generator), torch.randn(6, 64, generator=generator)
    outputs, input_grads = [], []
    for model in (allora, plain):
        leaf = x.clone().requires_grad_(True)
        y = model(leaf)
        (y * grad_y).sum().backward()
        outputs.append(y.detach())
        input_grads.append(leaf.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(input_grads[0], input_grads[1], rtol=0, atol=1e-6)

    plain_params = dict(plain.named_parameters())
    for name in ("up", "down"):
        layer = getattr(allora.base_model.model, name)
        weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scale = allora_row_scale(weight_a, weight_b, ETA)
        assert scale.max() < 0.95 * ETA and scale.max() - scale.min() > 0.01  # rows with different norms
        plain_grad_b = plain_params[f"base_model.model.{name}.lora_B.default.weight"].grad
        plain_grad_a = plain_params[f"base_model.model.{name}.lora_A.default.weight"].grad
        torch.testing.assert_close(weight_b.grad, scale[:, None] * plain_grad_b, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(weight_b.grad, plain_grad_b, rtol=1e-2)
        assert not torch.allclose(weight_a.grad, plain_grad_a, rtol=1e-2)


# ---------------------------------------------------------------- the adapter stays plain LoRA


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_saved_adapter_runs_in_vanilla_peft_on_the_quantized_base(kind, tmp_path):
    model = get_peft_model(QuantizedNet(kind), enable_allora(allora_lora_config(), ETA))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        optimizer.zero_grad()
        model.train()(x).square().mean().backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    assert not any("allora" in key for key in json.loads((tmp_path / "adapter_config.json").read_text()))

    vanilla = PeftModel.from_pretrained(without_cpu_repacking(QuantizedNet(kind)), tmp_path)  # the same weights
    peft_cls = LoraLinear4bit if kind == "4bit" else LoraLinear8bitLt
    assert sum(type(m) is peft_cls for m in vanilla.modules()) == 2
    assert not any(isinstance(m, ALLoRALinear | ALLoRALinear4bit | ALLoRALinear8bitLt) for m in vanilla.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), vanilla.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(model.train()(x), vanilla.train()(x), rtol=0, atol=1e-6)
    if kind == "4bit":  # merging re-quantizes W + B A: the same on both sides
        with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear"):
            merged, vanilla_merged = model.merge_and_unload(), vanilla.merge_and_unload()
        with torch.no_grad():
            torch.testing.assert_close(merged(x), vanilla_merged(x), rtol=0, atol=0)


def test_bnb_layer_outside_a_quantized_model_is_refused_by_name():
    """PEFT takes bnb layers only in a model flagged as loaded in 4/8 bit; ALLoRA refuses rather than guess."""
    model = QuantizedNet("4bit")
    del model.is_loaded_in_4bit
    with pytest.raises(ValueError, match=r"bitsandbytes\.nn\.modules\.Linear4bit target is taken in a model loaded"):
        get_peft_model(model, enable_allora(allora_lora_config(), ETA))


# ---------------------------------------------------------------- the recipe


def test_qlora_recipe_trains_allora_on_nf4_and_saves_plain_lora(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_ext.embedded import materialize_model
    from hf_ext.scripts.sft import run

    trainer = run(["--config", "examples/configs/sft_allora_qlora.yaml", "--output_dir", str(tmp_path)])
    layers = [m for m in trainer.model.modules() if isinstance(m, ALLoRALinear4bit)]
    assert len(layers) == 14 and all(m.get_base_layer().weight.quant_state.quant_type == "nf4" for m in layers)
    eval_losses = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert len(eval_losses) == 2 and eval_losses[-1] < eval_losses[0] - 0.05
    assert "bitsandbytes 4-bit (nf4)" in (tmp_path / "README.md").read_text()

    base = AutoModelForCausalLM.from_pretrained(
        materialize_model(), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    vanilla = PeftModel.from_pretrained(without_cpu_repacking(base), tmp_path).eval()
    assert sum(type(m) is LoraLinear4bit for m in vanilla.modules()) == 14
    with torch.no_grad():  # TRL trains a quantized model's LoRA factors in bf16; vanilla PEFT loads them as fp32
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
        ids = torch.tensor([[3, 20, 21, 22]])
        expected = vanilla(input_ids=ids).logits
        torch.testing.assert_close(trainer.model.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
