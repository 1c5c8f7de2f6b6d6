"""Every private part of Transformers that hf_ext uses, behind this one door; ``tests/trainers/
test_transformers_compat.py`` is the contract test that names the symbol when an upstream change breaks one.

- ``transformers.training_args.OptimizerNames`` and ``TrainingArguments.__post_init__``, which reads ``optim`` only
  to convert it into that enum (``optim_args.OptimizerArguments._optim_past_the_enum`` carries hf_ext's names past).
- The checkpoint layout: the file names ``OPTIMIZER_NAME``, ``SCHEDULER_NAME``, ``SCALER_NAME``,
  ``TRAINER_STATE_NAME`` (``transformers.trainer``), ``PREFIX_CHECKPOINT_DIR``, ``rotate_checkpoints`` and
  ``get_last_checkpoint`` (``transformers.trainer_utils``), and the RNG state files (``rng_state_name``).
- ``Trainer._save_checkpoint(model, trial)``, overridden (``checkpoints.CheckpointMixin``): it rotates with
  ``self.args.save_total_limit`` at its end, which hf_ext sets to None for the call so as to rotate only once the
  checkpoint is complete; ``Trainer._get_output_dir(trial=...)``; ``Trainer._load_optimizer_and_scheduler(checkpoint)``
  (overridden to name the file a bad optimizer state came from); ``Trainer.save_model(output_dir, _internal_call)``
  (overridden to write the model card after PEFT's README).
- Trainer attributes: ``current_gradient_accumulation_steps`` (micro-batches of the current optimizer step, set by
  the training loop), ``is_deepspeed_enabled`` and ``is_fsdp_enabled``.
"""

from transformers.trainer import OPTIMIZER_NAME, SCALER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.training_args import OptimizerNames


__all__ = [
    "OPTIMIZER_NAME",
    "PREFIX_CHECKPOINT_DIR",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "TRAINER_STATE_NAME",
    "OptimizerNames",
    "get_last_checkpoint",
    "rng_state_name",
    "rotate_checkpoints",
]


def rng_state_name(world_size: int, process_index: int) -> str:
    """The file in a checkpoint that holds the RNG states process ``process_index`` saves and loads."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"
