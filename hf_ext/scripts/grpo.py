"""GRPO training script: TRL's `trl grpo` with hf_ext's trainer, embedded default model and task.

    accelerate launch examples/grpo.py --config examples/configs/grpo_ba.yaml
    hf-ext grpo --config examples/configs/grpo_ba.yaml --loss_type ba --max_steps 20

`--model_name_or_path` takes a Hub id, a local path or `embedded:tiny-qwen2` (the default); `--dataset_name`
takes a Hub dataset, a local one or `embedded:count` (the default, whose reward is `count_reward`).
"""

import importlib
import os
import sys
from dataclasses import dataclass

from trl import DatasetMixtureConfig, ModelConfig, TrlParser
from trl.scripts.grpo import GRPOScriptArguments as TrlGRPOScriptArguments

from hf_ext.embedded import EMBEDDED_TASK
from hf_ext.scripts.common import EmbeddedDatasetArguments, finish, load_datasets, model_and_init_kwargs
from hf_ext.trainers import GRPOConfig


@dataclass
class GRPOScriptArguments(EmbeddedDatasetArguments, TrlGRPOScriptArguments):
    """TRL's GRPO script arguments, with the embedded task as the default dataset."""


def load_reward_funcs(names: list[str] | None, dataset_name: str | None) -> list:
    """Reward functions by dotted import path; the embedded task's own reward when none is named for it."""
    from hf_ext.embedded import count_reward

    if not names:
        if dataset_name == EMBEDDED_TASK:
            return [count_reward]
        raise ValueError(
            "reward_funcs is empty: name at least one reward function by dotted import path "
            "(e.g. 'trl.rewards.accuracy_reward' or 'my_module.my_reward')."
        )
    funcs = []
    for name in names:
        if name == "count_reward":
            funcs.append(count_reward)
            continue
        module_path, _, attr = name.rpartition(".")
        if not module_path:
            raise ValueError(f"reward_funcs: {name!r} is neither 'count_reward' nor a dotted import path.")
        sys.path.insert(0, os.getcwd())
        funcs.append(getattr(importlib.import_module(module_path), attr))
    return funcs


def main(
    script_args: GRPOScriptArguments,
    training_args: GRPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
):
    from trl import get_peft_config, get_quantization_config

    from hf_ext.embedded import count_dataset
    from hf_ext.trainers import GRPOTrainer

    model = model_and_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args.seed, count_dataset)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=load_reward_funcs(script_args.reward_funcs, script_args.dataset_name),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return finish(trainer, training_args, script_args.dataset_name)


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def run(argv: list[str] | None = None):
    """Parse `argv` (YAML via --config, then flags) and train; unknown fields are an error."""
    return main(*make_parser().parse_args_and_config(argv))


if __name__ == "__main__":
    run()
