"""Whether a run may write into its ``output_dir``: one that holds a saved model or checkpoints is an earlier run's
result, which a new run would replace file by file. Transformers 5 has no ``overwrite_output_dir`` of its own;
hf_ext's configs carry one (``HfExtArguments``), and its scripts check it before any model loads."""

import os


SAVED_MODEL_FILES = (
    "config.json",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)


def refuse_overwrite(training_args) -> None:
    """Raises ``FileExistsError`` when ``training_args.output_dir`` holds one of ``SAVED_MODEL_FILES`` or a
    ``checkpoint-N`` folder, unless the run resumes (``resume_from_checkpoint`` set) or ``overwrite_output_dir`` is
    true. A missing ``output_dir``, or one holding other files only (logs, a model card), passes."""
    from hf_ext.trainers.transformers_compat import get_last_checkpoint

    output_dir = training_args.output_dir
    if training_args.resume_from_checkpoint or training_args.overwrite_output_dir or not os.path.isdir(output_dir):
        return
    saved = [name for name in SAVED_MODEL_FILES if os.path.isfile(os.path.join(output_dir, name))]
    last_checkpoint = get_last_checkpoint(output_dir)
    held = []
    if saved:
        held.append(f"a saved model ({', '.join(saved)})")
    if last_checkpoint is not None:
        held.append(f"checkpoints (the last: {os.path.basename(last_checkpoint)})")
    if not held:
        return
    resume = (
        "--resume_from_checkpoint last to continue that run (from its newest complete checkpoint), "
        if last_checkpoint
        else ""
    )
    raise FileExistsError(
        f"output_dir {output_dir!r} already holds {' and '.join(held)} from an earlier run, which this run would "
        f"overwrite. Pass {resume}--overwrite_output_dir true to train over it anyway, or another --output_dir."
    )
