"""The contract with the installed Transformers (hf_ext.trainers.transformers_compat): ``TrainingArguments.
__post_init__`` reads ``optim`` only to convert it into ``OptimizerNames`` (so an enum value may stand in for an
hf_ext name during it, ``OptimizerArguments._optim_past_the_enum``, and the name is back afterwards, also when it
raises), and the checkpoint layout and Trainer methods hf_ext's checkpoints rely on. Each test names the symbol."""

import ast
import inspect
import textwrap

import pytest
from transformers import Trainer, TrainingArguments

from hf_ext import SFTConfig
from hf_ext.trainers import transformers_compat


def test_post_init_reads_optim_only_to_convert_it():
    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainingArguments.__post_init__)))
    uses = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.Compare | ast.Call | ast.If)
        and any(isinstance(n, ast.Attribute) and n.attr == "optim" for n in ast.walk(node))
        and not isinstance(node, ast.If)
    ]
    assert uses == ["self.optim = OptimizerNames(self.optim)", "OptimizerNames(self.optim)"], (
        f"transformers.TrainingArguments.__post_init__ now uses optim in: {uses}"
    )


def test_hf_ext_name_survives_post_init_and_its_failure(tmp_path):
    config = SFTConfig(output_dir=str(tmp_path), optim="hf_ext_adamw_4bit", use_cpu=True, bf16=False, report_to="none")
    assert config.optim == "hf_ext_adamw_4bit"
    with pytest.raises(ValueError, match="IntervalStrategy"):  # raised inside the base __post_init__
        config.eval_strategy = "no-such-strategy"
        config.__post_init__()
    assert config.optim == "hf_ext_adamw_4bit"


def _calls(function, name: str) -> list[ast.Call]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name
    ]


def test_save_checkpoint_rotates_with_the_save_total_limit_of_args():
    """CheckpointMixin sets args.save_total_limit to None around the base call, so the base must read it there."""
    calls = _calls(Trainer._save_checkpoint, "rotate_checkpoints")
    limits = [ast.unparse(kw.value) for call in calls for kw in call.keywords if kw.arg == "save_total_limit"]
    assert limits == ["self.args.save_total_limit"], (
        f"transformers.Trainer._save_checkpoint now rotates with {limits or 'no rotate_checkpoints call'}"
    )
    parameters = inspect.signature(transformers_compat.rotate_checkpoints).parameters
    assert {"output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"} <= set(parameters), (
        "transformers.trainer_utils.rotate_checkpoints changed its arguments"
    )


def test_overridden_and_called_trainer_methods_keep_their_signatures():
    for name, expected in (
        ("_save_checkpoint", ["self", "model", "trial"]),
        ("_get_output_dir", ["self", "trial"]),
        ("_load_optimizer_and_scheduler", ["self", "checkpoint"]),
        ("save_model", ["self", "output_dir", "_internal_call"]),
    ):
        parameters = list(inspect.signature(getattr(Trainer, name)).parameters)
        assert parameters == expected, f"transformers.Trainer.{name} now takes {parameters}"


def test_rng_state_files_are_named_as_trainer_names_them():
    source = inspect.getsource(Trainer._load_rng_state)
    for world_size, process_index in ((1, 0), (2, 1)):
        name = transformers_compat.rng_state_name(world_size, process_index)
        template = "rng_state.pth" if world_size == 1 else "rng_state_{process_index}.pth"
        assert template in source.replace('f"', '"'), f"transformers.Trainer._load_rng_state no longer reads {name}"


def test_checkpoint_file_names_and_trainer_attributes():
    names = (
        transformers_compat.OPTIMIZER_NAME,
        transformers_compat.SCHEDULER_NAME,
        transformers_compat.SCALER_NAME,
        transformers_compat.TRAINER_STATE_NAME,
    )
    assert names == ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"), (
        f"transformers.trainer's checkpoint file names changed: {names}"
    )
    assert transformers_compat.PREFIX_CHECKPOINT_DIR == "checkpoint", (
        "transformers.trainer_utils.PREFIX_CHECKPOINT_DIR"
    )
    init = inspect.getsource(Trainer)
    for attribute in ("current_gradient_accumulation_steps", "is_deepspeed_enabled", "is_fsdp_enabled"):
        assert f"self.{attribute} =" in init, f"transformers.Trainer no longer sets {attribute}"
