"""Fast DoRA (hf_ext.peft.dora, arXiv 2402.09353 / 2603.22276): same outputs, gradients, merges and saved adapter
as PEFT's DoRA, with the factored norm and a ||W||^2 cache that follows the base weight."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.variants import DoraEmbeddingVariant, DoraLinearVariant
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_ext.embedded import build_tiny_model
from hf_ext.peft.dora import FastDoraLinear, FastDoraLinearVariant, apply_fast_dora, enable_fast_dora


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # q/k/v carry a bias
FORWARD_ATOL = 1e-6
GRAD_ATOL = 1e-5  # per unit of the reference gradient's largest entry (input gradients reach ~30 on the tiny model)


def dora_config(dropout: float = 0.0, targets=LINEARS, **kwargs) -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=targets,
        lora_dropout=dropout,
        init_lora_weights=False,
        **kwargs,
    )


def small_mlp(bias: bool) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.Tanh(), nn.Linear(32, 8, bias=bias))


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.proj = Conv1D(24, 16)  # GPT-2 layout: weight (d_in, d_out)
        nn.init.normal_(self.proj.bias)

    def forward(self, x):
        return self.proj(x)


def peft_and_fast(make_model, config: LoraConfig):
    """PEFT's DoRA and fast DoRA on identical bases with identical, non-trivial adapters (B random, m != ||W+sBA||)."""
    torch.manual_seed(0)
    reference = get_peft_model(make_model(), copy.deepcopy(config))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    fast = get_peft_model(make_model(), enable_fast_dora(config))
    assert fast.state_dict().keys() == reference.state_dict().keys()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def fast_layers(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FastDoraLinear)]


def run_with_grads(model, inputs, seed: int = 3):
    """Output and gradients of input, A, B and magnitude for loss = sum(out * fixed weights)."""
    model.zero_grad(set_to_none=True)
    inputs = inputs.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout masks for both models
    out = model(inputs_embeds=inputs).logits if hasattr(model, "get_input_embeddings") else model(inputs)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), inputs.grad, grads


def assert_same_outputs_and_grads(reference, fast, inputs):
    ref_out, ref_dx, ref_grads = run_with_grads(reference, inputs)
    out, dx, grads = run_with_grads(fast, inputs)
    torch.testing.assert_close(out, ref_out, atol=FORWARD_ATOL, rtol=0)
    assert_close_grad(dx, ref_dx, "inputs_embeds")
    assert grads.keys() == ref_grads.keys() and any("lora_magnitude_vector" in n for n in grads)
    for name, grad in grads.items():
        assert_close_grad(grad, ref_grads[name], name)


def assert_close_grad(grad, ref_grad, name):
    atol = GRAD_ATOL * max(1.0, ref_grad.abs().max().item())
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def tiny_inputs(model) -> torch.Tensor:
    torch.manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    return model.get_input_embeddings()(ids).detach()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
def test_tiny_model_outputs_and_gradients_match_peft_dora(training, dropout):
    reference, fast = peft_and_fast(build_tiny_model, dora_config(dropout))
    layers = fast_layers(fast)
    assert len(layers) == 2 * len(LINEARS)
    assert all(type(layer.lora_variant["default"]) is FastDoraLinearVariant for layer in layers)
    reference.train(training)
    fast.train(training)
    assert_same_outputs_and_grads(reference, fast, tiny_inputs(reference))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_linear_stack_with_and_without_bias_matches_peft_dora(bias, dropout):
    reference, fast = peft_and_fast(lambda: small_mlp(bias), dora_config(dropout, targets=["0", "2"]))
    assert len(fast_layers(fast)) == 2
    torch.manual_seed(5)
    x = torch.randn(3, 5, 16)
    for training in (True, False):
        reference.train(training)
        fast.train(training)
        assert_same_outputs_and_grads(reference, fast, x)


def test_conv1d_target_matches_peft_dora():
    reference, fast = peft_and_fast(Conv1DNet, dora_config(targets=["proj"], fan_in_fan_out=True))
    (layer,) = fast_layers(fast)
    assert layer.fan_in_fan_out and type(layer.lora_variant["default"]) is FastDoraLinearVariant
    torch.manual_seed(6)
    assert_same_outputs_and_grads(reference, fast, torch.randn(4, 16))


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_training_forward_runs_through_the_fused_compose(dropout):
    _, fast = peft_and_fast(lambda: small_mlp(True), dora_config(dropout, targets=["2"]))
    fast.train()
    out = fast(torch.randn(3, 16))
    assert type(out.grad_fn).__name__ == "DoraComposeBackward"  # the last layer's output is the compose's


def test_merge_and_unload_gives_peft_merged_weights():
    reference, fast = peft_and_fast(build_tiny_model, dora_config())
    merged_ref = reference.merge_and_unload().state_dict()
    merged_fast = fast.merge_and_unload().state_dict()
    assert merged_fast.keys() == merged_ref.keys()
    for name, tensor in merged_fast.items():
        torch.testing.assert_close(tensor, merged_ref[name], atol=FORWARD_ATOL, rtol=0, msg=name)


def test_adapter_saved_on_fast_path_loads_in_vanilla_peft(tmp_path):
    reference, fast = peft_and_fast(build_tiny_model, dora_config())
    fast.save_pretrained(tmp_path / "fast")
    reference.save_pretrained(tmp_path / "peft")
    config_fast = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    config_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config_fast.keys() == config_peft.keys()
    assert load_file(tmp_path / "fast" / "adapter_model.safetensors").keys() == (
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    )

    loaded = PeftModel.from_pretrained(build_tiny_model(), tmp_path / "fast").eval()
    assert not fast_layers(loaded)  # vanilla PEFT layers
    fast.eval()
    inputs = tiny_inputs(fast)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(inputs_embeds=inputs).logits, fast(inputs_embeds=inputs).logits, atol=FORWARD_ATOL, rtol=0
        )


def test_dense_weight_norm_follows_the_base_weight_without_a_cache():
    """A dense base is never cached (FSDP2 regathers W into storage whose address and version repeat): a change of
    W through ``.data``, which no tensor key would see, is in the very next forward."""
    reference, fast = peft_and_fast(lambda: small_mlp(True), dora_config(targets=["0", "2"]))
    fast.eval()
    reference.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        fast(x)
        layer = fast_layers(fast)[0]
        assert "_fast_dora_weight_sq" not in layer.__dict__
        for model in (reference, fast):
            model.get_base_model()[0].weight.data.mul_(1.5)  # bumps neither data_ptr nor _version
        out, ref_out = fast(x), reference(x)
    torch.testing.assert_close(out, ref_out, atol=FORWARD_ATOL, rtol=0)


def test_unsupported_target_falls_back_to_peft_dora_with_a_warning_naming_the_type():
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 8))
    with pytest.warns(UserWarning, match=r"torch\.nn\.modules\.sparse\.Embedding falls back to PEFT's own DoRA"):
        peft_model = get_peft_model(model, enable_fast_dora(dora_config(targets=["0", "1"])))
    embedding, linear = peft_model.get_base_model()[0], peft_model.get_base_model()[1]
    assert type(embedding.lora_variant["default"]) is DoraEmbeddingVariant
    assert isinstance(linear, FastDoraLinear) and type(linear.lora_variant["default"]) is FastDoraLinearVariant
    peft_model(torch.tensor([[1, 2, 3]]))


def test_linear_subclass_is_left_to_peft():
    class MyLinear(nn.Linear):  # e.g. bitsandbytes' Linear4bit is an nn.Linear subclass
        pass

    model = nn.Sequential(MyLinear(16, 8))
    with pytest.warns(UserWarning, match="MyLinear falls back"):
        peft_model = get_peft_model(model, enable_fast_dora(dora_config(targets=["0"])))
    assert type(peft_model.get_base_model()[0].lora_variant["default"]) is DoraLinearVariant


def test_use_dora_false_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="use_dora=False"):
        enable_fast_dora(LoraConfig(r=4, target_modules=["0"]))


def test_enable_fast_dora_leaves_the_given_config_untouched():
    config = dora_config()
    enable_fast_dora(config)
    assert not config._custom_modules


def test_mismatched_adapter_dtype_is_a_clear_error():
    _, fast = peft_and_fast(lambda: small_mlp(True), dora_config(targets=["0", "2"]))
    layer = fast_layers(fast)[0]
    layer.lora_B["default"].double()
    with pytest.raises(ValueError, match="Mismatched dtypes or devices between base and adapter"):
        fast(torch.randn(2, 16))


def test_fp32_magnitude_beside_bf16_lora_matches_peft_dora():
    """TRL casts the LoRA layers of a quantized model to bf16 and leaves the magnitude fp32: PEFT runs that mix."""
    reference, fast = peft_and_fast(lambda: small_mlp(True), dora_config(targets=["0", "2"]))
    for model in (reference, fast):
        for name, module in model.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                module.to(torch.bfloat16)
    inputs = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(inputs), reference(inputs), atol=1e-2, rtol=1e-2)  # bf16 LoRA products


# ---------------------------------------------------------------- the trainer switch (dora_impl)


@pytest.mark.parametrize(("dora_impl", "fast_layers"), [("fused", 4), ("peft", 0)])
def test_trainer_dora_impl_picks_the_implementation(tmp_path, dora_impl, fast_layers):
    from hf_ext import SFTConfig, SFTTrainer
    from hf_ext.embedded import count_sft_dataset, materialize_model

    args = SFTConfig(str(tmp_path), dora_impl=dora_impl, use_cpu=True, bf16=False, report_to="none")
    peft_config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(
        str(materialize_model()), args=args, train_dataset=count_sft_dataset(8), peft_config=peft_config
    )
    assert sum(isinstance(m, FastDoraLinear) for m in trainer.model.modules()) == fast_layers


def test_unknown_dora_impl_is_refused(tmp_path):
    from hf_ext import GRPOConfig

    with pytest.raises(ValueError, match="dora_impl='triton' is not known; allowed values: fused, peft"):
        GRPOConfig(str(tmp_path), dora_impl="triton", use_cpu=True, bf16=False)


def fast_variants(model) -> int:
    return sum(
        isinstance(v, FastDoraLinearVariant) for m in model.modules() for v in getattr(m, "lora_variant", {}).values()
    )


def test_apply_fast_dora_switches_a_loaded_adapter_without_changing_outputs(tmp_path):
    reference, _ = peft_and_fast(build_tiny_model, dora_config())
    reference.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny_model(), tmp_path).eval()
    inputs = tiny_inputs(loaded)
    with torch.no_grad():
        before = loaded(inputs_embeds=inputs).logits
        assert fast_variants(loaded) == 0
        assert apply_fast_dora(loaded) == 2 * len(LINEARS)  # 2 decoder layers
        assert fast_variants(loaded) == 2 * len(LINEARS) and apply_fast_dora(loaded) == 0
        torch.testing.assert_close(loaded(inputs_embeds=inputs).logits, before, atol=FORWARD_ATOL, rtol=0)


def test_apply_fast_dora_reaches_a_dora_adapter_added_to_a_lora_layer():
    """PEFT reuses an existing LoRA layer for a new adapter, so the factory never sees it."""
    model = get_peft_model(small_mlp(True), LoraConfig(target_modules=["0"]))
    model.add_adapter("dora", enable_fast_dora(dora_config(targets=["0"])))
    model.set_adapter("dora")
    inputs = torch.randn(5, 16)
    out, input_grad, grads = run_with_grads(model, inputs)  # PEFT's DoRA
    assert fast_variants(model) == 0
    assert apply_fast_dora(model) == 1
    fast_out, fast_input_grad, fast_grads = run_with_grads(model, inputs)
    torch.testing.assert_close(fast_out, out, atol=FORWARD_ATOL, rtol=0)
    torch.testing.assert_close(fast_input_grad, input_grad, atol=GRAD_ATOL * input_grad.abs().max(), rtol=0)
    assert any("dora" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=GRAD_ATOL * grad.abs().max(), rtol=0, msg=name)


def test_peft_dora_caching_holds_the_fast_norm_in_eval_only():
    from peft.helpers import DoraCaching

    reference, fast = peft_and_fast(lambda: small_mlp(True), dora_config(targets=["0", "2"]))
    magnitude_layers = [m.lora_magnitude_vector["default"] for m in fast_layers(fast)]
    inputs = torch.randn(5, 16)
    fast.eval()
    with DoraCaching(), torch.no_grad():
        first = fast(inputs)
        assert all(layer._dora_cache for layer in magnitude_layers)
        for layer in magnitude_layers:  # a cached norm is used as is: poisoning it changes the output
            layer._dora_cache["weight-norm-default"] = layer._dora_cache["weight-norm-default"] * 2
        assert not torch.allclose(fast(inputs), first)
    fast(inputs)  # caching off again: the cache is dropped and the norm recomputed
    assert not any(layer._dora_cache for layer in magnitude_layers)
    with torch.no_grad():
        torch.testing.assert_close(fast(inputs), reference.eval()(inputs), atol=FORWARD_ATOL, rtol=0)
    fast.train()
    with DoraCaching():
        fast(inputs)
    assert not any(layer._dora_cache for layer in magnitude_layers)  # never in training


def test_trainer_switches_a_peft_model_it_is_given(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_ext import SFTConfig, SFTTrainer
    from hf_ext.embedded import count_sft_dataset, materialize_model

    base = AutoModelForCausalLM.from_pretrained(materialize_model())
    peft_model = get_peft_model(base, dora_config(targets=["q_proj", "v_proj"]))
    args = SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    trainer = SFTTrainer(peft_model, args=args, train_dataset=count_sft_dataset(8))
    assert fast_variants(trainer.model) == 4
