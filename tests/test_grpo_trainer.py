"""hf_ext.GRPOTrainer with loss_type="ba": config validation, the loss against the reference formula, exactness
under gradient accumulation and several processes, and a real learning run on the embedded task."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl

from hf_ext import GRPOConfig, GRPOTrainer
from hf_ext.embedded import count_dataset, count_reward, materialize_model
from hf_ext.losses.ba import balanced_aggregation


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
import grpo_fixed_rollouts  # noqa: E402


def tiny_config(tmp_path, **overrides) -> GRPOConfig:
    values = dict(
        output_dir=str(tmp_path),
        loss_type="ba",
        num_generations=3,
        per_device_train_batch_size=6,
        max_completion_length=6,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
    )
    return GRPOConfig(**{**values, **overrides})


# ---------------------------------------------------------------- config-time errors


def test_unknown_loss_type_lists_allowed_values(tmp_path):
    with pytest.raises(ValueError, match=r"loss_type='bal' is not known; allowed values: grpo, .*dapo.*, ba"):
        tiny_config(tmp_path, loss_type="bal")


@pytest.mark.parametrize("field", ["num_generations", "num_generations_eval"])
def test_ba_needs_groups_of_two(tmp_path, field):
    with pytest.raises(ValueError, match=f"{field} must be >= 2, got 1"):
        tiny_config(tmp_path, **{field: 1})


def test_ba_sign_tolerance_must_be_non_negative(tmp_path):
    with pytest.raises(ValueError, match="ba_sign_tolerance"):
        tiny_config(tmp_path, ba_sign_tolerance=-1.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "vespo"])
def test_trl_loss_types_still_accepted(tmp_path, loss_type):
    assert tiny_config(tmp_path, loss_type=loss_type).loss_type == loss_type


def test_ba_with_trl_config_is_refused(tmp_path):
    args = trl.GRPOConfig(output_dir=str(tmp_path), loss_type="ba", use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="needs hf_ext.GRPOConfig"):
        GRPOTrainer(
            model=str(materialize_model()), reward_funcs=count_reward, args=args, train_dataset=count_dataset(8)
        )


def test_non_finite_reward_stops_training_with_the_functions_name(tmp_path):
    def broken_reward(completions, **kwargs):
        return [float("inf")] + [0.0] * (len(completions) - 1)

    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=broken_reward,
        args=tiny_config(tmp_path, max_steps=1),
        train_dataset=count_dataset(8),
    )
    with pytest.raises(ValueError, match="reward_funcs: 'broken_reward' returned a non-finite reward"):
        trainer.train()


# ---------------------------------------------------------------- the loss against the reference formula


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_trainer_loss_and_gradients_match_reference_formula(tmp_path, grad_accum):
    """BA through TRL's code path (advantage rescaling + grpo aggregation) == autograd of the paper's formula."""
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_config(tmp_path),
        train_dataset=count_dataset(8),
    )
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = grad_accum
    generator = torch.Generator().manual_seed(0)
    rows, prompt_len, width = 6, 3, 6
    prompt_ids = torch.randint(3, 35, (rows, prompt_len), generator=generator)
    completion_ids = torch.randint(3, 35, (rows, width), generator=generator)
    lengths = torch.tensor([1, 6, 2, 5, 0, 3])  # two groups of 3; one fully masked (truncated) row
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    advantages = torch.tensor([1.2, -0.4, -0.8, 0.7, 0.5, -1.2])
    output = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
    }
    output["ba_advantage_scale"] = trainer._ba_advantage_scale(output)

    loss = trainer._compute_loss(model, output)
    trainer_grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, prompt_len - 1 : -1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    per_token_loss = -advantages[:, None] * torch.exp(logps - logps.detach())
    reference = balanced_aggregation(per_token_loss, completion_mask.float(), advantages, 3) / grad_accum
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert sum(g.abs().sum() for g in reference_grads) > 1e-3  # the comparison below is not vacuous
    for got, want in zip(trainer_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- exactness: accumulation and processes


def max_param_difference(a: dict, b: dict) -> float:
    return max((a["params"][name] - b["params"][name]).abs().max().item() for name in a["params"])


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory):
    result, _ = grpo_fixed_rollouts.train(
        "ba", per_device_batch=12, grad_accum=1, output_dir=str(tmp_path_factory.mktemp("ref"))
    )
    return result


def test_gradient_accumulation_one_vs_four_is_exact(one_process_reference, tmp_path):
    accumulated, _ = grpo_fixed_rollouts.train("ba", per_device_batch=3, grad_accum=4, output_dir=str(tmp_path))
    assert max_param_difference(one_process_reference, accumulated) < 1e-6
    assert accumulated["losses"] == pytest.approx(one_process_reference["losses"], rel=1e-5, abs=1e-7)


def test_ba_run_differs_from_grpo_run(one_process_reference, tmp_path):
    """The exactness checks compare weights that BA actually moved in its own way."""
    grpo, _ = grpo_fixed_rollouts.train("grpo", per_device_batch=12, grad_accum=1, output_dir=str(tmp_path))
    assert max_param_difference(one_process_reference, grpo) > 1e-4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.multiproc
def test_two_processes_equal_one_process(one_process_reference, tmp_path):
    out = tmp_path / "two.pt"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(REPO / "tests" / "scripts" / "grpo_fixed_rollouts.py"),
        "--per_device_batch",
        "6",
        "--out",
        str(out),
    ]
    log = tmp_path / "launch.log"
    with open(log, "w") as handle:
        subprocess.run(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, timeout=120)
    assert out.exists(), log.read_text()[-3000:]
    two = torch.load(out, weights_only=False)
    assert two["world_size"] == 2
    assert max_param_difference(one_process_reference, two) < 1e-6
    assert two["losses"] == pytest.approx(one_process_reference["losses"], rel=1e-5, abs=1e-7)


def test_model_card_names_the_method_and_its_paper(tmp_path):
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_config(tmp_path),
        train_dataset=count_dataset(8),
    )
    trainer.create_model_card(model_name="tiny-ba")
    card = (tmp_path / "README.md").read_text()
    assert "2605.04077" in card and "zeng2026balanced" in card
    assert "- hf_ext" in card and "- ba" in card
