"""SFT training script: TRL's `trl sft` with hf_ext's trainer (ALLoRA: `--use_allora`) and embedded defaults.

    accelerate launch examples/sft_allora.py --config examples/configs/sft_allora.yaml
    hf-ext sft --config examples/configs/sft_allora.yaml --allora_eta 1.0

`--model_name_or_path` takes a Hub id, a local path or `embedded:tiny-qwen2` (the default); `--dataset_name`
takes a Hub dataset, a local one or `embedded:count` (the default: prompt "c d e", completion " f g h i").
"""

from dataclasses import dataclass

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from hf_ext.scripts.common import EmbeddedDatasetArguments, finish, load_datasets, model_and_init_kwargs
from hf_ext.trainers import SFTConfig


@dataclass
class SFTScriptArguments(EmbeddedDatasetArguments, ScriptArguments):
    """TRL's script arguments, with the embedded task as the default dataset."""


def main(
    script_args: SFTScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
):
    from trl import get_peft_config, get_quantization_config

    from hf_ext.embedded import count_sft_dataset
    from hf_ext.trainers import SFTTrainer

    model = model_and_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args.seed, count_sft_dataset)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return finish(trainer, training_args, script_args.dataset_name)


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((SFTScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def run(argv: list[str] | None = None):
    """Parse `argv` (YAML via --config, then flags) and train; unknown fields are an error."""
    return main(*make_parser().parse_args_and_config(argv))


if __name__ == "__main__":
    run()
