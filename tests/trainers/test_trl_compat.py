"""The contract with the installed TRL (hf_ext.trainers.trl_compat): its GRPO loss types, read from it and never
frozen, and every private TRL symbol hf_ext uses, each test naming the symbol when an upstream change breaks it."""

import ast
import dataclasses
import inspect
import re
import textwrap
import warnings

import pytest
import torch
import trl

from hf_ext.trainers import GRPOConfig, grpo, trl_compat


def config(tmp_path, loss_type: str) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, bf16=False, report_to="none")


def test_loss_types_read_from_the_source_agree_with_trl_s_own_help_text():
    """Two independent readings of the installed TRL: the strings its loss code compares loss_type with, and the
    values its GRPOConfig help lists ("Supported values are 'grpo', ..., and 'vespo'.")."""
    help_text = trl.GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    supported = help_text.split("Supported values are", 1)[1].split(".", 1)[0]
    assert set(trl_compat.trl_loss_types()) == set(re.findall(r"'(\w+)'", supported))
    assert {"grpo", "dapo", "dr_grpo", "bnpo"} <= set(trl_compat.trl_loss_types())


def test_names_come_from_equality_and_membership_tests_of_self_loss_type_only():
    def compute_loss(self, other):
        if self.loss_type == "alpha" or self.loss_type in ["beta", "gamma"]:
            pass
        elif self.loss_type != "not_this" and other.loss_type == "nor_this" and self.mode == "nor_that":
            pass
        elif self.loss_type in ("delta",):
            pass

    assert trl_compat.loss_type_names(compute_loss) == ("alpha", "beta", "gamma", "delta")


def test_a_loss_type_of_a_newer_trl_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "trl_loss_types", lambda: ("grpo", "dapo", "newer_loss"))
    assert config(tmp_path, "newer_loss").loss_type == "newer_loss"
    with pytest.raises(ValueError, match=r"'vespo' is not known; allowed values: grpo, dapo, newer_loss, ba"):
        config(tmp_path, "vespo")


def test_unreadable_trl_source_passes_the_name_on_with_a_warning(tmp_path, monkeypatch):
    def no_source(function):
        raise OSError("could not get source code")

    monkeypatch.setattr(trl_compat.inspect, "getsource", no_source)
    trl_compat.trl_loss_types.cache_clear()
    try:
        assert trl_compat.trl_loss_types() is None
        with pytest.warns(UserWarning, match=r"loss_type='some_loss'.*could not be read.*passing it to TRL unchecked"):
            config(tmp_path, "some_loss")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            config(tmp_path, "ba")  # hf_ext's own: no warning
    finally:
        trl_compat.trl_loss_types.cache_clear()


# ---------------------------------------------------------------- the private TRL symbols hf_ext uses


def _source_tree(function) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def test_the_trainer_methods_hf_ext_overrides_or_calls_exist():
    for name in (
        "_compute_loss",
        "_generate_and_score_completions",
        "_get_per_token_logps_and_entropies",
        "_calculate_rewards",
        "get_high_entropy_mask",
        "get_off_policy_mask",
    ):
        assert callable(getattr(trl.GRPOTrainer, name, None)), f"trl.GRPOTrainer.{name} is gone or renamed"


def test_the_forward_takes_the_arguments_hf_ext_passes():
    parameters = inspect.signature(trl.GRPOTrainer._get_per_token_logps_and_entropies).parameters
    missing = {"compute_entropy", "compute_aux_loss", *trl_compat.MODEL_INPUT_KEYS} - set(parameters)
    assert not missing, f"trl.GRPOTrainer._get_per_token_logps_and_entropies no longer takes {sorted(missing)}"


def test_trl_s_loss_forwards_exactly_the_model_inputs_hf_ext_forwards():
    """The ``inputs.get(key)`` keyword arguments of TRL's forward call: a new multimodal key shows up here."""
    call = next(
        node
        for node in ast.walk(_source_tree(trl.GRPOTrainer._compute_loss))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_get_per_token_logps_and_entropies"
    )
    passed = {kw.arg for kw in call.keywords if isinstance(kw.value, ast.Call)}
    assert passed == set(trl_compat.MODEL_INPUT_KEYS), (
        f"trl.GRPOTrainer._compute_loss now forwards {sorted(passed)} to _get_per_token_logps_and_entropies; "
        f"hf_ext.trainers.trl_compat.MODEL_INPUT_KEYS has {sorted(trl_compat.MODEL_INPUT_KEYS)}"
    )


def test_generation_output_has_the_keys_hf_ext_reads():
    keys = {
        key.value
        for node in ast.walk(_source_tree(trl.GRPOTrainer._generate_and_score_completions))
        if isinstance(node, ast.Dict)
        for key in node.keys
        if isinstance(key, ast.Constant)
    }
    missing = set(trl_compat.GENERATION_KEYS) - keys
    assert not missing, f"trl.GRPOTrainer._generate_and_score_completions no longer returns {sorted(missing)}"


def test_trainer_state_hf_ext_reads_is_set_by_trl(tmp_path):
    from hf_ext import GRPOTrainer
    from hf_ext.embedded import count_dataset, count_reward, materialize_model

    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=2),
        train_dataset=count_dataset(4),
    )
    for name in (
        "_metrics",
        "entropy_coef",
        "use_adaptive_entropy",
        "_entropy_bonus_enabled",
        "_last_world_entropy",
        "_entropy_window_stats",
        "aux_loss_enabled",
        "router_aux_loss_coef",
        "epsilon_low",
        "epsilon_high",
        "top_entropy_quantile",
        "off_policy_mask_threshold",
        "num_generations",
        "num_generations_eval",
    ):
        assert hasattr(trainer, name), f"trl.GRPOTrainer instances no longer have {name!r}"
    assert set(trainer._metrics) == {"train", "eval"}, "trl.GRPOTrainer._metrics is no longer keyed by mode"
    trl_compat.metrics(trainer, "train")["probe"].append(1.0)  # a defaultdict(list) per mode


def test_helper_functions_behave_as_hf_ext_relies():
    assert trl_compat.is_async_callable(_async_reward) and not trl_compat.is_async_callable(len), (
        "trl.trainer.grpo_trainer.is_async_callable changed"
    )
    values = torch.tensor([float("nan"), 2.0, 1.0])
    assert (trl_compat.nanmin(values).item(), trl_compat.nanmax(values).item()) == (1.0, 2.0), (
        "trl.trainer.utils.nanmin / nanmax changed"
    )


async def _async_reward(completions, **kwargs):
    return [0.0] * len(completions)


def test_card_and_script_symbols_exist():
    assert isinstance(trl.GRPOTrainer._tag_names, list), "trl.GRPOTrainer._tag_names is no longer a list"
    assert isinstance(trl.GRPOTrainer._name, str), "trl.GRPOTrainer._name is gone"
    assert {"title", "id", "citation"} <= set(trl.GRPOTrainer._paper), "trl.GRPOTrainer._paper changed its keys"
    assert dataclasses.is_dataclass(trl_compat.GRPOScriptArguments), "trl.scripts.grpo.GRPOScriptArguments changed"
    assert "reward_funcs" in {f.name for f in dataclasses.fields(trl_compat.GRPOScriptArguments)}, (
        "trl.scripts.grpo.GRPOScriptArguments no longer has reward_funcs"
    )
    assert "separate_remaining_strings" in inspect.signature(trl.TrlParser.parse_args_and_config).parameters, (
        "trl.TrlParser.parse_args_and_config no longer takes separate_remaining_strings"
    )


def test_mask_helpers_take_the_arguments_hf_ext_passes():
    for name, expected in (
        ("get_high_entropy_mask", {"entropies", "mask", "threshold"}),
        (
            "get_off_policy_mask",
            {"advantages", "per_token_logps", "sampling_per_token_logps", "mask", "off_policy_threshold"},
        ),
    ):
        parameters = set(inspect.signature(getattr(trl.GRPOTrainer, name)).parameters)
        assert expected <= parameters, f"trl.GRPOTrainer.{name} now takes {sorted(parameters)}"


def test_calculate_rewards_is_completions_by_functions_with_nan_for_none(tmp_path):
    """What the override of ``_calculate_rewards`` checks relies on: one row per completion (of all processes, here
    one), one column per reward function in order, NaN where a function returned None."""
    from hf_ext import GRPOTrainer
    from hf_ext.embedded import count_dataset, materialize_model

    def first_unscored(completions, **kwargs):
        return [None] + [1.0] * (len(completions) - 1)

    def constant(completions, **kwargs):
        return [2.0] * len(completions)

    trainer = trl.GRPOTrainer.__new__(GRPOTrainer)
    trl.GRPOTrainer.__init__(
        trainer,
        model=str(materialize_model()),
        reward_funcs=[first_unscored, constant],
        args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=2),
        train_dataset=count_dataset(4),
    )
    prompts, completions = ["a", "b", "c"], ["x", "y", "z"]
    rewards = trl.GRPOTrainer._calculate_rewards(
        trainer, [{"prompt": p} for p in prompts], prompts, completions, [[1], [2], [3]]
    )
    assert rewards.shape == (3, 2), f"trl.GRPOTrainer._calculate_rewards returned shape {tuple(rewards.shape)}"
    assert (
        torch.isnan(rewards[0, 0]) and rewards[1:, 0].tolist() == [1.0, 1.0] and rewards[:, 1].tolist() == [2.0] * 3
    ), f"trl.GRPOTrainer._calculate_rewards changed its layout: {rewards.tolist()}"
