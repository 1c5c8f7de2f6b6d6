"""What hf_ext's training scripts share: the embedded-default dataset arguments, model and dataset loading, and
the end of a run, and the checks of combinations hf_ext does not define. Absolute imports: `accelerate launch` runs
the scripts as files."""

import difflib
import json
import os
import sys
from dataclasses import dataclass, field

from hf_ext.embedded import EMBEDDED_MODEL, EMBEDDED_TASK, resolve_model


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix: builder


@dataclass
class EmbeddedDatasetArguments:
    """Dataset fields of the scripts, with the embedded task as the default."""

    dataset_name: str | None = field(
        default=EMBEDDED_TASK,
        metadata={
            "help": f"Hub dataset, local .json/.jsonl/.csv/.parquet file, save_to_disk folder, or {EMBEDDED_TASK!r} "
            "(the embedded alphabet task, the default)."
        },
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
    from hf_ext.scripts.accelerate_compat import launch_option_strings

    launch_options = launch_option_strings()
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
    """(train, eval or None) from a `datasets:` mixture, the embedded task (`build_embedded(n, seed)`), a local data
    file (`DATA_FILE_BUILDERS`; its rows are the train split), a `Dataset.save_to_disk` folder (the train split) or
    `DatasetDict.save_to_disk` folder, or whatever else `datasets.load_dataset` takes (a Hub id, a folder of data
    files). Raises, naming what was given, for a missing, unreadable or empty data file and a missing train split;
    the columns and sizes are `check_datasets`'."""
    from datasets import Dataset
    from trl import get_dataset

    if script_args.dataset_name == EMBEDDED_TASK and not dataset_args.datasets:
        train = build_embedded(script_args.num_train_examples, seed)
        evaluation = build_embedded(script_args.num_eval_examples, seed + 1) if script_args.num_eval_examples else None
        return train, evaluation
    source = "the `datasets:` mixture" if dataset_args.datasets else f"dataset_name={script_args.dataset_name!r}"
    try:
        dataset = get_dataset(dataset_args) if dataset_args.datasets else _load_named_dataset(script_args)
    except StopIteration as error:  # datasets' json reader, on an empty file
        raise ValueError(
            f"{source} holds an empty data file (datasets' reader raised StopIteration on it): remove it or give it "
            "rows."
        ) from error
    if isinstance(dataset, Dataset):
        return dataset, None
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"{source} has no split {script_args.dataset_train_split!r} (dataset_train_split); its splits: "
            f"{', '.join(map(repr, dataset)) or 'none'}. Set --dataset_train_split to one of them."
        )
    return dataset[script_args.dataset_train_split], dataset.get(script_args.dataset_test_split)


def _load_named_dataset(script_args):
    """``--dataset_name`` as a `save_to_disk` folder, a local data file (into the train split) or `load_dataset`'s."""
    from datasets import config, load_dataset, load_from_disk
    from datasets.exceptions import DatasetGenerationError

    name = script_args.dataset_name
    path = os.path.expanduser(name)
    saved = (config.DATASETDICT_JSON_FILENAME,), (config.DATASET_STATE_JSON_FILENAME, config.DATASET_INFO_FILENAME)
    if os.path.isdir(path) and any(all(os.path.isfile(os.path.join(path, f)) for f in files) for files in saved):
        try:
            return load_from_disk(path)
        except IndexError as error:  # datasets saves no data file for a split of 0 rows, then cannot read it back
            raise ValueError(
                f"dataset_name={name!r} is a save_to_disk folder with a split saved from 0 rows, which datasets "
                "cannot load back. Save splits that hold rows (and leave out an empty one)."
            ) from error
    suffix = os.path.splitext(path)[1].lower()
    if not (os.path.isfile(path) or suffix in DATA_FILE_BUILDERS):
        return load_dataset(name, name=script_args.dataset_config)
    if suffix not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"dataset_name={name!r} is a local file, of a kind hf_ext does not read ({suffix or 'no suffix'}); "
            f"local data files can be {', '.join(DATA_FILE_BUILDERS)}, or a folder written by save_to_disk."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset_name={name!r}: no such file (relative paths start at {os.getcwd()}).")
    try:
        return load_dataset(DATA_FILE_BUILDERS[suffix], data_files={script_args.dataset_train_split: path})
    except (ValueError, DatasetGenerationError) as error:  # blank lines, a header only, a broken file
        raise ValueError(
            f"dataset_name={name!r} ({os.path.getsize(path)} bytes) could not be read as {suffix} data "
            f"({type(error).__name__}: {error}). It needs at least one example: for .jsonl one JSON object per line, "
            'e.g. {"prompt": "..."}; for .csv a header line naming the columns, then one line per example.'
        ) from error


def check_datasets(train_dataset, eval_dataset, training_args) -> None:
    """Refuses, before any model is loaded, datasets the trainer would fail on only after loading it, or would train
    0 steps on (then saving the untrained model over output_dir): the train set and, when evaluating, the eval set
    need one of the column sets the trainer reads (`required_columns`), the train set the rows of one optimizer step
    (`rows_for_one_step`), the eval set one row. Streaming datasets are checked for the columns they declare. Errors
    name the dataset, what it has and what is needed."""
    checked = {"train": train_dataset}
    if eval_dataset is not None and training_args.eval_strategy != "no":
        checked["eval"] = eval_dataset
    column_sets = required_columns(training_args)
    for split, dataset in checked.items():
        columns = dataset.column_names
        if columns is None or not column_sets or any(set(needed) <= set(columns) for needed in column_sets):
            continue
        wanted = " or ".join(" + ".join(map(repr, needed)) for needed in column_sets)
        raise ValueError(
            f"The {split} dataset has no column {wanted}, which the trainer reads; columns found: "
            f"{', '.join(map(repr, columns)) or 'none'}. Rename the column that holds them (datasets' rename_column) "
            "or choose another dataset."
        )
    train_rows, how = rows_for_one_step(training_args)
    if hasattr(train_dataset, "__len__") and len(train_dataset) < train_rows:
        raise ValueError(
            f"The train dataset has {len(train_dataset)} rows, fewer than the {train_rows} of one optimizer step: "
            f"the run would train 0 steps and save the untrained model. {how}."
        )
    if "eval" in checked and hasattr(eval_dataset, "__len__") and len(eval_dataset) == 0:
        raise ValueError(
            f"The eval dataset has 0 rows, with eval_strategy={training_args.eval_strategy.value!r}: give it rows, or "
            "set eval_strategy 'no'."
        )


def required_columns(training_args) -> list[tuple[str, ...]]:
    """The column sets the trainer of ``training_args`` reads; a dataset needs one of them (none: anything goes).
    GRPO generates from `prompt`. TRL's SFT takes `messages` (or ShareGPT's `conversations`), the
    `dataset_text_field` (`text`), `prompt` + `completion`, or pre-tokenized `input_ids`; with
    `dataset_kwargs={"skip_prepare_dataset": True}` its collator reads the rows as they are."""
    import trl

    if isinstance(training_args, trl.GRPOConfig):
        return [("prompt",)]
    if (training_args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return []
    return [
        ("messages",),
        ("conversations",),
        (training_args.dataset_text_field,),
        ("prompt", "completion"),
        ("input_ids",),
    ]


def rows_for_one_step(training_args) -> tuple[int, str]:
    """(rows, how to need fewer): the train rows one optimizer step takes. GRPO: one generation batch of prompts,
    `generation_batch_size / num_generations` (TRL's sampler drops an incomplete one; Transformers steps on a last,
    partial accumulation). SFT: one row, or one global batch with `dataloader_drop_last`."""
    import trl

    args = training_args
    if isinstance(args, trl.GRPOConfig):
        return args.generation_batch_size // args.num_generations, (
            f"GRPO generates for generation_batch_size / num_generations = {args.generation_batch_size} / "
            f"{args.num_generations} prompts at a time (generation_batch_size = per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x {args.world_size} processes x steps_per_generation "
            f"{args.steps_per_generation}). Add prompts, or lower per_device_train_batch_size or "
            "gradient_accumulation_steps (steps_per_generation follows it unless set)"
        )
    if args.dataloader_drop_last:
        return args.per_device_train_batch_size * args.world_size, (
            f"With dataloader_drop_last, a batch takes per_device_train_batch_size {args.per_device_train_batch_size} "
            f"x {args.world_size} processes. Add rows, lower per_device_train_batch_size or unset dataloader_drop_last"
        )
    return 1, "Add rows"


def check_composition(training_args, model_args, deepspeed_config_file: str | None = None) -> None:
    """Refuses, before any model is loaded, combinations hf_ext does not define: the adapter switches against the
    LoRA settings (ALLoRA with DoRA among them; the trainer's own checks, run early) and an hf_ext optimizer under a
    DeepSpeed config whose ``optimizer`` block would silently replace it. ``deepspeed_config_file`` defaults to
    what accelerate passes its ranks."""
    from trl import get_peft_config

    from hf_ext.optim import OPTIMIZERS
    from hf_ext.scripts.accelerate_compat import launched_deepspeed_config
    from hf_ext.trainers.adapter_args import adapter_peft_config

    adapter_peft_config(training_args, None, get_peft_config(model_args))
    if training_args.optim not in OPTIMIZERS:
        return
    deepspeed_config_file = deepspeed_config_file or launched_deepspeed_config()
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
    summary line (``hf_ext.scripts.run_log``). Returns the trainer.

    Before anything loads: a rank that ``hf-ext`` launched ends with it (``hf_ext.scripts.lifetime``), and an
    ``output_dir`` holding an earlier run's model or checkpoints is refused unless the run resumes or
    ``overwrite_output_dir`` is set (``hf_ext.scripts.overwrite``)."""
    from trl import get_peft_config, get_quantization_config

    from hf_ext.hub.recipe import training_recipe
    from hf_ext.scripts.lifetime import exit_with_launcher
    from hf_ext.scripts.overwrite import refuse_overwrite
    from hf_ext.scripts.quiet import muted_library_notices
    from hf_ext.scripts.run_log import print_step_rows, summary_line

    exit_with_launcher()
    refuse_overwrite(training_args)
    check_composition(training_args, model_args)
    model = model_and_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args.seed, build_embedded)
    check_datasets(train_dataset, eval_dataset, training_args)
    with muted_library_notices():
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
    # freeing the DDP reducer while a gloo worker still holds one can deadlock at exit.
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer
