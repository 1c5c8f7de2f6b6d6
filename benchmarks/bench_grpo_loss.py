"""Cost of the GRPO policy loss, forward + backward: hf_ext's `ba` against TRL's `dapo`, on the same tensors.

Both run through the trainer's real `_compute_loss` (clipping, masks, metrics and all); the model's log-prob
forward is replaced by a leaf tensor so only the loss is timed. BA also has a generation-time step (the gathered
group statistics that give each row its weight), run once per generation batch however many loss calls follow;
it is timed separately, and the last column charges it to a single loss call (the worst case). The two losses are
timed interleaved, so machine drift hits both alike. Goal: ba/dapo <= 1.05.

    python benchmarks/bench_grpo_loss.py                 # CPU
    python benchmarks/bench_grpo_loss.py --device cuda   # GPU
"""

import argparse
import os
import tempfile

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from timing import interleaved_medians_ms  # noqa: E402

from hf_ext import GRPOConfig, GRPOTrainer  # noqa: E402
from hf_ext.embedded import count_dataset, count_reward, materialize_model  # noqa: E402


NUM_GENERATIONS = 8


def make_trainer(device: str) -> GRPOTrainer:
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        loss_type="ba",
        num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=NUM_GENERATIONS,
        use_cpu=device == "cpu",
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
    )
    trainer = GRPOTrainer(
        model=str(materialize_model()), reward_funcs=count_reward, args=args, train_dataset=count_dataset(8)
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def make_batch(rows: int, width: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (rows // NUM_GENERATIONS, NUM_GENERATIONS), generator=generator).double()
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    batch = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "advantages": advantages.float(),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": -torch.rand(rows, width, generator=generator) * 3,
    }
    return {name: value.to(device) for name, value in batch.items()}


def loss_step(trainer: GRPOTrainer, loss_type: str, batch: dict, logps: torch.Tensor) -> None:
    trainer.loss_type = loss_type
    logps.grad = None
    trainer._compute_loss(trainer.model, batch).backward()


def measure(trainer: GRPOTrainer, rows: int, width: int, device: str, repeats: int) -> dict:
    batch = make_batch(rows, width, device)
    logps = (batch["old_per_token_logps"] + 0.01).requires_grad_(True)
    entropies = torch.ones_like(logps)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    ba_batch = dict(batch)
    trainer.grpo_loss.prepare(ba_batch, "train")
    return interleaved_medians_ms(
        {
            "dapo": lambda: loss_step(trainer, "dapo", batch, logps),
            "ba": lambda: loss_step(trainer, "ba", ba_batch, logps),
            "gen": lambda: trainer.grpo_loss.prepare(dict(batch), "train"),
        },
        device,
        repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=30)
    cli = parser.parse_args()

    trainer = make_trainer(cli.device)
    print(f"device={cli.device} torch={torch.__version__} G={NUM_GENERATIONS}")
    print(
        f"{'rows':>6} {'T':>6} {'dapo ms':>9} {'ba ms':>9} {'ba/dapo':>8} {'ba gen-step ms':>15} {'(ba+gen)/dapo':>14}"
    )
    for rows in cli.rows:
        for width in cli.widths:
            ms = measure(trainer, rows, width, cli.device, cli.repeats)
            print(
                f"{rows:>6} {width:>6} {ms['dapo']:>9.3f} {ms['ba']:>9.3f} {ms['ba'] / ms['dapo']:>8.3f} "
                f"{ms['gen']:>15.3f} {(ms['ba'] + ms['gen']) / ms['dapo']:>14.3f}"
            )


if __name__ == "__main__":
    main()
