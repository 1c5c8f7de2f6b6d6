"""The GRPO script end to end: YAML + flags, the `hf-ext` command, Hub-style loading, and real learning."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_ext.embedded import materialize_model
from hf_ext.scripts.grpo import make_parser, run


REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "configs" / "grpo_ba.yaml"


def hf_ext_command(*args: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from hf_ext.cli import main; raise SystemExit(main())", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, **kwargs)


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
            "--out",
            str(tmp_path),
        ]
    )
    assert [row["loss_type"] for row in rows] == ["dapo", "ba"]
    assert rows[0]["time_vs_dapo"] == pytest.approx(1.0)
    table = (tmp_path / "table.md").read_text()
    assert "| ba |" in table and "| dapo |" in table
    curves = (tmp_path / "curves.csv").read_text().splitlines()
    assert curves[0] == "loss_type,seed,step,reward" and len(curves) == 1 + 2 * 2 * 2
    assert (tmp_path / "rewards.png").stat().st_size > 1000


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
