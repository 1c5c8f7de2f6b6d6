"""A GRPO loss is one file: a toy loss defined outside hf_ext (tests/plugins/hf_ext_toy_loss.py) trains from Python
once registered and from the CLI through the ``hf_ext.grpo_losses`` entry-point group, its fields reach the config,
the parser and the checks, and the model card names it. Also the registry's refusals.

The toy loss is registered for each test that uses it and forgotten after it (``toy_loss``), so that the rest of the
session sees hf_ext's losses only."""

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import tiny_grpo_config

from hf_ext import GRPOConfig, GRPOLoss, GRPOTrainer, grpo_losses, register_grpo_loss
from hf_ext.embedded import count_dataset, count_reward, materialize_model
from hf_ext.scripts.grpo import make_parser
from hf_ext.trainers import grpo_loss


PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
_CONFIG_STATE = ("__init__", "__repr__", "__eq__", "__match_args__", "__dataclass_fields__", "__annotations__")


@pytest.fixture
def toy_loss():
    """The toy loss's module, its loss registered (on first import, by its decorator) for the test only: afterwards
    the registry and GRPOConfig are as before."""
    registry = (dict(grpo_loss._LOSSES), dict(grpo_loss._FIELD_OWNERS))
    config = {name: GRPOConfig.__dict__[name] for name in _CONFIG_STATE if name in GRPOConfig.__dict__}
    loss_type_metadata = GRPOConfig.__dataclass_fields__["loss_type"].metadata
    sys.path.insert(0, str(PLUGINS))
    try:
        module = importlib.import_module("hf_ext_toy_loss")
        register_grpo_loss(module.ToyPolicyGradient)
        yield module
    finally:
        sys.path.remove(str(PLUGINS))
        added = set(GRPOConfig.__dataclass_fields__) - set(config["__dataclass_fields__"])
        for name, value in config.items():
            setattr(GRPOConfig, name, value)
        for name in added:
            if name in GRPOConfig.__dict__:
                delattr(GRPOConfig, name)
        GRPOConfig.__dataclass_fields__["loss_type"].metadata = loss_type_metadata
        grpo_loss._LOSSES.clear()
        grpo_loss._LOSSES.update(registry[0])
        grpo_loss._FIELD_OWNERS.clear()
        grpo_loss._FIELD_OWNERS.update(registry[1])


def tiny_config(tmp_path, **overrides) -> GRPOConfig:
    return tiny_grpo_config(tmp_path, **{"loss_type": "toy_pg", "max_steps": 2, "logging_steps": 1, **overrides})


def test_registering_adds_the_loss_and_its_fields(toy_loss):
    assert grpo_losses()["toy_pg"] is toy_loss.ToyPolicyGradient
    assert "toy_advantage_scale" in {f.name for f in dataclasses.fields(GRPOConfig)}
    assert "'toy_pg' (Toy policy gradient" in GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    flags = ["--loss_type", "toy_pg", "--toy_advantage_scale", "3", "--use_cpu", "true", "--bf16", "false"]
    args = make_parser().parse_args_and_config(flags)[1]
    assert (args.loss_type, args.toy_advantage_scale) == ("toy_pg", 3.0)


def test_the_loss_s_own_check_runs_at_config_time(toy_loss, tmp_path):
    with pytest.raises(ValueError, match="toy_advantage_scale must be > 0, got -1.0"):
        tiny_config(tmp_path, toy_advantage_scale=-1.0)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        tiny_config(tmp_path, num_generations=1)


def test_toy_loss_trains_from_python_and_its_card_names_it(toy_loss, tmp_path):
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_config(tmp_path, toy_advantage_scale=2.0),
        train_dataset=count_dataset(12),
    )
    assert isinstance(trainer.grpo_loss, toy_loss.ToyPolicyGradient)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    moved = sum((p.detach() - s).abs().sum().item() for p, s in zip(trainer.model.parameters(), start, strict=True))
    assert moved > 0
    assert any("toy_pg/row_logp" in entry for entry in trainer.state.log_history)
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "GRPO loss `toy_pg`" in card and "toy_advantage_scale" in card and "@misc{toy_pg}" in card
    assert "- toy_pg" in card


def test_toy_loss_trains_from_the_cli_through_its_entry_point(tmp_path):
    """A fresh process knows the loss only through an installed distribution's entry point."""
    site = tmp_path / "site"
    dist_info = site / "hf_ext_toy_loss-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hf-ext-toy-loss\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[hf_ext.grpo_losses]\ntoy_pg = hf_ext_toy_loss:ToyPolicyGradient\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    output_dir = tmp_path / "run"
    command = [sys.executable, "-c", "from hf_ext.cli import main; raise SystemExit(main())", "grpo"]
    command += ["--config", "grpo_ba", "--loss_type", "toy_pg", "--toy_advantage_scale", "2", "--max_steps", "2"]
    command += ["--output_dir", str(output_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (output_dir / "README.md").read_text()
    assert "GRPO loss `toy_pg`" in card and "toy_advantage_scale: 2.0" in (output_dir / "recipe.yaml").read_text()


def test_a_taken_name_or_field_is_refused():
    @dataclasses.dataclass
    class Clashing:
        beta: float = dataclasses.field(default=0.0, metadata={"help": "clashes with TRL's beta"})

    class SameName(GRPOLoss):
        name = "ba"

    class TRLName(GRPOLoss):
        name = "dapo"

    class FieldClash(GRPOLoss):
        name = "field_clash"
        settings = Clashing

    for cls, message in ((SameName, "already registered"), (TRLName, "TRL's own"), (FieldClash, "already a field")):
        with pytest.raises(ValueError, match=message):
            register_grpo_loss(cls)
    assert "field_clash" not in grpo_losses()
    with pytest.raises(TypeError, match="subclass of hf_ext.GRPOLoss"):
        register_grpo_loss(torch.nn.Linear)


def test_outside_the_fixture_only_hf_ext_s_losses_are_registered():
    """Runs after the tests above (file order): their registration of the toy loss was undone."""
    assert "toy_pg" not in grpo_losses() and "toy_advantage_scale" not in GRPOConfig.__dataclass_fields__
    assert "toy_pg" not in GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
