"""hf_ext.GRPOTrainer with loss_type="ba": config validation, the loss against the reference formula, exactness
under gradient accumulation and several processes, and a real learning run on the embedded task."""

import re
import sys
from pathlib import Path

import pytest
import torch
import trl

from hf_ext import GRPOConfig, GRPOTrainer
from hf_ext.embedded import count_dataset, count_reward, materialize_model
from hf_ext.losses.ba import balanced_aggregation
from hf_ext.losses.gtpo import conflict_weights
from hf_ext.losses.real import real_bce_loss, real_bce_targets, real_group_loss, real_labels


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "launched"))
import grpo_fixed_rollouts  # noqa: E402
from multiproc import launch_two_processes  # noqa: E402
from runs import tiny_grpo_config  # noqa: E402


def tiny_config(tmp_path, **overrides) -> GRPOConfig:
    return tiny_grpo_config(tmp_path, **{"loss_type": "ba", "gradient_checkpointing": False, **overrides})


# ---------------------------------------------------------------- config-time errors


def test_unknown_loss_type_lists_allowed_values(tmp_path):
    with pytest.raises(ValueError, match=r"loss_type='bal' is not known; allowed values: .*\bgrpo, .*dapo.*, ba"):
        tiny_config(tmp_path, loss_type="bal")


@pytest.mark.parametrize("field", ["num_generations", "num_generations_eval"])
def test_ba_needs_groups_of_two(tmp_path, field):
    with pytest.raises(ValueError, match=f"{field} must be >= 2, got 1"):
        tiny_config(tmp_path, **{field: 1})


def test_ba_sign_tolerance_must_be_non_negative(tmp_path):
    with pytest.raises(ValueError, match="ba_sign_tolerance"):
        tiny_config(tmp_path, ba_sign_tolerance=-1.0)


BAD_CONFIGS = {
    "real_tau_zero": (dict(loss_type="real", real_tau=0.0), "real_tau must be a finite number > 0, got 0.0"),
    "real_unknown_variant": (dict(loss_type="real", real_variant="pairs"), "real_variant='pairs' is not known"),
    "real_off_policy_split_groups": (
        dict(loss_type="real", num_iterations=2, per_device_train_batch_size=4, gradient_accumulation_steps=3),
        "per_device_train_batch_size must be a multiple of num_generations, got 4 and 3",
    ),
    "real_entropy_mask": (dict(loss_type="real_bce", top_entropy_quantile=0.2), "top_entropy_quantile must be 1.0"),
    "real_one_generation": (dict(loss_type="real", num_generations=1), "num_generations must be >= 2, got 1"),
    "gtpo_beta": (dict(loss_type="gtpo", beta=0.04), "beta must be 0.0, got 0.04"),
    "gtpo_mode": (dict(loss_type="gtpo", gtpo_filter_mode="on"), "gtpo_filter_mode='on' is not known"),
    "gtpo_combine": (dict(loss_type="gtpo", gtpo_conflict_combine="max"), "gtpo_conflict_combine='max' is not"),
    "gtpo_threshold": (dict(loss_type="gtpo", gtpo_entropy_threshold=0.0), "gtpo_entropy_threshold must be"),
    "gtpo_weight": (dict(loss_type="gtpo", gtpo_conflict_weight=-1.0), "gtpo_conflict_weight must be"),
    "gtpo_initial_entropy": (dict(loss_type="gtpo", gtpo_initial_entropy=-0.5), "gtpo_initial_entropy must be"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_bad_method_arguments_fail_at_config_time(tmp_path, case):
    overrides, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(tmp_path, **overrides)


def test_real_bce_accepts_off_policy_steps(tmp_path):
    assert tiny_config(tmp_path, loss_type="real_bce", num_iterations=2).num_iterations == 2


def test_gtpo_loads_no_reference_model(tmp_path):
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_config(tmp_path, loss_type="gtpo"),
        train_dataset=count_dataset(8),
    )
    assert trainer.ref_model is None


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "vespo"])
def test_trl_loss_types_still_accepted(tmp_path, loss_type):
    assert tiny_config(tmp_path, loss_type=loss_type).loss_type == loss_type


def test_ba_with_trl_config_is_refused(tmp_path):
    args = trl.GRPOConfig(output_dir=str(tmp_path), loss_type="ba", use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="needs hf_ext.GRPOConfig"):
        GRPOTrainer(
            model=str(materialize_model()), reward_funcs=count_reward, args=args, train_dataset=count_dataset(8)
        )


def test_trl_config_runs_trl_losses_and_gets_a_card(tmp_path):
    """A plain trl.GRPOConfig carries no hf_ext switch: TRL's loss runs as is, and the card still gets written."""
    args = tiny_grpo_config(tmp_path, trl.GRPOConfig, max_completion_length=4, max_steps=1)
    trainer = GRPOTrainer(
        model=str(materialize_model()), reward_funcs=count_reward, args=args, train_dataset=count_dataset(12)
    )
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "library_name: transformers" in card and "No hf_ext method beyond GRPO's defaults." in card


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


PROMPT_LEN, WIDTH = 3, 6


def crafted_batch() -> dict:
    """Two groups of 3 rows with very different lengths, one fully masked (truncated) row, shared prefixes."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, 35, (6, PROMPT_LEN), generator=generator)
    completion_ids = torch.randint(3, 35, (6, WIDTH), generator=generator)
    completion_ids[:3, :2] = completion_ids[0, :2]  # group 1 shares a 2-token prefix: GTPO conflict tokens
    lengths = torch.tensor([1, 6, 2, 5, 0, 3])
    completion_mask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.4, -0.8, 0.7, 0.5, -1.2]),
        "num_items_in_batch": completion_mask.sum(),
    }


def independent_logps_and_entropies(model, batch):
    """Token log-probs and entropies from a plain forward pass (not TRL's fused head)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    logits = model(input_ids=input_ids).logits[:, PROMPT_LEN - 1 : -1].float()
    log_probs = torch.log_softmax(logits, -1)
    logps = log_probs.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    return logps, -(log_probs.exp() * log_probs).sum(-1)


def reference_loss(loss_type: str, logps, entropies, batch) -> torch.Tensor:
    """Each paper's objective written directly from the reference math, on-policy (ratio 1, s = 0)."""
    mask, advantages = batch["completion_mask"].float(), batch["advantages"]
    if loss_type == "ba":
        per_token_loss = -advantages[:, None] * torch.exp(logps - logps.detach())
        return balanced_aggregation(per_token_loss, mask, advantages, 3)
    scores = (logps - logps.detach()).mul(mask).sum(-1) / mask.sum(-1).clamp(min=1)
    if loss_type == "real":
        positive, negative = real_labels(advantages, mask)
        return real_group_loss(scores, positive, negative, 3, tau=0.5)
    if loss_type == "real_bce":
        return real_bce_loss(scores, *real_bce_targets(advantages, mask, 3), tau=0.5)
    # gtpo, filter off (the tiny model's initial entropy is above ln 2): A' = A - 0.1 * mean entropy
    mean_entropies = (entropies.detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    token_advantages = (advantages - 0.1 * mean_entropies)[:, None] * conflict_weights(
        batch["completion_ids"], batch["completion_mask"], advantages, 3
    )
    per_token_loss = -token_advantages * torch.exp(logps - logps.detach())
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


@pytest.mark.parametrize(
    ("loss_type", "grad_accum"), [("ba", 1), ("ba", 3), ("real", 1), ("real", 3), ("real_bce", 1), ("gtpo", 3)]
)
def test_trainer_gradients_match_reference_formula(tmp_path, loss_type, grad_accum):
    """The trainer's loss (generation-time step + micro-batch loss) has the gradient of the paper's objective."""
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_config(tmp_path, loss_type=loss_type),
        train_dataset=count_dataset(8),
    )
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = grad_accum
    batch = crafted_batch()
    trainer.grpo_loss.prepare(batch, "train")

    loss = trainer._compute_loss(model, batch)
    trainer_grads = torch.autograd.grad(loss, list(model.parameters()))
    reference = reference_loss(loss_type, *independent_logps_and_entropies(model, batch), crafted_batch())
    accumulation = 1 if loss_type == "real_bce" else grad_accum  # BCE's normaliser spans the generation batch
    reference_grads = torch.autograd.grad(reference / accumulation, list(model.parameters()))

    if loss_type != "real":  # REAL's loss is a surrogate with REAL's gradient and the value 0
        assert loss.item() == pytest.approx(reference.item() / accumulation, rel=1e-5, abs=1e-7)
    assert sum(g.abs().sum() for g in reference_grads) > 1e-3  # the comparison below is not vacuous
    for got, want in zip(trainer_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "initial_entropy", "moves"),
    [("always", None, False), ("never", None, True), ("auto", None, True), ("auto", 0.0, False)],
)
def test_gtpo_entropy_filter_switches_rows_off(tmp_path, mode, initial_entropy, moves):
    """With threshold 0.01 every crafted completion (mean entropy about 3.5) is above it: the filter, when on,
    drops every row. "auto" is on only when H_ini is below the threshold: measured (about 3.5) it is off, given as
    0.0 it is on."""
    config = tiny_config(
        tmp_path,
        loss_type="gtpo",
        gtpo_filter_mode=mode,
        gtpo_entropy_threshold=0.01,
        gtpo_initial_entropy=initial_entropy,
    )
    trainer = GRPOTrainer(
        model=str(materialize_model()), reward_funcs=count_reward, args=config, train_dataset=count_dataset(8)
    )
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = crafted_batch()
    trainer.grpo_loss.prepare(batch, "train")
    grads = torch.autograd.grad(trainer._compute_loss(model, batch), list(model.parameters()), allow_unused=True)
    total = sum(g.abs().sum().item() for g in grads if g is not None)
    assert (total > 1e-6) == moves
    filtered = trainer._metrics["train"]["gtpo/filtered_frac"][-1]
    assert filtered == pytest.approx(0.0 if moves else 5 / 6)  # the fully masked row has no entropy to filter


# ---------------------------------------------------------------- exactness: accumulation and processes


def max_param_difference(a: dict, b: dict) -> float:
    return max((a["params"][name] - b["params"][name]).abs().max().item() for name in a["params"])


HF_EXT_LOSSES = ["ba", "real", "real_bce", "gtpo"]
_references = {}


def one_process_reference(loss_type: str, tmp_path_factory) -> dict:
    if loss_type not in _references:
        output_dir = str(tmp_path_factory.mktemp(f"ref_{loss_type}"))
        _references[loss_type], _ = grpo_fixed_rollouts.train(loss_type, 12, 1, output_dir=output_dir)
    return _references[loss_type]


@pytest.mark.parametrize("loss_type", HF_EXT_LOSSES)
def test_gradient_accumulation_one_vs_four_is_exact(loss_type, tmp_path_factory, tmp_path):
    reference = one_process_reference(loss_type, tmp_path_factory)
    accumulated, _ = grpo_fixed_rollouts.train(loss_type, per_device_batch=3, grad_accum=4, output_dir=str(tmp_path))
    assert max_param_difference(reference, accumulated) < 5e-6
    assert accumulated["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("loss_type", HF_EXT_LOSSES)
def test_each_loss_moves_the_weights_its_own_way(loss_type, tmp_path_factory, tmp_path):
    """The exactness checks compare weights that each loss actually moved, differently from TRL's grpo."""
    grpo, _ = grpo_fixed_rollouts.train("grpo", per_device_batch=12, grad_accum=1, output_dir=str(tmp_path))
    assert max_param_difference(one_process_reference(loss_type, tmp_path_factory), grpo) > 1e-2


@pytest.mark.multiproc
@pytest.mark.parametrize("loss_type", HF_EXT_LOSSES)
def test_two_processes_equal_one_process(loss_type, tmp_path_factory, tmp_path):
    script = REPO / "tests" / "launched" / "grpo_fixed_rollouts.py"
    two = launch_two_processes(script, ["--loss_type", loss_type, "--per_device_batch", "6"], tmp_path / "two.pt")
    reference = one_process_reference(loss_type, tmp_path_factory)
    assert max_param_difference(reference, two) < 5e-6
    assert two["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-7)


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
