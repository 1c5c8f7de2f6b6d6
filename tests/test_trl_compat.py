"""What hf_ext reads from the installed TRL (hf_ext.trainers.trl_compat): its GRPO loss types, never a frozen copy."""

import re
import warnings

import pytest
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
