"""GTPO's H_ini (the initial mean entropy that turns the entropy filter on or off): measured on training data only,
saved with every checkpoint and restored on resume, so a resumed run filters as the uninterrupted one."""

import json

import pytest
from runs import tiny_grpo_config

from hf_ext import GRPOTrainer
from hf_ext.embedded import count_dataset, count_reward, materialize_model
from hf_ext.trainers.grpo import LOSS_STATE


def gtpo_trainer(output_dir, **overrides) -> GRPOTrainer:
    values = dict(loss_type="gtpo", max_steps=4, logging_steps=1, learning_rate=1e-2, seed=0)
    values |= dict(save_strategy="steps", save_steps=2, per_device_eval_batch_size=6)
    return GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_grpo_config(output_dir, **{**values, **overrides}),
        train_dataset=count_dataset(24),
        eval_dataset=count_dataset(6, seed=1),
    )


def logged(trainer, name: str) -> dict[int, float]:
    """``name`` as logged at the steps after the checkpoint (a resumed run's history holds the earlier ones too)."""
    return {entry["step"]: entry[name] for entry in trainer.state.log_history if name in entry and entry["step"] > 2}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = gtpo_trainer(tmp_path_factory.mktemp("gtpo_run"))
    trainer.train()
    return trainer


def test_resume_keeps_the_measured_initial_entropy(uninterrupted, tmp_path):
    checkpoint = uninterrupted.args.output_dir + "/checkpoint-2"
    saved = json.loads(open(f"{checkpoint}/{LOSS_STATE}").read())
    assert saved == {"loss_type": "gtpo", "state": {"initial_entropy": uninterrupted.grpo_loss.initial_entropy}}
    resumed = gtpo_trainer(uninterrupted.args.output_dir)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.grpo_loss.initial_entropy == uninterrupted.grpo_loss.initial_entropy
    assert logged(resumed, "gtpo/H_ini") == logged(uninterrupted, "gtpo/H_ini") != {}
    assert logged(resumed, "gtpo/filtered_frac") == logged(uninterrupted, "gtpo/filtered_frac")


def test_without_the_saved_state_a_resume_measures_again_and_says_so(uninterrupted, tmp_path):
    """The control of the test above: H_ini measured on the resumed run's first batch is another number."""
    import shutil

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(uninterrupted.args.output_dir + "/checkpoint-2", checkpoint)
    (checkpoint / LOSS_STATE).unlink()
    record = json.loads((checkpoint / "hf_ext_checkpoint.json").read_text())
    record["files"].pop(LOSS_STATE)
    (checkpoint / "hf_ext_checkpoint.json").write_text(json.dumps(record))
    resumed = gtpo_trainer(tmp_path, overwrite_output_dir=True)
    with pytest.warns(UserWarning, match=f"has no {LOSS_STATE}: loss_type='gtpo' starts its own state afresh"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.grpo_loss.initial_entropy != uninterrupted.grpo_loss.initial_entropy


def test_an_evaluation_before_training_does_not_fix_the_initial_entropy(tmp_path):
    trainer = gtpo_trainer(tmp_path, max_steps=1, save_strategy="no")
    trainer.evaluate()
    assert trainer.grpo_loss.initial_entropy is None
    trainer.train()
    assert trainer.grpo_loss.initial_entropy is not None


def test_a_checkpoint_of_another_loss_type_is_refused(uninterrupted, tmp_path):
    checkpoint = uninterrupted.args.output_dir + "/checkpoint-2"
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_grpo_config(tmp_path, loss_type="ba", max_steps=4, seed=0),
        train_dataset=count_dataset(24),
    )
    with pytest.raises(ValueError, match="holds the state of loss_type='gtpo', but this run trains loss_type='ba'"):
        trainer.train(resume_from_checkpoint=checkpoint)
