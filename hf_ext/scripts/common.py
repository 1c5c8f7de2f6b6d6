"""What hf_ext's training scripts share: the embedded-default dataset arguments, model and dataset loading, and
the end of a run, and the checks of combinations hf_ext does not define. Absolute imports: `accelerate launch` runs
the scripts as files."""

import json
import os
from dataclasses import dataclass, field

from hf_ext.embedded import EMBEDDED_MODEL, EMBEDDED_TASK, resolve_model


@dataclass
class EmbeddedDatasetArguments:
    """Dataset fields of the scripts, with the embedded task as the default."""

    dataset_name: str | None = field(
        default=EMBEDDED_TASK,
        metadata={"help": f"Hub or local dataset, or {EMBEDDED_TASK!r} (the embedded alphabet task, the default)."},
    )
    num_train_examples: int = field(
        default=512, metadata={"help": f"Training prompts built for {EMBEDDED_TASK!r}; ignored for other datasets."}
    )
    num_eval_examples: int = field(
        default=0,
        metadata={"help": f"Evaluation prompts built for {EMBEDDED_TASK!r} (another seed); 0 for no eval set."},
    )


def model_and_init_kwargs(model_args, training_args) -> str:
    """Returns the model path (embedded default resolved); fills `training_args.model_init_kwargs` as TRL does."""
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    return resolve_model(model_args.model_name_or_path or EMBEDDED_MODEL)


def load_datasets(script_args, dataset_args, seed: int, build_embedded):
    """(train, eval or None): a `datasets:` mixture, the embedded task (`build_embedded(n, seed)`) or a Hub dataset."""
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name == EMBEDDED_TASK:
        train = build_embedded(script_args.num_train_examples, seed)
        evaluation = build_embedded(script_args.num_eval_examples, seed + 1) if script_args.num_eval_examples else None
        return train, evaluation
    else:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    return dataset[script_args.dataset_train_split], dataset.get(script_args.dataset_test_split)


def check_composition(training_args, model_args, deepspeed_config_file: str | None = None) -> None:
    """Refuses, before any model is loaded, combinations hf_ext does not define: the adapter switches against the
    LoRA settings (ALLoRA with DoRA among them; the trainer's own checks, run early) and an hf_ext optimizer under a
    DeepSpeed config whose ``optimizer`` block would silently replace it. ``deepspeed_config_file`` defaults to the
    one accelerate passes its ranks."""
    from trl import get_peft_config

    from hf_ext.optim import OPTIMIZERS
    from hf_ext.trainers.adapter_args import adapter_peft_config

    adapter_peft_config(training_args, None, get_peft_config(model_args))
    if training_args.optim not in OPTIMIZERS:
        return
    deepspeed_config_file = deepspeed_config_file or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    for source in (training_args.deepspeed, deepspeed_config_file):
        if isinstance(source, str):
            with open(source) as handle:
                source = json.load(handle)
        if source and "optimizer" in source:
            raise ValueError(
                f"optim={training_args.optim!r} conflicts with the DeepSpeed config's `optimizer` block "
                f"({source['optimizer'].get('type', '?')}), which would silently replace it: remove that block (the "
                "Trainer then builds hf_ext's optimizer) or choose DeepSpeed's optimizer and a Transformers optim."
            )


def train(trainer_cls, script_args, training_args, model_args, dataset_args, build_embedded, **trainer_kwargs):
    """Build ``trainer_cls`` as TRL's scripts do (model, datasets, quantization, LoRA from ``model_args``), train,
    save, push if asked, and end the run cleanly on every process. Returns the trainer."""
    from trl import get_peft_config, get_quantization_config

    check_composition(training_args, model_args)
    model = model_and_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args.seed, build_embedded)
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
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
