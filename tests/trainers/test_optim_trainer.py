"""hf_ext's 4-bit AdamW as a Trainer `optim` name: config parsing and errors, the optimizer the trainers build,
bit-exact checkpoint resume through the Trainer, and 2 CPU processes against 1."""

import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_ext import GRPOConfig, SFTConfig, SFTTrainer, optimizer_cls_and_kwargs
from hf_ext.embedded import build_tiny_model, count_sft_dataset, materialize_model
from hf_ext.optim import AdamW4bit, AdamW4bitFactor
from hf_ext.scripts.sft import make_parser


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "launched"))
import sft_optim  # noqa: E402
from multiproc import launch_two_processes  # noqa: E402


def sft_config(tmp_path, **overrides) -> SFTConfig:
    return SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", **overrides)


@pytest.mark.parametrize("name", ["hf_ext_adamw_4bit", "hf_ext_adamw_4bit_factor"])
def test_names_are_accepted_and_kept(tmp_path, name):
    assert sft_config(tmp_path, optim=name, optim_args="block_size=64").optim == name
    assert GRPOConfig(str(tmp_path), optim=name, use_cpu=True, bf16=False).optim == name
    assert sft_config(tmp_path, optim="adamw_torch").optim == "adamw_torch"  # Transformers' names still work


def test_yaml_and_cli():
    argv = [
        "--config",
        "examples/configs/sft_allora.yaml",
        "--optim",
        "hf_ext_adamw_4bit_factor",
        "--optim_args",
        "block_size=64,nonfinite_grads=skip",
    ]
    _, args, _, _ = make_parser().parse_args_and_config(argv)
    assert args.optim == "hf_ext_adamw_4bit_factor"
    assert optimizer_cls_and_kwargs(args)[1]["block_size"] == 64


def test_unknown_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"optim='adamw_4bit_hf' is not known; hf_ext's: hf_ext_adamw_4bit, "):
        sft_config(tmp_path, optim="adamw_4bit_hf")


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("block_size", "is not KEY=VALUE"),
        ("blocksize=64", "is not KEY=VALUE with KEY one of block_size, min_quantized_numel, nonfinite_grads"),
        ("block_size=abc", "block_size must be int, got 'abc'"),
        ("nonfinite_grads=maybe", "nonfinite_grads"),
        ("block_size=0", "block_size"),
    ],
)
def test_malformed_optim_args_fail_at_config_time(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sft_config(tmp_path, optim="hf_ext_adamw_4bit", optim_args=optim_args)


@pytest.mark.parametrize(
    ("name", "cls"), [("hf_ext_adamw_4bit", AdamW4bit), ("hf_ext_adamw_4bit_factor", AdamW4bitFactor)]
)
def test_trainers_build_the_named_optimizer(tmp_path, name, cls):
    args = sft_config(tmp_path, optim=name, optim_args="block_size=64", learning_rate=3e-4, adam_beta2=0.95)
    trainer = SFTTrainer(str(materialize_model()), args=args, train_dataset=count_sft_dataset(8))
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is cls
    assert optimizer.defaults["block_size"] == 64 and optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.defaults["lr"] == 3e-4


def test_plain_transformers_trainer_in_one_call(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", optim_args="block_size=64")
    trainer = Trainer(
        build_tiny_model(), args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "hf_ext_adamw_4bit")
    )
    assert type(trainer.create_optimizer()) is AdamW4bit


@pytest.mark.parametrize("name", ["hf_ext_adamw_4bit", "hf_ext_adamw_4bit_factor"])
def test_resume_through_the_trainer_is_bit_exact(tmp_path, name):
    straight, _ = sft_optim.train(name, str(tmp_path / "straight"), max_steps=4)
    sft_optim.train(name, str(tmp_path / "saved"), max_steps=4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "saved" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    resumed, _ = sft_optim.train(name, str(tmp_path / "saved"), max_steps=4, resume_from_checkpoint=str(checkpoint))
    for key, value in straight["params"].items():
        assert torch.equal(value, resumed["params"][key]), key


@pytest.mark.multiproc
def test_two_processes_equal_one_process(tmp_path):
    one, _ = sft_optim.train("hf_ext_adamw_4bit", str(tmp_path / "one"))
    two = launch_two_processes(REPO / "tests" / "launched" / "sft_optim.py", [], tmp_path / "two.pt")
    moved = max((one["params"][k] - p).abs().max().item() for k, p in build_tiny_model().named_parameters())
    difference = max((one["params"][k] - two["params"][k]).abs().max().item() for k in one["params"])
    assert moved > 1e-2 and difference < 1e-5
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
