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

from hf_ext.scripts.quiet import muted_import_notices


with muted_import_notices():  # in a rank that accelerate launched: the HF stack's first import
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from hf_ext.embedded import EMBEDDED_TASK
    from hf_ext.scripts.common import EmbeddedDatasetArguments, parse_recipe, train
    from hf_ext.trainers import GRPOConfig, load_entry_point_losses
    from hf_ext.trainers.trl_compat import GRPOScriptArguments as TrlGRPOScriptArguments

    load_entry_point_losses()  # losses of installed packages (entry-point group hf_ext.grpo_losses) get their fields


@dataclass
class GRPOScriptArguments(EmbeddedDatasetArguments, TrlGRPOScriptArguments):
    """TRL's GRPO script arguments, with the embedded task as the default dataset."""


def load_reward_funcs(names: list[str] | None, dataset_name: str | None) -> list:
    """Reward functions by dotted import path (the working directory importable), each callable; the embedded task's
    own reward when none is named for it. What they return is checked as they run (``hf_ext.GRPOTrainer``)."""
    from hf_ext.embedded import count_reward

    if not names:
        if dataset_name == EMBEDDED_TASK:
            return [count_reward]
        raise ValueError(
            "reward_funcs is empty: name at least one reward function by dotted import path "
            "(e.g. 'trl.rewards.accuracy_reward' or 'my_module.my_reward')."
        )
    sys.path.insert(0, os.getcwd())
    funcs = []
    for name in names:
        if name == "count_reward":
            funcs.append(count_reward)
            continue
        module_path, _, attr = name.rpartition(".")
        if not module_path:
            raise ValueError(f"reward_funcs: {name!r} is neither 'count_reward' nor a dotted import path.")
        module = importlib.import_module(module_path)
        func = getattr(module, attr, None)
        if not callable(func):
            found = f"a {type(func).__name__}" if hasattr(module, attr) else "not defined"
            raise ValueError(
                f"reward_funcs: {name!r} is no function ({attr!r} in module {module_path!r} is {found}). Name a "
                "function taking prompts and completions (keyword arguments) and returning one reward per completion."
            )
        funcs.append(func)
    return funcs


def main(
    script_args: GRPOScriptArguments,
    training_args: GRPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
):
    from hf_ext.embedded import count_dataset
    from hf_ext.trainers import GRPOTrainer

    reward_funcs = load_reward_funcs(script_args.reward_funcs, script_args.dataset_name)
    return train(
        GRPOTrainer, script_args, training_args, model_args, dataset_args, count_dataset, reward_funcs=reward_funcs
    )


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def run(argv: list[str] | None = None):
    """Parse `argv` (YAML via --config, a local path or Hub reference, then flags) and train; unknown fields are an
    error."""
    return main(*parse_recipe(make_parser(), argv)[1])


if __name__ == "__main__":
    run()
