"""Recipes by packaged name, by Hub reference and ``hf-ext push-config``, through huggingface_hub's real upload and
download code against a local stand-in for the Hub (tests/launched/local_hub.py); offline resolution from the cache
it filled; and the errors for an unknown field, an unresolvable reference and a push without a token."""

import os
from pathlib import Path

import pytest
from huggingface_hub import constants
from runs import hf_ext_command

from hf_ext import GRPOConfig, SFTConfig
from hf_ext.cli import main
from hf_ext.hub.configs import HubFile, packaged_recipes, parse_reference, resolve_config
from hf_ext.hub.publish import push_config, require_hub_token
from hf_ext.scripts import grpo, sft
from hf_ext.scripts.common import parse_recipe


REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "examples" / "configs"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("me/recipes", HubFile("me/recipes", "recipe.yaml")),
        ("me/recipes:grpo/ba.yaml", HubFile("me/recipes", "grpo/ba.yaml")),
        ("me/recipes@v1:ba.yaml", HubFile("me/recipes", "ba.yaml", revision="v1")),
        ("hf://me/recipes/ba.yaml", HubFile("me/recipes", "ba.yaml")),
        ("hf://datasets/me/recipes@dev/a/b.yml", HubFile("me/recipes", "a/b.yml", "dataset", "dev")),
        ("configs/missing.yaml", None),  # a path: a missing local file, never a Hub lookup
        ("grpo_ba", None),  # a packaged name
        (str(RECIPES / "grpo_ba.yaml"), None),
    ],
)
def test_reference_forms(reference, expected):
    assert parse_reference(reference) == expected


def test_packaged_recipes_by_name(tmp_path, monkeypatch):
    assert list(packaged_recipes()) == sorted(p.stem for p in RECIPES.glob("*.yaml"))
    for name in ("grpo_ba", "sft_allora"):
        assert Path(resolve_config(name)).read_bytes() == (RECIPES / f"{name}.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grpo_ba").write_text("learning_rate: 0.1\n")
    assert resolve_config("grpo_ba") == "grpo_ba"  # a local file comes first


def test_missing_local_file_says_what_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for reference in ("configs/missing.yaml", "grpo_ab", "grpo_ba.yaml"):
        with pytest.raises(FileNotFoundError) as missing:
            resolve_config(reference)
        message = str(missing.value)
        assert f"--config {reference!r}: no such file and no packaged recipe of that name" in message
        assert "a packaged recipe name (grpo_ba, grpo_gtpo, " in message and "or a Hub reference" in message


def test_push_config_then_train_from_the_offline_cache(tmp_path, local_hub, monkeypatch, capsys):
    _, store = local_hub
    assert main(["push-config", str(RECIPES), "me/recipes", "--token", "hf_test"]) == 0
    assert "pushed" in capsys.readouterr().out
    for recipe in RECIPES.glob("*.yaml"):  # every recipe arrived intact through the real commit code
        assert (store / "models" / "me" / "recipes" / recipe.name).read_bytes() == recipe.read_bytes()
    log = (store / "requests.log").read_text()
    assert "POST /api/repos/create True" in log and "POST /api/models/me/recipes/commit/main True" in log

    assert main(["push-config", str(RECIPES), "me/recipes", "--token", "hf_test", "--revision", "dev"]) == 0
    log = (store / "requests.log").read_text()
    assert "POST /api/models/me/recipes/branch/dev True" in log and "/commit/dev True" in log

    fetched = resolve_config("me/recipes:grpo_ba.yaml")  # online: downloaded into the cache
    assert "models--me--recipes/snapshots/" in fetched

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as missing:
        resolve_config("me/recipes:grpo_dora.yaml")
    message = str(missing.value)
    assert "grpo_dora.yaml of the model repo me/recipes is not in the local Hub cache" in message
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message and "hf download me/recipes grpo_dora.yaml" in message

    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": constants.HF_HUB_CACHE}
    offline["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: the recipe must come from the cache
    out = tmp_path / "out"
    trained = hf_ext_command(
        "grpo", "--config", "me/recipes:grpo_ba.yaml", "--max_steps", "1", "--output_dir", str(out), env=offline
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "recipe.yaml").exists()


def test_unknown_recipe_field_is_refused_with_the_closest_names(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((RECIPES / "grpo_ba.yaml").read_text() + "lerning_rate: 0.1\nnum_processes: 1\n")
    with pytest.raises(SystemExit) as typo:
        parse_recipe(grpo.make_parser(prog="hf-ext grpo"), ["--config", str(recipe)])
    assert "hf-ext grpo: unknown field 'lerning_rate'" in str(typo.value)
    assert "Did you mean --learning_rate" in str(typo.value)
    assert "num_processes" not in str(typo.value)  # an accelerate option a recipe may carry
    with pytest.raises(SystemExit, match="unknown field 'allora_etaa'.*--allora_eta"):
        parse_recipe(sft.make_parser(), ["--config", str(RECIPES / "sft_allora.yaml"), "--allora_etaa", "1"])


def test_pushes_without_hub_access_are_refused_early(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"push-config needs the Hugging Face Hub, but offline mode is on"):
        push_config(str(RECIPES), "me/recipes")
    with pytest.raises(RuntimeError, match=r"push_to_hub=True needs the Hugging Face Hub"):
        GRPOConfig(str(tmp_path), push_to_hub=True, use_cpu=True, bf16=False)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    no_token = r"needs a Hugging Face token with write access, and none was found. Run `hf auth login`"
    with pytest.raises(ValueError, match=no_token):
        push_config(str(RECIPES), "me/recipes")
    with pytest.raises(ValueError, match="push_to_hub=True " + no_token):
        SFTConfig(str(tmp_path), push_to_hub=True, use_cpu=True, bf16=False)
    require_hub_token("hf_explicit", "push")  # an explicit token is enough
    with pytest.raises(ValueError, match="holds no .yaml recipe"):
        push_config(str(tmp_path), "me/recipes", token="hf_explicit")
    (tmp_path / "leaky.yaml").write_text("learning_rate: 0.1\nmodel_init_kwargs:\n  token: hf_secret\n")
    with pytest.raises(ValueError, match=r"leaky.yaml holds credentials \(model_init_kwargs.token\)"):
        push_config(str(tmp_path), "me/recipes", token="hf_explicit")
