"""The GRPO script end to end: YAML + flags, the `hf-ext` command, Hub-style loading, and real learning."""

import json
import os
import re
import shutil

import pytest
from runs import RECIPE, REPO, hf_ext_command

from hf_ext.embedded import materialize_model
from hf_ext.scripts.grpo import make_parser, run


def test_yaml_then_flags():
    script_args, training_args, model_args, _ = make_parser().parse_args_and_config(
        ["--config", str(RECIPE), "--max_steps", "7", "--ba_sign_tolerance", "0.01"]
    )
    assert training_args.loss_type == "ba"
    assert training_args.max_steps == 7
    assert training_args.ba_sign_tolerance == 0.01
    assert script_args.dataset_name == "embedded:count"
    assert model_args.model_name_or_path == "embedded:tiny-qwen2"


def test_cli_rejects_bad_loss_type_before_launching():
    result = hf_ext_command("grpo", "--config", str(RECIPE), "--loss_type", "balanced")
    assert result.returncode != 0
    assert "loss_type='balanced' is not known; allowed values:" in result.stderr
    assert "Loading weights" not in result.stderr


def test_cli_trains_and_saves(tmp_path):
    result = hf_ext_command("grpo", "--config", str(RECIPE), "--max_steps", "2", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model.safetensors").exists()


# What the main job printed before hf_ext handled it: optional backends' import-time notices, Transformers'
# deprecations (of a recipe key, and of a property TRL and PEFT read), accelerate's launch defaults, log dicts.
NOISE = (
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    "Could not load this library",  # torchao's optional C extensions, where torchao is installed
    "is an Enum subclass and is now natively supported",  # torch, on torchao's enums
    "`gradient_checkpointing` is deprecated",
    "`is_gradient_checkpointing` is deprecated",
    "The following values were not passed to `accelerate launch`",
    "Setting accelerator to CPU",  # DeepSpeed's import, where it is installed (the test extras install it)
    "{'loss': ",
)


def test_main_job_prints_rows_and_a_summary_and_no_noise(tmp_path):
    result = hf_ext_command(
        "grpo", "--config", str(RECIPE), "--max_steps", "4", "--logging_steps", "2", "--output_dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert [noise for noise in NOISE if noise in output] == [], output[-3000:]
    header, *rows, summary = result.stdout.splitlines()
    ba_metrics = ["ba/pos_weight", "ba/neg_weight", "ba/token_agg_pos_share", "ba/len_gap", "ba/no_signal_frac"]
    assert header.split() == ["step", "reward", "reward_std", "entropy", *ba_metrics]
    assert [row.split()[0] for row in rows] == ["2", "4"]
    assert all(len(row.split()) == len(header.split()) for row in rows)
    card = tmp_path / "README.md"
    places = rf"output {re.escape(str(tmp_path))} \| model card {re.escape(str(card))}"
    assert re.fullmatch(rf"done: reward \S+ -> \S+ \| 4 steps in \S+ \| {places}", summary), summary
    assert card.is_file()


def test_sft_prints_loss_and_eval_rows_without_the_bar(tmp_path, capsys):
    """`--disable_tqdm true`, in process: the same kind of rows (loss instead of reward, evaluations marked)."""
    from hf_ext.scripts.sft import run as run_sft

    recipe = REPO / "examples" / "configs" / "sft_allora.yaml"
    argv = ["--config", str(recipe), "--max_steps", "4", "--logging_steps", "2", "--eval_steps", "4"]
    run_sft([*argv, "--num_eval_examples", "16", "--disable_tqdm", "true", "--output_dir", str(tmp_path)])
    header, *rows, summary = capsys.readouterr().out.splitlines()
    assert header.split() == ["step", "loss", "mean_token_accuracy", "entropy"]
    assert [row.split()[:2] for row in rows][2] == ["4", "eval"] and len(rows[2].split()) == 5
    assert [row.split()[0] for row in rows] == ["2", "4", "4"]
    assert summary.startswith("done: loss ") and summary.endswith(f" | model card {tmp_path / 'README.md'}")


def test_cli_env_lists_versions():
    result = hf_ext_command("env")
    assert result.returncode == 0
    assert "trl: 1." in result.stdout and "hf-ext: " in result.stdout


def test_hub_id_resolves_from_offline_cache(tmp_path):
    """The Hub loading path is the real one: a repo id found in a huggingface_hub cache, with HF_HUB_OFFLINE=1."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--hf-ext-test--tiny-qwen2"
    shutil.copytree(materialize_model(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = hf_ext_command(
        "grpo",
        "--config",
        str(RECIPE),
        "--model_name_or_path",
        "hf-ext-test/tiny-qwen2",
        "--max_steps",
        "1",
        "--output_dir",
        str(tmp_path / "out"),
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2"


def test_ba_learns_the_embedded_task(tmp_path):
    """Seeded 300-step run of the README's main job: mean reward 0.01-0.02 at the start, about 0.4 at the end."""
    trainer = run(["--config", str(RECIPE), "--output_dir", str(tmp_path), "--logging_steps", "25"])
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    assert len(rewards) == 12
    start, end = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert start < 0.08
    assert end > start + 0.25, rewards


def test_compare_losses_defaults_to_every_loss_type_of_the_installed_trl_and_hf_ext():
    from hf_ext.scripts.compare_losses import default_loss_types
    from hf_ext.trainers import grpo_losses, trl_loss_types

    assert default_loss_types() == [*sorted(trl_loss_types()), *grpo_losses()]
    assert len(default_loss_types()) == len(trl_loss_types()) + 4


def test_compare_losses_writes_table_curves_and_plot(tmp_path):
    from hf_ext.scripts.compare_losses import main as compare_losses

    rows = compare_losses(
        [
            "--loss_types",
            "dapo",
            "ba",
            "--seeds",
            "0",
            "1",
            "--max_steps",
            "4",
            "--logging_steps",
            "2",
            "--learning_rates",
            "2e-3",
            "6e-3",
            "--sweep_steps",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert [row["loss_type"] for row in rows] == ["dapo", "ba"]
    assert {row["learning_rate"] for row in rows} <= {2e-3, 6e-3} and (tmp_path / "sweep.md").exists()
    assert rows[0]["time_vs_dapo"] == pytest.approx(1.0)
    table = (tmp_path / "table.md").read_text()
    assert "| ba |" in table and "| dapo |" in table
    curves = (tmp_path / "curves.csv").read_text().splitlines()
    assert curves[0] == "loss_type,seed,step,reward" and len(curves) == 1 + 2 * 2 * 2
    assert (tmp_path / "rewards.png").stat().st_size > 1000
    provenance = (tmp_path / "README.md").read_text()
    assert "- command: `hf-ext compare-losses --loss_types dapo ba --seeds 0 1" in provenance
    assert "- versions: hf-ext " in provenance and " trl " in provenance and "cores" in provenance


RECIPES = sorted(p.name for p in (REPO / "examples" / "configs").glob("grpo_*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_offline(recipe, tmp_path):
    trainer = run(
        [
            "--config",
            str(REPO / "examples" / "configs" / recipe),
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            "--logging_steps",
            "1",
        ]
    )
    assert trainer.state.global_step == 2
    assert (tmp_path / "model.safetensors").exists() or (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses(recipe):
    _, training_args, _, _ = make_parser().parse_args_and_config(
        ["--config", str(REPO / "examples" / "configs" / recipe)]
    )
    assert recipe.removesuffix(".yaml").removesuffix("_dora_4bit") == f"grpo_{training_args.loss_type}"
