"""ALLoRA (hf_ext.peft.allora, arXiv 2410.09692): gradients against the paper's formula, the PEFT integration,
the trainer switch, and the adapter staying a plain LoRA adapter."""

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hf_ext import GRPOConfig, SFTConfig, SFTTrainer
from hf_ext.embedded import build_tiny_model, count_sft_dataset, materialize_model
from hf_ext.peft import ALLoRALinear, ALLoRAProduct, allora_row_scale, enable_allora
from hf_ext.scripts.sft import make_parser, run


# ---------------------------------------------------------------- the autograd function against the formula


def test_gradients_match_the_papers_formula_on_a_hand_built_layer():
    """c_i = 1/sqrt(||(BA)_i|| + 1/eta^2); dB = diag(c) dy^T h; dA = B^T diag(c) dy^T x; dx = dy B A (unscaled)."""
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    weight_a = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    weight_b = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    grad_y = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    eta = 2.0
    # (B A) row 0 = A row 0 = [1, 2, 2], norm 3 -> c_0 = 1/sqrt(3 + 1/4); row 1 is zero -> c_1 = eta = 2
    scale = torch.tensor([1 / (3.25**0.5), 2.0], dtype=torch.float64)
    ALLoRAProduct.apply(x, weight_a, weight_b, eta).backward(grad_y)

    hidden = x.detach() @ weight_a.detach().T
    assert torch.allclose(weight_b.grad, scale[:, None] * (grad_y.T @ hidden))
    assert torch.allclose(weight_a.grad, weight_b.detach().T @ torch.diag(scale) @ grad_y.T @ x.detach())
    assert torch.allclose(x.grad, grad_y @ weight_b.detach() @ weight_a.detach())


def plain_lora_grads(x, weight_a, weight_b, grad_y):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight_a, weight_b)]
    ((leaves[0] @ leaves[1].T) @ leaves[2].T).backward(grad_y)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(5, 7, 3, 11), (2, 64, 8, 48), (1, 1, 1, 1)])
def test_forward_is_plain_lora_and_only_parameter_gradients_are_scaled(shape):
    tokens, d_in, rank, d_out = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens, d_in, generator=generator, dtype=torch.float64, requires_grad=True)
    weight_a = torch.randn(rank, d_in, generator=generator, dtype=torch.float64, requires_grad=True)
    weight_b = torch.randn(d_out, rank, generator=generator, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, tokens, d_out, generator=generator, dtype=torch.float64)
    y = ALLoRAProduct.apply(x, weight_a, weight_b, 1.5)
    torch.testing.assert_close(y, (x @ weight_a.T) @ weight_b.T)
    y.backward(grad_y)
    lora_x, lora_a, lora_b = plain_lora_grads(x, weight_a, weight_b, grad_y)
    scale = allora_row_scale(weight_a, weight_b, 1.5).double()
    torch.testing.assert_close(x.grad, lora_x)  # the layer below sees plain LoRA's gradient
    torch.testing.assert_close(weight_b.grad, scale[:, None] * lora_b)
    dense = weight_b.detach() @ weight_a.detach()
    flat_x, flat_dy = x.detach().reshape(-1, d_in), grad_y.reshape(-1, d_out)
    torch.testing.assert_close(weight_a.grad, weight_b.detach().T @ (scale[:, None] * flat_dy.T) @ flat_x)
    torch.testing.assert_close(scale, 1 / (dense.norm(dim=1) + 1 / 1.5**2).sqrt(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("eta", [1.0, 2**0.5, 2.0])
def test_scale_at_zero_b_is_eta(eta):
    scale = allora_row_scale(torch.randn(4, 16), torch.zeros(8, 4), eta)
    torch.testing.assert_close(scale, torch.full((8,), eta))


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(128, 256, 8), (64, 512, 64), (33, 17, 1)])
def test_gram_row_norm_equals_dense_row_norm(d_out, d_in, rank):
    generator = torch.Generator().manual_seed(1)
    weight_a = torch.randn(rank, d_in, generator=generator) / d_in**0.5
    weight_b = torch.randn(d_out, rank, generator=generator)
    dense = (weight_b.double() @ weight_a.double()).norm(dim=1)
    expected = 1 / (dense + 0.25).sqrt()
    torch.testing.assert_close(allora_row_scale(weight_a, weight_b, 2.0).double(), expected, rtol=2e-6, atol=0)


# ---------------------------------------------------------------- inside PEFT


def lora_config(**overrides) -> LoraConfig:
    values = dict(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    return LoraConfig(**{**values, **overrides})


def test_one_sgd_step_from_zero_b_moves_b_by_eta_times_lora():
    ids = torch.tensor([[3, 20, 21, 22, 23, 24]])
    allora = get_peft_model(build_tiny_model(), enable_allora(lora_config(), eta=2.0)).train()
    plain = get_peft_model(build_tiny_model(), lora_config()).train()
    plain.load_state_dict(allora.state_dict())  # the same random A, B = 0
    for model in (allora, plain):
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.SGD([p for p in allora.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in allora.named_parameters() if "lora_B" in n}
    optimizer.step()
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if "lora_B" in n}
    assert len(before) == 6
    for name, start in before.items():
        assert plain_grads[name].abs().sum() > 0
        moved = dict(allora.named_parameters())[name].detach() - start
        torch.testing.assert_close(moved, -0.1 * 2.0 * plain_grads[name], rtol=1e-5, atol=1e-8)


def test_adapter_is_plain_lora_in_vanilla_peft(tmp_path):
    ids = torch.tensor([[3, 20, 21, 22]])
    model = get_peft_model(build_tiny_model(), enable_allora(lora_config(), eta=2.0))
    assert sum(isinstance(m, ALLoRALinear) for m in model.modules()) == 6
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any("allora" in key for key in saved)
    vanilla = PeftModel.from_pretrained(build_tiny_model(), tmp_path).eval()
    assert not any(isinstance(m, ALLoRALinear) for m in vanilla.modules())
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, vanilla(input_ids=ids).logits, rtol=0, atol=0)
    merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, vanilla.merge_and_unload()(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


CONFLICTS = {
    "lora_dropout": dict(lora_dropout=0.05),
    "lora_alpha": dict(lora_alpha=8),
    "use_rslora": dict(use_rslora=True),
    "use_dora": dict(use_dora=True),
    "lora_bias": dict(lora_bias=True),
    "alpha_pattern": dict(alpha_pattern={"q_proj": 4}),
}


@pytest.mark.parametrize("argument", CONFLICTS)
def test_conflicting_lora_settings_are_refused_by_name(argument):
    with pytest.raises(ValueError, match=f"use_allora conflicts with {argument}"):
        enable_allora(lora_config(**CONFLICTS[argument]))


def test_non_linear_target_is_refused_not_silently_plain_lora():
    with pytest.raises(ValueError, match=re.escape("not torch.nn.modules.sparse.Embedding")):
        get_peft_model(build_tiny_model(), enable_allora(lora_config(target_modules=["q_proj", "embed_tokens"])))


@pytest.mark.parametrize("eta", [0.0, -1.0, float("inf")])
def test_eta_must_be_positive(eta):
    with pytest.raises(ValueError, match="allora_eta must be a finite number > 0"):
        SFTConfig("out", use_allora=True, allora_eta=eta, use_cpu=True, bf16=False)


# ---------------------------------------------------------------- the trainer switch


def test_flags_from_python_yaml_and_cli():
    assert SFTConfig("out", use_allora=True, allora_eta=1.5, use_cpu=True, bf16=False).allora_eta == 1.5
    assert GRPOConfig("out", use_allora=True, use_cpu=True, bf16=False).use_allora
    recipe = "examples/configs/sft_allora.yaml"
    _, from_yaml, model_args, _ = make_parser().parse_args_and_config(["--config", recipe])
    assert from_yaml.use_allora and from_yaml.allora_eta == 2.0 and model_args.lora_dropout == 0.0
    _, from_cli, _, _ = make_parser().parse_args_and_config(
        ["--config", recipe, "--use_allora", "false", "--allora_eta", "1.0"]
    )
    assert not from_cli.use_allora and from_cli.allora_eta == 1.0


def test_trainer_without_adapter_is_refused(tmp_path):
    args = SFTConfig(str(tmp_path), use_allora=True, use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match="use_allora=True needs a LoRA adapter"):
        SFTTrainer(str(materialize_model()), args=args, train_dataset=count_sft_dataset(8))


def test_trainer_refuses_conflicting_adapter_by_name(tmp_path):
    args = SFTConfig(str(tmp_path), use_allora=True, use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match="use_allora conflicts with lora_dropout"):
        SFTTrainer(
            str(materialize_model()),
            args=args,
            train_dataset=count_sft_dataset(8),
            peft_config=lora_config(lora_dropout=0.1),
        )


def test_sft_recipe_trains_allora_and_saves_plain_lora(tmp_path):
    trainer = run(["--config", "examples/configs/sft_allora.yaml", "--output_dir", str(tmp_path)])
    assert sum(isinstance(m, ALLoRALinear) for m in trainer.model.modules()) == 14
    eval_losses = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert eval_losses[-1] < eval_losses[0] - 0.3
    assert "allora" in (tmp_path / "README.md").read_text()
    vanilla = PeftModel.from_pretrained(build_tiny_model(), tmp_path).eval()
    ids = torch.tensor([[3, 20, 21, 22]])
    torch.testing.assert_close(trainer.model.eval()(input_ids=ids).logits, vanilla(input_ids=ids).logits)


def test_grpo_trainer_takes_the_same_switch(tmp_path):
    from hf_ext import GRPOTrainer
    from hf_ext.embedded import count_dataset, count_reward

    args = GRPOConfig(
        str(tmp_path),
        use_allora=True,
        num_generations=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    trainer = GRPOTrainer(
        str(materialize_model()), count_reward, args=args, train_dataset=count_dataset(8), peft_config=lora_config()
    )
    assert sum(isinstance(m, ALLoRALinear) for m in trainer.model.modules()) == 6
    assert "allora" in trainer._tag_names


def test_hf_ext_sft_command_runs_the_recipe(tmp_path):
    import subprocess
    import sys

    command = [
        sys.executable,
        "-c",
        "from hf_ext.cli import main; raise SystemExit(main())",
        "sft",
        "--config",
        "examples/configs/sft_allora.yaml",
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--output_dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_gpt2_conv1d_layers_train_with_allora():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    config_lora = dict(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    allora = get_peft_model(GPT2LMHeadModel(config), enable_allora(LoraConfig(**config_lora))).train()
    plain = get_peft_model(GPT2LMHeadModel(config), LoraConfig(**config_lora)).train()
    plain.load_state_dict(allora.state_dict())
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    for model in (allora, plain):
        model(input_ids=ids, labels=ids).loss.backward()
    assert sum(isinstance(m, ALLoRALinear) for m in allora.modules()) == 1
    (name,) = [n for n, _ in allora.named_parameters() if "lora_B" in n]
    allora_grad, plain_grad = dict(allora.named_parameters())[name].grad, dict(plain.named_parameters())[name].grad
    assert plain_grad.abs().sum() > 0
    torch.testing.assert_close(allora_grad, 2.0 * plain_grad)  # B = 0: every row scaled by eta
