"""Rewards that would silently teach nothing stop the run, naming the reward function and the completion, with the
batch saved in output_dir; TRL's per-completion None (unscorable) stays allowed."""

import json
import re

import numpy as np
import pytest
import torch
from test_grpo_trainer import tiny_config
from transformers import AutoModelForSequenceClassification

from hf_ext import GRPOTrainer
from hf_ext.embedded import count_dataset, count_reward, materialize_model


def train_one_step(tmp_path, reward_funcs) -> GRPOTrainer:
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=reward_funcs,
        args=tiny_config(tmp_path, max_steps=1),
        train_dataset=count_dataset(8),
    )
    trainer.train()
    return trainer


def overflowing_reward(completions, **kwargs):  # finite in float64, inf once TRL casts it to float32
    return [1e39] + [0.0] * (len(completions) - 1)


async def async_inf_reward(completions, **kwargs):
    return [0.0, float("inf")] + [0.0] * (len(completions) - 2)


async def async_overflowing_reward(completions, **kwargs):
    return overflowing_reward(completions)


def text_reward(completions, **kwargs):
    return [0.0, 0.0, "0.5"] + [0.0] * (len(completions) - 3)


def scalar_reward(completions, **kwargs):
    return 0.5


def string_instead_of_list_reward(completions, **kwargs):
    return "0.5"


def unscorable_reward(completions, **kwargs):
    return [None] * len(completions)


def nan_reward_model():
    """A sequence-classification model on the embedded model whose score head is NaN: every score is NaN."""
    model = AutoModelForSequenceClassification.from_pretrained(str(materialize_model()), num_labels=1)
    torch.nn.init.constant_(model.score.weight, float("nan"))
    return model


FAULTS = {
    "overflow_sync": ([overflowing_reward], r"'overflowing_reward' returned a non-finite reward \(1e\+39; inf as"),
    "inf_async": ([async_inf_reward], r"'async_inf_reward' returned a non-finite reward \(inf; .* completion 1 "),
    "overflow_async": ([async_overflowing_reward], r"'async_overflowing_reward' returned a non-finite reward \(1e"),
    "string_reward": ([text_reward], r"'text_reward' returned a str \('0\.5'\) for completion 2 "),
    "scalar_instead_of_list": ([scalar_reward], r"'scalar_reward' returned a float \(0\.5\) instead of a list"),
    "string_instead_of_list": ([string_instead_of_list_reward], r"returned a str \('0\.5'\) instead of a list"),
    "all_none": ([unscorable_reward], r"every reward function \(unscorable_reward\) returned None for all 6"),
    "reward_model_nan": (nan_reward_model, r"reward model '[^']+' scored completion 0 nan \(6 non-finite scores"),
}


@pytest.mark.parametrize("case", FAULTS, ids=list(FAULTS))
def test_reward_fault_names_function_and_completion_and_saves_the_batch(tmp_path, case):
    reward_funcs, message = FAULTS[case]
    reward_funcs = [reward_funcs()] if case == "reward_model_nan" else reward_funcs  # built here: it loads weights
    with pytest.raises(ValueError, match=message) as raised:
        train_one_step(tmp_path, reward_funcs)
    saved = re.search(r"saved in (\S+\.json)", str(raised.value)).group(1)
    assert saved == str(tmp_path / "reward_fault_batch_process0.json")
    batch = json.loads((tmp_path / "reward_fault_batch_process0.json").read_text())
    assert batch["step"] == 0 and len(batch["prompts"]) == len(batch["completions"]) == 6
    assert set(batch["prompts"]) <= set(count_dataset(8)["prompt"])
    assert not (tmp_path / "model.safetensors").exists()


def array_reward(completions, **kwargs):
    return np.array(count_reward(completions=completions, **kwargs))


def test_none_for_some_completions_or_from_one_function_still_trains(tmp_path):
    """TRL's None marks one completion, or every completion of one function, unscorable; arrays are lists."""

    def partly_unscorable(completions, **kwargs):
        return [None, *count_reward(completions=completions[1:], prompts=kwargs["prompts"][1:])]

    trainer = train_one_step(tmp_path, [partly_unscorable, unscorable_reward, array_reward])
    assert trainer.state.global_step == 1
    assert not (tmp_path / "reward_fault_batch_process0.json").exists()
