"""Side-by-side comparison of GRPO loss types on the embedded default, each at the learning rate a sweep picks.

Every loss type trains on the same task with the same seeds and step budget.

Loss types: by default every one of the installed TRL (sorted by name), then the registered hf_ext losses
(``grpo_losses()``).
Recipes: a loss type with a packaged recipe ``grpo_<loss_type>`` (hf_ext's; ``examples/configs/`` in the repository)
trains with it; the others (TRL's) with ``grpo_ba`` with ``loss_type`` changed, plus the fields of
``TRL_RECIPE_FIELDS`` for the few that need more. ``--configs`` replaces the packaged recipes by a folder of your own.

Learning rate: per loss type, each of ``--learning_rates`` trains ``--sweep_steps`` steps once per ``--sweep_seeds``
seed (never an evaluation seed); the one with the best final mean reward (the first of them on a tie) is the one
the ``--seeds`` runs of ``--max_steps`` steps use. A single learning rate means no sweep.

Writes to ``--out``: ``curves.csv`` (reward per logged step, seed and loss type), ``table.md`` (learning rate, final
and best mean reward over seeds, step time relative to ``dapo``), ``sweep.csv`` and ``sweep.md`` (with a sweep: final
reward per loss type, learning rate and sweep seed; its mean over sweep seeds) and ``rewards.png`` (needs matplotlib:
``pip install hf-ext[bench]``) and ``README.md`` (command, date, machine, versions). Final reward: the mean of a
run's last two logged rewards.

    hf-ext compare-losses --out benchmarks/results/compare_losses_cpu    # 3 seeds x 300 steps, the README's table
    hf-ext compare-losses --loss_types dapo ba --max_steps 4 --seeds 0   # a quick check
    python benchmarks/compare_losses.py ...                              # the same as hf-ext compare-losses
"""

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from importlib.resources import files
from pathlib import Path


# What a TRL loss type needs beyond `loss_type` on grpo_ba.yaml, from TRL's GRPOConfig documentation.
TRL_RECIPE_FIELDS = {
    # LUSPO is defined on sequence-level importance weights (TRL warns at the token level, its default).
    "luspo": {"importance_sampling_level": "sequence"},
    # CISPO clips the importance weights at epsilon_high, which defaults to epsilon (0.2): every on-policy weight
    # (1) would be clipped to 0.2. 5.0 is the value TRL's documentation recommends.
    "cispo": {"epsilon_high": 5.0},
}
LEARNING_RATES = (1e-3, 2e-3, 3e-3, 6e-3, 1e-2)


def default_loss_types() -> list[str]:
    """The installed TRL's loss types sorted by name, then the registered hf_ext losses; hf_ext's alone where TRL's
    cannot be read."""
    from hf_ext.trainers import grpo_losses, load_entry_point_losses
    from hf_ext.trainers.trl_compat import trl_loss_types

    load_entry_point_losses()
    trl_names = trl_loss_types()
    if trl_names is None:
        warnings.warn(
            "The loss types of the installed TRL could not be read from its source: comparing hf_ext's only. Name "
            "TRL's with --loss_types (e.g. --loss_types dapo grpo ba) to include them.",
            stacklevel=2,
        )
    return [*sorted(trl_names or ()), *grpo_losses()]


def recipe_args(loss_type: str, configs) -> list[str]:
    """The recipe flags of ``loss_type``: its own ``grpo_<loss_type>.yaml`` in ``configs`` (a folder: a Path or an
    importlib.resources Traversable), else ``grpo_ba.yaml`` with ``loss_type`` and ``TRL_RECIPE_FIELDS`` set."""
    own = configs.joinpath(f"grpo_{loss_type}.yaml")
    if own.is_file():
        return ["--config", str(own)]
    fields = {"loss_type": loss_type, **TRL_RECIPE_FIELDS.get(loss_type, {})}
    return ["--config", str(configs.joinpath("grpo_ba.yaml")), *(f"--{k}={v}" for k, v in fields.items())]


def train_once(loss_type: str, learning_rate: float, seed: int, max_steps: int, log_every: int, configs) -> dict:
    from hf_ext.scripts.grpo import run

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = run(
            [
                *recipe_args(loss_type, configs),
                f"--learning_rate={learning_rate}",
                f"--seed={seed}",
                f"--max_steps={max_steps}",
                f"--logging_steps={log_every}",
                f"--output_dir={output_dir}",
                "--disable_tqdm=true",
            ]
        )
    history = trainer.state.log_history
    return {
        "curve": [(log["step"], log["reward"]) for log in history if "reward" in log],
        "seconds_per_step": history[-1]["train_runtime"] / max_steps,
    }


def final_reward(result: dict) -> float:
    """The mean of a run's last two logged rewards."""
    return statistics.mean(reward for _, reward in result["curve"][-2:])


def sweep(
    loss_types: list[str], learning_rates: list[float], seeds: list[int], steps: int, log_every: int, configs
) -> dict[str, dict[float, list[float]]]:
    """Final reward per loss type, learning rate and seed (in ``seeds`` order)."""
    return {
        loss_type: {
            lr: [final_reward(train_once(loss_type, lr, seed, steps, log_every, configs)) for seed in seeds]
            for lr in learning_rates
        }
        for loss_type in loss_types
    }


def best_learning_rate(finals: dict[float, list[float]]) -> float:
    """The learning rate with the best mean final reward; the first one on a tie."""
    return max(finals, key=lambda lr: statistics.mean(finals[lr]))


def summarize(runs: dict[str, list[dict]], learning_rates: dict[str, float]) -> list[dict]:
    """Per loss type: learning rate, final reward, best logged reward, step time; mean/std over seeds."""
    dapo_time = statistics.mean(r["seconds_per_step"] for r in runs["dapo"]) if "dapo" in runs else None
    rows = []
    for loss_type, seeds in runs.items():
        finals = [final_reward(r) for r in seeds]
        bests = [max(reward for _, reward in r["curve"]) for r in seeds]
        seconds = statistics.mean(r["seconds_per_step"] for r in seeds)
        rows.append(
            {
                "loss_type": loss_type,
                "learning_rate": learning_rates[loss_type],
                "final": statistics.mean(finals),
                "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "best": statistics.mean(bests),
                "seconds_per_step": seconds,
                "time_vs_dapo": seconds / dapo_time if dapo_time else float("nan"),
            }
        )
    return rows


def write_sweep(sweeps: dict[str, dict[float, list[float]]], out: Path, seeds: list[int], steps: int) -> None:
    """``sweep.csv`` (one row per run) and ``sweep.md`` (mean over sweep seeds; the picked learning rate in bold)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["loss_type", "learning_rate", "seed", "final_reward"])
        for loss_type, finals in sweeps.items():
            for lr, rewards in finals.items():
                writer.writerows((loss_type, lr, seed, reward) for seed, reward in zip(seeds, rewards, strict=True))
    learning_rates = list(next(iter(sweeps.values())))
    lines = [
        f"Final mean reward at step {steps}, seeds {' '.join(map(str, seeds))}; the picked learning rate in bold.",
        "",
        "| loss_type | " + " | ".join(f"lr {lr:g}" for lr in learning_rates) + " |",
        "|---|" + "---:|" * len(learning_rates),
    ]
    for loss_type, finals in sweeps.items():
        best = best_learning_rate(finals)
        cells = [f"{statistics.mean(r):.3f}" for r in finals.values()]
        cells = [f"**{cell}**" if lr == best else cell for lr, cell in zip(finals, cells, strict=True)]
        lines.append(f"| {loss_type} | " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_outputs(runs: dict[str, list[dict]], rows: list[dict], out: Path, seeds: list[int]) -> None:
    from hf_ext.trainers import grpo_losses

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["loss_type", "seed", "step", "reward"])
        for loss_type, seed_runs in runs.items():
            for seed, result in zip(seeds, seed_runs, strict=True):
                writer.writerows((loss_type, seed, step, reward) for step, reward in result["curve"])
    lines = [
        "| loss_type | lr | final mean reward | best mean reward | s/step | step time / dapo |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['loss_type']} | {r['learning_rate']:g} | {r['final']:.3f} ± {r['final_std']:.3f} | "
            f"{r['best']:.3f} | {r['seconds_per_step']:.3f} | {r['time_vs_dapo']:.2f} |"
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

    figure, axes = plt.subplots(figsize=(8, 5))
    for row, (loss_type, seed_runs) in zip(rows, runs.items(), strict=True):
        steps = [step for step, _ in seed_runs[0]["curve"]]
        mean = [statistics.mean(r["curve"][i][1] for r in seed_runs) for i in range(len(steps))]
        own = loss_type in grpo_losses()  # hf_ext's: thick solid lines; TRL's: thin dashed ones
        axes.plot(
            steps,
            mean,
            label=f"{loss_type} (lr {row['learning_rate']:g})",
            linewidth=2 if own else 1,
            linestyle="-" if own else "--",
        )
    axes.set(xlabel="step", ylabel=f"mean reward ({len(seeds)} seeds)", title="GRPO loss types on the embedded task")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(out / "rewards.png", dpi=120)


def write_provenance(out: Path, argv: list[str], seconds: float) -> None:
    """``README.md`` in ``out``: the command, date, wall time, machine and versions of the run that wrote it."""
    from importlib.metadata import version

    import torch

    packages = ("hf-ext", "torch", "transformers", "trl", "peft", "accelerate")
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [
        "# GRPO loss types on the embedded task",
        "",
        f"- command: `hf-ext compare-losses {' '.join(argv)}`",
        f"- date: {datetime.date.today().isoformat()}; wall time {seconds / 60:.1f} min",
        f"- machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, {gpu}",
        f"- versions: {', '.join(f'{name} {version(name)}' for name in packages)}",
        "- files: `table.md` (final = mean of a run's last two logged rewards), `curves.csv`, `rewards.png`, and with "
        "a sweep `sweep.md`, `sweep.csv`",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ext compare-losses", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--loss_types", nargs="+", default=None, help="default: the installed TRL's (by name), then hf_ext's"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation seeds")
    parser.add_argument("--max_steps", type=int, default=300, help="steps of each evaluation run")
    parser.add_argument("--logging_steps", type=int, default=25)
    parser.add_argument(
        "--learning_rates",
        type=float,
        nargs="+",
        default=list(LEARNING_RATES),
        help="swept per loss type; a single value: no sweep, every loss type at that rate",
    )
    parser.add_argument("--sweep_seeds", type=int, nargs="+", default=[100], help="seeds of the sweep runs")
    parser.add_argument(
        "--sweep_steps", type=int, default=None, help="steps of each sweep run (default: max_steps // 2, at least 1)"
    )
    parser.add_argument(
        "--configs",
        type=Path,
        default=None,
        help="folder of grpo_<loss_type>.yaml recipes and grpo_ba.yaml (default: the packaged recipes)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_losses_cpu"))
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    """Sweep, train and write the outputs (see the module docstring); returns the rows of ``table.md``."""
    from hf_ext.scripts import grpo
    from hf_ext.scripts.common import parse_recipe

    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    cli = parser.parse_args(argv)
    loss_types = list(dict.fromkeys(cli.loss_types or default_loss_types()))
    sweep_steps = max(1, cli.max_steps // 2) if cli.sweep_steps is None else cli.sweep_steps
    configs = cli.configs or files("hf_ext.recipes")
    if set(cli.sweep_seeds) & set(cli.seeds) and len(cli.learning_rates) > 1:
        parser.error(
            f"--sweep_seeds {cli.sweep_seeds} overlap --seeds {cli.seeds}: a learning rate picked on evaluation seeds "
            "is tuned to them. Choose sweep seeds outside the evaluation seeds."
        )
    if min(cli.learning_rates) <= 0 or min(cli.max_steps, sweep_steps, cli.logging_steps) < 1:
        parser.error(
            f"--learning_rates must be > 0 and --max_steps, --sweep_steps, --logging_steps >= 1; got "
            f"{cli.learning_rates}, {cli.max_steps}, {sweep_steps}, {cli.logging_steps}."
        )
    for loss_type in loss_types:  # a bad loss type or recipe fails here, not after an hour of training
        parse_recipe(grpo.make_parser(prog="hf-ext compare-losses"), recipe_args(loss_type, configs))
    if len(cli.learning_rates) > 1:
        sweeps = sweep(loss_types, cli.learning_rates, cli.sweep_seeds, sweep_steps, cli.logging_steps, configs)
        write_sweep(sweeps, cli.out, cli.sweep_seeds, sweep_steps)
        learning_rates = {loss_type: best_learning_rate(finals) for loss_type, finals in sweeps.items()}
    else:
        learning_rates = dict.fromkeys(loss_types, cli.learning_rates[0])
    runs = {
        loss_type: [
            train_once(loss_type, learning_rates[loss_type], seed, cli.max_steps, cli.logging_steps, configs)
            for seed in cli.seeds
        ]
        for loss_type in loss_types
    }
    rows = summarize(runs, learning_rates)
    write_outputs(runs, rows, cli.out, cli.seeds)
    write_provenance(cli.out, argv, time.perf_counter() - started)
    return rows


if __name__ == "__main__":
    main()
