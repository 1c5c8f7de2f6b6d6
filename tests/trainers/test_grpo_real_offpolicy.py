"""REAL off-policy, the paper's recipe (several optimizer steps per generation batch, or num_iterations > 1): each
micro-batch holds whole groups, so REAL's group log-sum-exp is evaluated exactly at s != 0. Checked against
autograd of the paper's objective on a crafted batch, and for exactness under gradient accumulation and 2 processes
(where every optimizer step covers the whole generation batch, so the group shuffle cannot change a step)."""

import sys

import pytest
import torch
from runs import REPO, tiny_grpo_config
from test_grpo_trainer import crafted_batch, independent_logps_and_entropies, max_param_difference

from hf_ext import GRPOTrainer
from hf_ext.embedded import count_dataset, count_reward, materialize_model
from hf_ext.losses.real import real_group_loss, real_labels
from hf_ext.trainers.grpo import fold_groups, unfold_groups


sys.path.insert(0, str(REPO / "tests" / "launched"))
import grpo_fixed_rollouts  # noqa: E402
from multiproc import launch_two_processes  # noqa: E402


def test_off_policy_gradient_is_the_group_loss_at_the_current_scores(tmp_path):
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_grpo_config(tmp_path, loss_type="real", num_iterations=2),
        train_dataset=count_dataset(8),
    )
    assert trainer.grpo_loss.whole_groups()
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = crafted_batch()
    with torch.no_grad():
        logps, _ = independent_logps_and_entropies(model, batch)
    batch["old_per_token_logps"] = logps + 0.4 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(3))
    reference_batch = {**batch}
    trainer.grpo_loss.prepare(batch, "train")
    assert "real_coef" not in batch and batch["real_positive"].any() and batch["real_negative"].any()
    loss = trainer._compute_loss(model, batch)
    mask = reference_batch["completion_mask"].float()
    new_logps, _ = independent_logps_and_entropies(model, reference_batch)
    scores = ((new_logps - reference_batch["old_per_token_logps"]) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    assert scores.abs().max() > 0.05  # off-policy: the scores are not 0
    reference = real_group_loss(scores, *real_labels(reference_batch["advantages"], mask), 3, tau=0.5) / 2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    parameters = list(model.parameters())
    for got, want in zip(
        torch.autograd.grad(loss, parameters), torch.autograd.grad(reference, parameters), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_folding_keeps_groups_together_through_trl_s_shuffle_and_split():
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    batch = {
        "completion_ids": torch.arange(12)[:, None].repeat(1, 2),
        "advantages": torch.arange(12.0),
        "num_items_in_batch": torch.tensor(24),
        "names": [f"row{i}" for i in range(12)],
        "old_per_token_logps": None,
    }
    torch.manual_seed(0)
    chunks = [unfold_groups(c) for c in split_tensor_dict(shuffle_sequence_dict(fold_groups(batch, 3)), 2)]
    rows = torch.cat([c["advantages"] for c in chunks]).long()
    assert sorted(rows.tolist()) == list(range(12)) and rows.tolist() != list(range(12))
    for chunk in chunks:
        groups = chunk["advantages"].long().view(-1, 3)
        assert (groups - groups[:, :1] == torch.arange(3)).all() and (groups[:, 0] % 3 == 0).all()
        assert chunk["names"] == [f"row{i}" for i in chunk["advantages"].long().tolist()]
        assert chunk["num_items_in_batch"].item() == 24 and chunk["old_per_token_logps"] is None
    with pytest.raises(ValueError, match="does not hold whole groups of 5"):
        fold_groups(batch, 5)


_reference = {}


def reference_run(tmp_path_factory) -> dict:
    if "real" not in _reference:
        _reference["real"], _ = grpo_fixed_rollouts.train(
            "real", 16, 1, output_dir=str(tmp_path_factory.mktemp("real_offpolicy")), num_iterations=2
        )
    return _reference["real"]


def test_gradient_accumulation_one_vs_four_is_exact_off_policy(tmp_path_factory, tmp_path):
    reference = reference_run(tmp_path_factory)
    accumulated, _ = grpo_fixed_rollouts.train("real", 4, 4, output_dir=str(tmp_path), num_iterations=2)
    assert max_param_difference(reference, accumulated) < 5e-6
    assert accumulated["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-7)


@pytest.mark.multiproc
def test_two_processes_equal_one_process_off_policy(tmp_path_factory, tmp_path):
    script = REPO / "tests" / "launched" / "grpo_fixed_rollouts.py"
    arguments = ["--loss_type", "real", "--per_device_batch", "8", "--num_iterations", "2"]
    two = launch_two_processes(script, arguments, tmp_path / "two.pt")
    reference = reference_run(tmp_path_factory)
    assert max_param_difference(reference, two) < 5e-6
    assert two["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-7)
