"""Full fine-tune of the embedded default with an hf_ext optimizer, for the 1- vs 2-process comparison.

Run directly or under `accelerate launch --multi_gpu --num_processes 2`; the global batch is fixed (16 rows per
step), so 2 processes take 8 rows each. Rank 0 writes {"params", "losses", "world_size"} to --out.
"""

import argparse
import os

from multiproc import save_and_exit, training_result

from hf_ext import SFTConfig, SFTTrainer
from hf_ext.embedded import count_sft_dataset, materialize_model


GLOBAL_BATCH = 16


def train(optim: str, output_dir: str, max_steps: int = 3, **overrides):
    """Returns (result, trainer); the caller keeps the trainer alive (see grpo_fixed_rollouts.py)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    values = dict(
        output_dir=output_dir,
        optim=optim,
        optim_args="min_quantized_numel=1024",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=max_steps,
        logging_steps=1,
        seed=0,
        data_seed=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        max_length=16,
        dataloader_drop_last=True,
    )
    args = SFTConfig(**{**values, **overrides})
    trainer = SFTTrainer(str(materialize_model()), args=args, train_dataset=count_sft_dataset(256))
    trainer.train(resume_from_checkpoint=overrides.get("resume_from_checkpoint"))
    result = training_result(trainer)
    return result, trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", default="hf_ext_adamw_4bit")
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    result, trainer = train(cli.optim, output_dir=cli.out + ".run")
    save_and_exit(result, cli.out)
