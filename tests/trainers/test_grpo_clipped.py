"""The contract of hf_ext.trainers.grpo_clipped.ClippedGRPOLoss: with advantages unchanged it is TRL's own
``loss_type="grpo"`` loss, for every TRL option of the clipped objective it claims (clip range, delta, sequence-level
ratios, KL and its bias correction, top-entropy and off-policy masks, static and adaptive entropy bonus). Both run on
the same tensors: TRL's ``_compute_loss`` of a trainer built from a plain ``trl.GRPOConfig`` against the hf_ext loss
object of a trainer with the same options; value, gradient and the metrics TRL logs must agree."""

import pytest
import torch
import trl
from runs import tiny_grpo_config
from test_grpo_trainer import crafted_batch, independent_logps_and_entropies

from hf_ext import GRPOConfig, GRPOTrainer
from hf_ext.embedded import count_dataset, count_reward, materialize_model
from hf_ext.trainers import ClippedGRPOLoss


OPTIONS = {
    "defaults": {},
    "clip_range_and_delta": dict(epsilon=0.1, epsilon_high=0.28, delta=1.05),
    "sequence_ratio": dict(importance_sampling_level="sequence", epsilon=0.02),
    "kl": dict(beta=0.04),
    "kl_bias_correction": dict(beta=0.04, use_bias_correction_kl=True),
    "top_entropy": dict(top_entropy_quantile=0.5),
    "off_policy_mask": dict(off_policy_mask_threshold=0.01),
    "entropy_bonus": dict(entropy_coef=0.05),
    "adaptive_entropy": dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0),
}


class Plain(ClippedGRPOLoss):
    """GRPO itself: the advantages as they come (not registered; installed on one trainer by hand)."""

    name = "plain_grpo_contract"

    def advantages(self, inputs, entropies, mask, mode):
        return inputs["advantages"]


def build(config_cls, tmp_path, **options):
    torch.manual_seed(0)
    return GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_grpo_config(tmp_path, config_cls, loss_type="grpo", **options),
        train_dataset=count_dataset(8),
    )


def batch(model) -> dict:
    """test_grpo_trainer's crafted batch, with old and reference log-probs that put the ratios well off 1, on both
    sides of the clip range."""
    inputs = crafted_batch()
    with torch.no_grad():
        logps, _ = independent_logps_and_entropies(model, inputs)
    generator = torch.Generator().manual_seed(1)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=generator)
    inputs["ref_per_token_logps"] = logps + 0.5 * torch.randn(logps.shape, generator=generator)
    return inputs


@pytest.mark.parametrize("case", OPTIONS, ids=list(OPTIONS))
def test_clipped_loss_equals_trl_grpo_on_the_same_tensors(tmp_path, case):
    trl_trainer = build(trl.GRPOConfig, tmp_path / "trl", **OPTIONS[case])
    own_trainer = build(GRPOConfig, tmp_path / "own", **OPTIONS[case])
    own_trainer.grpo_loss = Plain(own_trainer)
    assert trl_trainer.grpo_loss is None  # TRL's _compute_loss runs there
    inputs = batch(trl_trainer.model)
    for trainer in (trl_trainer, own_trainer):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2
    for _ in range(3):  # the adaptive entropy controller moves between calls
        results = []
        for trainer in (trl_trainer, own_trainer):
            loss = trainer._compute_loss(trainer.model, dict(inputs))
            grads = torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad])
            results.append((loss, grads))
        (trl_loss, trl_grads), (own_loss, own_grads) = results
        torch.testing.assert_close(own_loss, trl_loss, rtol=1e-6, atol=1e-8)
        assert sum(g.abs().sum() for g in trl_grads) > 1e-4  # the comparison is not vacuous
        for own, theirs in zip(own_grads, trl_grads, strict=True):
            torch.testing.assert_close(own, theirs, rtol=1e-5, atol=1e-8)
    assert own_trainer.entropy_coef == trl_trainer.entropy_coef
    trl_metrics, own_metrics = trl_trainer._metrics["train"], own_trainer._metrics["train"]
    assert set(own_metrics) == set(trl_metrics)
    for name, values in trl_metrics.items():
        assert own_metrics[name] == pytest.approx(values, rel=1e-6, nan_ok=True), name
