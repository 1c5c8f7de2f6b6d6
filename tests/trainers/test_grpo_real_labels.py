"""REAL's label modes: "advantage" (the sign of the advantage, any reward) and "binary" (reward exactly 1 or 0, as
the official code; other rewards refused, naming the completion)."""

import pytest
import torch
from runs import tiny_grpo_config
from test_grpo_trainer import crafted_batch

from hf_ext import GRPOTrainer
from hf_ext.embedded import count_dataset, materialize_model


def solved(completions, **kwargs):
    """1 for completions that start with the letter "a" (a binary reward), else 0."""
    text = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if t.strip().startswith("a") else 0.0 for t in text]


def real_trainer(tmp_path, reward_funcs=solved, **overrides) -> GRPOTrainer:
    torch.manual_seed(0)
    return GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=reward_funcs,
        args=tiny_grpo_config(tmp_path, loss_type="real", **overrides),
        train_dataset=count_dataset(12),
    )


BINARY_REWARDS = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0], [0.0]])  # the crafted batch's advantage signs


def test_binary_labels_of_binary_rewards_are_the_advantage_labels(tmp_path):
    by_sign = real_trainer(tmp_path / "a")
    by_reward = real_trainer(tmp_path / "b", real_label_mode="binary")
    by_reward.grpo_loss.observe_rewards(BINARY_REWARDS)
    batches = crafted_batch(), crafted_batch()
    by_sign.grpo_loss.prepare(batches[0], "train")
    by_reward.grpo_loss.prepare(batches[1], "train")
    torch.testing.assert_close(batches[1]["real_coef"], batches[0]["real_coef"])
    assert batches[1]["real_coef"].abs().sum() > 0


def test_binary_labels_follow_the_reward_not_the_advantage(tmp_path):
    """Rewards that disagree with the advantages' signs decide the labels in binary mode."""
    trainer = real_trainer(tmp_path, real_label_mode="binary")
    trainer.grpo_loss.observe_rewards(1 - BINARY_REWARDS)
    batch = crafted_batch()
    trainer.grpo_loss.prepare(batch, "train")
    reference = real_trainer(tmp_path / "ref")
    flipped = {**crafted_batch(), "advantages": -crafted_batch()["advantages"]}
    reference.grpo_loss.prepare(flipped, "train")
    torch.testing.assert_close(batch["real_coef"], flipped["real_coef"])


def test_a_reward_other_than_zero_or_one_is_refused_naming_the_completion(tmp_path):
    trainer = real_trainer(tmp_path, real_label_mode="binary")
    trainer.grpo_loss.observe_rewards(torch.tensor([[1.0], [0.0], [0.5], [1.0], [1.0], [0.0]]))
    with pytest.raises(ValueError, match=r"completion 2 of the generation batch has reward 0.5 \(1 such\)"):
        trainer.grpo_loss.prepare(crafted_batch(), "train")


def test_binary_mode_trains(tmp_path):
    trainer = real_trainer(tmp_path, real_label_mode="binary", max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.grpo_loss.rewards is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"real_label_mode": "strict"}, "real_label_mode='strict' is not known; allowed values: advantage, binary"),
        ({"loss_type": "real_bce", "real_label_mode": "binary"}, "real_label_mode='binary' is for loss_type='real'"),
    ],
)
def test_bad_label_modes_fail_at_config_time(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_grpo_config(tmp_path, **{"loss_type": "real", **overrides})
