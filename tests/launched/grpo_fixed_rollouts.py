"""Train hf_ext's GRPOTrainer for a few SGD steps on rollouts that are a fixed function of the global row index.

With the rollouts fixed, 1 process, 2 processes and any gradient-accumulation split see the same rows, so the
updated weights and logged losses must agree if the loss is aggregated exactly. Run directly or under
`accelerate launch --multi_gpu --num_processes 2`; rank 0 writes {"params", "losses"} to --out with torch.save.
"""

import argparse

from multiproc import save_and_exit, training_result

from hf_ext import GRPOConfig, GRPOTrainer
from hf_ext.embedded import ALPHABET, count_dataset, count_reward, materialize_model


NUM_GENERATIONS = 4
ROWS_PER_STEP = 12  # 3 groups; 6 rows per process with 2 processes, so groups straddle processes


def fixed_rollout(prompts: list[str], trainer) -> dict:
    """Completions of 1..6 letters, some counting correctly, some not, some ending with EOS."""
    tokenizer = trainer.processing_class
    first_row = trainer.accelerator.process_index * len(prompts)
    prompt_ids, completion_ids = [], []
    for offset, prompt in enumerate(prompts):
        row = first_row + offset + 7 * trainer.state.global_step
        start = ALPHABET.index(prompt.split()[-1]) + 1
        length = 1 + (row * 5) % 6
        step = 1 if row % 3 else 2  # every third row skips letters: lower reward
        letters = " ".join(ALPHABET[(start + step * k) % len(ALPHABET)] for k in range(length))
        ids = tokenizer(" " + letters, add_special_tokens=False).input_ids
        if row % 4:
            ids.append(tokenizer.eos_token_id)
        prompt_ids.append(tokenizer(prompt, add_special_tokens=False).input_ids)
        completion_ids.append(ids)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def train(loss_type: str, per_device_batch: int, grad_accum: int, output_dir: str, max_steps: int = 2, **overrides):
    """Returns (result, trainer); the caller keeps the trainer alive (see the note at the end of this file).
    ``overrides``: further GRPOConfig fields (e.g. num_iterations)."""
    args = GRPOConfig(
        output_dir=output_dir,
        loss_type=loss_type,
        num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum,
        max_completion_length=8,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        max_steps=max_steps,
        logging_steps=1,
        seed=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        **overrides,
    )
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=args,
        train_dataset=count_dataset(64),
        rollout_func=fixed_rollout,
    )
    trainer.train()
    result = training_result(trainer)
    return result, trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--loss_type", default="ba")
    parser.add_argument("--per_device_batch", type=int, required=True)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--num_iterations", type=int, default=1)
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    result, trainer = train(
        cli.loss_type,
        cli.per_device_batch,
        cli.grad_accum,
        output_dir=cli.out + ".run",
        num_iterations=cli.num_iterations,
    )
    save_and_exit(result, cli.out)
