"""SFT training script: TRL's `trl sft` with hf_ext's trainer (ALLoRA: `--use_allora`) and embedded defaults.

    accelerate launch examples/sft_allora.py --config examples/configs/sft_allora.yaml
    hf-ext sft --config examples/configs/sft_allora.yaml --allora_eta 1.0

`--model_name_or_path` takes a Hub id, a local path or `embedded:tiny-qwen2` (the default); `--dataset_name`
takes a Hub dataset, a local one or `embedded:count` (the default: prompt "c d e", completion " f g h i").
"""

from dataclasses import dataclass

from hf_ext.scripts.quiet import muted_import_notices


with muted_import_notices():  # in a rank that accelerate launched: the HF stack's first import
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from hf_ext.scripts.common import EmbeddedDatasetArguments, parse_recipe, train
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
    from hf_ext.embedded import count_sft_dataset
    from hf_ext.trainers import SFTTrainer

    return train(SFTTrainer, script_args, training_args, model_args, dataset_args, count_sft_dataset)


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((SFTScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def run(argv: list[str] | None = None):
    """Parse `argv` (YAML via --config, a local path or Hub reference, then flags) and train; unknown fields are an
    error."""
    return main(*parse_recipe(make_parser(), argv)[1])


if __name__ == "__main__":
    run()
