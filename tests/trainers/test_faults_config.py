"""A run that would train nothing, or fail only after its model loaded, is refused when its config is built, naming
the field; a run never trains over an earlier run's model or checkpoints in its output_dir unless it resumes or is
told to (`overwrite_output_dir`)."""

import hashlib
import math
import re
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from runs import hf_ext_command

import hf_ext.scripts.common
from hf_ext.scripts.grpo import run
from hf_ext.scripts.overwrite import refuse_overwrite
from hf_ext.trainers import GRPOConfig, SFTConfig


def config(config_cls, tmp_path, **fields):
    return config_cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)


# Each was accepted before: 0 steps trained (then a saved "trained" model), or an error once the model had loaded, or
# a ZeroDivisionError at config time (loss_type="real": num_iterations, gradient_accumulation_steps,
# steps_per_generation, generation_batch_size; TRL's own check for num_generations=0).
SHARED_FAULTS = [
    ("per_device_train_batch_size", 0),
    ("per_device_train_batch_size", -8),
    ("per_device_eval_batch_size", 0),
    ("gradient_accumulation_steps", 0),
    ("gradient_accumulation_steps", -1),
    ("learning_rate", 0.0),
    ("learning_rate", -1e-3),
    ("learning_rate", math.nan),
]
GRPO_FAULTS = [
    *SHARED_FAULTS,
    ("num_iterations", 0),
    ("num_iterations", -1),
    ("num_generations", 0),
    ("num_generations_eval", -2),
    ("steps_per_generation", 0),
    ("generation_batch_size", 0),
    ("max_completion_length", 0),
    ("max_completion_length", -1),
    ("temperature", 0.0),
    ("temperature", -1.0),
]
SFT_FAULTS = [*SHARED_FAULTS, ("max_length", 0)]


def refusal(field: str, value) -> str:
    return rf"\b{field} must be .*got {re.escape(repr(value))}\."


@pytest.mark.parametrize("loss_type", ["dapo", "ba", "real"])
@pytest.mark.parametrize(("field", "value"), GRPO_FAULTS, ids=lambda item: str(item))
def test_grpo_config_names_the_field_out_of_range(tmp_path, loss_type, field, value):
    with pytest.raises(ValueError, match=refusal(field, value)):
        config(GRPOConfig, tmp_path, loss_type=loss_type, **{field: value})


@pytest.mark.parametrize(("field", "value"), SFT_FAULTS, ids=lambda item: str(item))
def test_sft_config_names_the_field_out_of_range(tmp_path, field, value):
    with pytest.raises(ValueError, match=refusal(field, value)):
        config(SFTConfig, tmp_path, **{field: value})


def test_a_field_of_a_newer_trl_is_checked_where_the_config_has_it(tmp_path):
    """`max_prompt_length` (absent from the installed TRL's GRPOConfig): checked when present, unset allowed."""

    @dataclass
    class WithPromptLength(GRPOConfig):
        max_prompt_length: int | None = 512

    with pytest.raises(ValueError, match=refusal("max_prompt_length", 0)):
        config(WithPromptLength, tmp_path, max_prompt_length=0)
    assert config(WithPromptLength, tmp_path, max_prompt_length=None).max_prompt_length is None


@pytest.mark.parametrize("config_cls", [GRPOConfig, SFTConfig])
def test_zero_steps_or_epochs_are_refused(tmp_path, config_cls):
    with pytest.raises(ValueError, match=r"max_steps=0 would train nothing: give max_steps >= 1, or a negative"):
        config(config_cls, tmp_path, max_steps=0)
    with pytest.raises(ValueError, match=r"num_train_epochs must be a finite number > 0 when max_steps is negative"):
        config(config_cls, tmp_path, num_train_epochs=0)
    assert config(config_cls, tmp_path, num_train_epochs=0, max_steps=5).max_steps == 5  # epochs unused


def test_unset_lengths_and_the_defaults_pass(tmp_path):
    assert config(GRPOConfig, tmp_path, max_completion_length=None).max_completion_length is None
    assert config(SFTConfig, tmp_path, max_length=None).max_length is None
    assert config(GRPOConfig, tmp_path, loss_type="real").num_iterations == 1


def test_cli_refuses_zero_iterations_before_loading_the_model(tmp_path):
    result = hf_ext_command(
        "grpo", "--config", "grpo_ba", "--num_iterations", "0", "--output_dir", str(tmp_path / "o")
    )
    assert result.returncode != 0
    assert "num_iterations must be an integer >= 1, got 0." in result.stderr
    assert "Loading weights" not in result.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- an earlier run's output_dir


def digests(folder) -> dict:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def train_grpo(out, *flags: str):
    """The main job's recipe, in process, into ``out``."""
    return run(["--config", "grpo_ba", "--output_dir", str(out), *flags])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An output_dir after a 2-step run: the final model and checkpoint-2."""
    out = tmp_path_factory.mktemp("trained")
    train_grpo(out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    return out


@pytest.fixture
def no_model_loading(monkeypatch):
    monkeypatch.setattr(hf_ext.scripts.common, "model_and_init_kwargs", lambda *a: pytest.fail("model loaded"))


def test_cli_refuses_to_train_over_a_trained_model_and_leaves_it_unchanged(trained):
    before = digests(trained)
    result = hf_ext_command("grpo", "--config", "grpo_ba", "--max_steps", "2", "--output_dir", str(trained))
    assert result.returncode != 0
    assert f"output_dir {str(trained)!r} already holds a saved model (config.json, model.safetensors) and " in (
        result.stderr
    )
    assert (
        "Pass --resume_from_checkpoint last to continue that run (from its newest complete checkpoint), "
        in result.stderr
    )
    assert "--overwrite_output_dir true to train over it anyway, or another --output_dir." in result.stderr
    assert "Loading weights" not in result.stderr
    assert digests(trained) == before


def test_the_script_refuses_it_too_before_loading_the_model(trained, no_model_loading):
    """What `accelerate launch examples/grpo.py` and in-process runs go through."""
    with pytest.raises(FileExistsError, match="already holds a saved model"):
        train_grpo(trained)


def test_checkpoints_alone_are_refused_too(trained, tmp_path, no_model_loading):
    shutil.copytree(trained / "checkpoint-2", tmp_path / "checkpoint-2")
    with pytest.raises(FileExistsError, match=re.escape("already holds checkpoints (the last: checkpoint-2) from")):
        train_grpo(tmp_path)


def test_a_folder_without_a_model_passes(tmp_path):
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "runs").mkdir()
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None, overwrite_output_dir=False)
    refuse_overwrite(args)
    refuse_overwrite(SimpleNamespace(**{**vars(args), "output_dir": str(tmp_path / "missing")}))


def test_resuming_from_a_checkpoint_in_it_trains_on(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    trainer = train_grpo(tmp_path, "--max_steps", "3", "--resume_from_checkpoint", str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 3


def test_overwrite_output_dir_trains_over_it(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    saved_at = (tmp_path / "model.safetensors").stat().st_mtime_ns
    trainer = train_grpo(tmp_path, "--max_steps", "1", "--overwrite_output_dir", "true")
    assert trainer.state.global_step == 1
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns > saved_at  # written again
    assert digests(tmp_path / "checkpoint-2") == digests(trained / "checkpoint-2")  # other files stay
