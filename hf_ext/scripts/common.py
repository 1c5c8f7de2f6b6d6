"""What hf_ext's training scripts share: the embedded-default dataset arguments, model and dataset loading, and
the end of a run, and the checks of combinations hf_ext does not define. Absolute imports: `accelerate launch` runs
the scripts as files."""

import difflib
import json
import os
import sys
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


def check_launch_options(leftovers: list[str], parser) -> None:
    """Options that are neither a field of the recipe's dataclasses nor an ``accelerate launch`` option (which a
    recipe may carry, as TRL's do) are typos: refuse them before anything loads, with the closest names."""
    from accelerate.commands.launch import launch_command_parser

    launch_options = {option for action in launch_command_parser()._actions for option in action.option_strings}
    launch_options.add("--accelerate_config")  # TRL's, turned into --config_file
    fields = {option for action in parser._actions for option in action.option_strings}
    for arg in leftovers:
        option = arg.partition("=")[0]
        if option.startswith("--") and option not in launch_options:
            names = {name[2:].replace("-", "_") for name in fields | launch_options if name.startswith("--")}
            close = ["--" + name for name in difflib.get_close_matches(option[2:], sorted(names), n=3)]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SystemExit(
                f"{parser.prog}: unknown field {option[2:]!r} (in the recipe or on the command line): it is no field "
                f"of the training, model, script or dataset arguments and no accelerate launch option.{hint} "
                f"`{parser.prog} --help` lists every field."
            )


def parse_recipe(parser, argv: list[str] | None = None):
    """``(argv, dataclasses, recipe leftovers, command-line leftovers)``: ``--config`` resolved to a local file
    (``hf_ext.hub.configs``: local path or Hub reference), the recipe then the flags parsed, unknown fields refused.
    The leftovers are ``accelerate launch`` options."""
    from hf_ext.hub.configs import resolve_config_argument

    argv = resolve_config_argument(sys.argv[1:] if argv is None else argv)
    *configs, config_rest, cli_rest = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    check_launch_options(config_rest + cli_rest, parser)
    return argv, configs, config_rest, cli_rest


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


def check_composition(
    training_args, model_args, deepspeed_config_file: str | None = None, fsdp_version: str | None = None
) -> None:
    """Refuses, before any model is loaded, combinations hf_ext does not define: the adapter switches against the
    LoRA settings (ALLoRA with DoRA among them; the trainer's own checks, run early) and an hf_ext optimizer under a
    DeepSpeed config whose ``optimizer`` block would silently replace it, or under FSDP2. ``deepspeed_config_file``
    and ``fsdp_version`` default to what accelerate passes its ranks."""
    from trl import get_peft_config

    from hf_ext.optim import OPTIMIZERS
    from hf_ext.trainers.adapter_args import adapter_peft_config

    adapter_peft_config(training_args, None, get_peft_config(model_args))
    if training_args.optim not in OPTIMIZERS:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_version = fsdp_version or os.environ.get("FSDP_VERSION")
    if str(fsdp_version) == "2":
        raise ValueError(
            f"optim={training_args.optim!r} does not support FSDP2 yet (its parameters are DTensors): use FSDP1 "
            "(fsdp_version: 1), DeepSpeed ZeRO (zero2, zero3) or DDP (multi_gpu) with it, or optim='adamw_torch' "
            "with FSDP2."
        )
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
    save, push if asked, and end the run cleanly on every process. The main process prints one row per log and a
    summary line (``hf_ext.scripts.run_log``). Returns the trainer."""
    from trl import get_peft_config, get_quantization_config

    from hf_ext.hub.card import training_recipe
    from hf_ext.scripts.quiet import muted_library_deprecations
    from hf_ext.scripts.run_log import print_step_rows, summary_line

    check_composition(training_args, model_args)
    model = model_and_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args.seed, build_embedded)
    with muted_library_deprecations():
        trainer = trainer_cls(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
            **trainer_kwargs,
        )
        print_step_rows(trainer)
        trainer.hf_ext_recipe = training_recipe(script_args, training_args, model_args, dataset_args)
        train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if trainer.is_world_process_zero():
        print(summary_line(trainer, train_output), flush=True)
    # Let every rank's last collective finish and its gloo worker threads drop their tensors before the group goes:
    # otherwise freeing the DDP reducer can deadlock at exit (seen on CPU/gloo with torch 2.13, about 1 run in 5).
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer
