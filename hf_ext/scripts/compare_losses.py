"""Side-by-side comparison of GRPO loss types on the embedded default: same task, seeds and step budget.

Each loss type trains with its recipe `examples/configs/grpo_<loss_type>.yaml` when there is one (hf_ext's), else
with `grpo_ba.yaml` and only `loss_type` changed (TRL's). Writes to `--out`: `curves.csv` (reward per logged step,
seed and loss type), `table.md` (final and best mean reward over seeds, step time relative to `dapo`) and
`rewards.png` (needs matplotlib: `pip install hf-ext[bench]`).

    hf-ext compare-losses --seeds 0 1 2 --max_steps 300 --out benchmarks/results/compare_losses_cpu
    python benchmarks/compare_losses.py ...   # the same
"""

import argparse
import csv
import statistics
import tempfile
import warnings
from pathlib import Path


LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "ba", "real", "real_bce", "gtpo")
CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def recipe_args(loss_type: str, configs: Path) -> list[str]:
    own = configs / f"grpo_{loss_type}.yaml"
    return (
        ["--config", str(own)]
        if own.exists()
        else ["--config", str(configs / "grpo_ba.yaml"), "--loss_type", loss_type]
    )


def train_once(loss_type: str, seed: int, max_steps: int, log_every: int, configs: Path) -> dict:
    from hf_ext.scripts.grpo import run

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = run(
            [
                *recipe_args(loss_type, configs),
                "--seed",
                str(seed),
                "--max_steps",
                str(max_steps),
                "--logging_steps",
                str(log_every),
                "--output_dir",
                output_dir,
                "--disable_tqdm",
                "true",
            ]
        )
    history = trainer.state.log_history
    return {
        "curve": [(log["step"], log["reward"]) for log in history if "reward" in log],
        "seconds_per_step": history[-1]["train_runtime"] / max_steps,
    }


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per loss type: final reward (mean of the last two logs), best logged reward, step time; mean/std over seeds."""
    dapo_time = statistics.mean(r["seconds_per_step"] for r in runs["dapo"]) if "dapo" in runs else None
    rows = []
    for loss_type, seeds in runs.items():
        finals = [statistics.mean(reward for _, reward in r["curve"][-2:]) for r in seeds]
        bests = [max(reward for _, reward in r["curve"]) for r in seeds]
        seconds = statistics.mean(r["seconds_per_step"] for r in seeds)
        rows.append(
            {
                "loss_type": loss_type,
                "final": statistics.mean(finals),
                "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "best": statistics.mean(bests),
                "seconds_per_step": seconds,
                "time_vs_dapo": seconds / dapo_time if dapo_time else float("nan"),
            }
        )
    return rows


def write_outputs(runs: dict[str, list[dict]], rows: list[dict], out: Path, seeds: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["loss_type", "seed", "step", "reward"])
        for loss_type, seed_runs in runs.items():
            for seed, result in zip(seeds, seed_runs, strict=True):
                writer.writerows((loss_type, seed, step, reward) for step, reward in result["curve"])
    lines = [
        "| loss_type | final mean reward | best mean reward | s/step | step time / dapo |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['loss_type']} | {r['final']:.3f} ± {r['final_std']:.3f} | {r['best']:.3f} | "
            f"{r['seconds_per_step']:.3f} | {r['time_vs_dapo']:.2f} |"
            for r in rows
        ),
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: no rewards.png (pip install hf-ext[bench]).", stacklevel=2)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for loss_type, seed_runs in runs.items():
        steps = [step for step, _ in seed_runs[0]["curve"]]
        mean = [statistics.mean(r["curve"][i][1] for r in seed_runs) for i in range(len(steps))]
        axes.plot(steps, mean, label=loss_type, linewidth=2 if loss_type in ("ba", "real", "real_bce", "gtpo") else 1)
    axes.set(xlabel="step", ylabel=f"mean reward ({len(seeds)} seeds)", title="GRPO loss types on the embedded task")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "rewards.png", dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="hf-ext compare-losses", description=__doc__.splitlines()[0])
    parser.add_argument("--loss_types", nargs="+", default=list(LOSS_TYPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--logging_steps", type=int, default=25)
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="folder of the grpo_<loss_type>.yaml recipes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_losses_cpu"))
    cli = parser.parse_args(argv)
    runs = {
        loss_type: [train_once(loss_type, s, cli.max_steps, cli.logging_steps, cli.configs) for s in cli.seeds]
        for loss_type in cli.loss_types
    }
    rows = summarize(runs)
    write_outputs(runs, rows, cli.out, cli.seeds)
    return rows


if __name__ == "__main__":
    main()
