"""LoRA vs ALLoRA on the embedded SFT task (alphabet continuation), several seeds: final eval loss side by side.

The paper's claim (arXiv 2410.09692): ALLoRA matches or beats LoRA with dropout. Baselines, as in its protocol:
LoRA with dropout 0.05 at the base learning rate and at eta x the base rate (the paper's LoRA learning rate).
Every run uses `examples/configs/sft_allora.yaml` with only these fields changed.

    python benchmarks/compare_allora.py [--seeds 0 1 2 3 4] [--max_steps 300]
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from hf_ext.scripts.sft import run


RECIPE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "sft_allora.yaml"


def final_eval_loss(overrides: list[str], seed: int, max_steps: int) -> float:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = run(
            [
                "--config",
                str(RECIPE),
                "--seed",
                str(seed),
                "--max_steps",
                str(max_steps),
                "--eval_steps",
                str(max_steps),
                "--output_dir",
                output_dir,
                "--disable_tqdm",
                "true",
                *overrides,
            ]
        )
    return [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--eta", type=float, default=2.0)
    cli = parser.parse_args()
    lr = cli.learning_rate
    variants = {
        f"ALLoRA eta={cli.eta:g}, lr={lr:g}": ["--use_allora", "true", "--allora_eta", str(cli.eta)],
        f"LoRA dropout 0.05, lr={lr:g}": ["--use_allora", "false", "--lora_dropout", "0.05"],
        f"LoRA dropout 0.05, lr={cli.eta * lr:g}": [
            "--use_allora",
            "false",
            "--lora_dropout",
            "0.05",
            "--learning_rate",
            str(cli.eta * lr),
        ],
    }
    variants[next(iter(variants))] += ["--learning_rate", str(lr)]
    print(f"final eval loss after {cli.max_steps} steps, seeds {cli.seeds}")
    print(f"| {'variant':<32} | mean | std | per seed |")
    print(f"|{'-' * 34}|-----:|----:|---|")
    for name, overrides in variants.items():
        losses = [final_eval_loss(overrides, seed, cli.max_steps) for seed in cli.seeds]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        per_seed = " ".join(f"{loss:.3f}" for loss in losses)
        print(f"| {name:<32} | {statistics.mean(losses):.3f} | {spread:.3f} | {per_seed} |")


if __name__ == "__main__":
    main()
