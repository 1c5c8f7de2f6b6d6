"""GRPO training script: TRL's `trl grpo` with hf_ext's trainer, embedded default model and task.

    accelerate launch examples/grpo.py --config examples/configs/grpo_ba.yaml
    hf-ext grpo --config examples/configs/grpo_ba.yaml --loss_type ba --max_steps 20

`--model_name_or_path` takes a Hub id, a local path or `embedded:tiny-qwen2` (the default); `--dataset_name`
takes a Hub dataset, a local one or `embedded:count` (the default, whose reward is `count_reward`).
"""

import importlib
import os
import sys
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, TrlParser
from trl.scripts.grpo import GRPOScriptArguments as TrlGRPOScriptArguments

from hf_ext.embedded import EMBEDDED_MODEL, EMBEDDED_TASK
from hf_ext.trainers import GRPOConfig


@dataclass
class GRPOScriptArguments(TrlGRPOScriptArguments):
    """TRL's GRPO script arguments, with the embedded task as the default dataset."""

    dataset_name: str | None = field(
        default=EMBEDDED_TASK,
        metadata={"help": f"Hub or local dataset, or {EMBEDDED_TASK!r} (the embedded counting task, the default)."},
    )
    num_train_examples: int = field(
        default=512, metadata={"help": f"Prompts generated for {EMBEDDED_TASK!r}; ignored for other datasets."}
    )


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


def load_train_dataset(script_args: GRPOScriptArguments, dataset_args: DatasetMixtureConfig, seed: int):
    from datasets import load_dataset
    from trl import get_dataset

    from hf_ext.embedded import count_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)[script_args.dataset_train_split]
    if script_args.dataset_name == EMBEDDED_TASK:
        return count_dataset(script_args.num_train_examples, seed=seed)
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    return dataset[script_args.dataset_train_split]


def main(
    script_args: GRPOScriptArguments,
    training_args: GRPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
):
    from trl import get_peft_config, get_quantization_config

    from hf_ext.embedded import resolve_model
    from hf_ext.trainers import GRPOTrainer

    model = resolve_model(model_args.model_name_or_path or EMBEDDED_MODEL)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=load_reward_funcs(script_args.reward_funcs, script_args.dataset_name),
        args=training_args,
        train_dataset=load_train_dataset(script_args, dataset_args, training_args.seed),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Let every rank's last collective finish and its gloo worker threads drop their tensors before the group goes:
    # otherwise freeing the DDP reducer can deadlock at exit (seen on CPU/gloo with torch 2.13, about 1 run in 5).
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def run(argv: list[str] | None = None):
    """Parse `argv` (YAML via --config, then flags) and train; unknown fields are an error.

    Absolute imports throughout: `accelerate launch` runs this file as a script.
    """
    args = make_parser().parse_args_and_config(argv)
    return main(*args)


if __name__ == "__main__":
    run()
