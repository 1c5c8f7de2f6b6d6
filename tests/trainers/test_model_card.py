"""hf_ext's model cards: Hub metadata right for adapters (where TRL's card is wrong), the methods with papers and
hyper-parameters, the recipe as reloadable YAML, final metrics; parsed back with huggingface_hub's card classes."""

import re
import shutil

import pytest
import torch
import trl
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from hf_ext import GRPOConfig, SFTConfig, SFTTrainer
from hf_ext.embedded import count_sft_dataset, materialize_model
from hf_ext.hub.card import hub_id, render_model_card
from hf_ext.hub.recipe import training_recipe
from hf_ext.papers import ADAMW_4BIT, DORA, SCALING_DORA, Method
from hf_ext.scripts.sft import make_parser


SNAPSHOT = "models--hf-ext-test--tiny-qwen2/snapshots/0123456789abcdef0123456789abcdef01234567"


def test_hub_id_keeps_hub_ids_and_drops_local_paths(tmp_path):
    snapshot = tmp_path / "hub" / SNAPSHOT
    snapshot.mkdir(parents=True)
    assert hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_id("gpt2") == "gpt2"
    assert hub_id(str(snapshot)) == "hf-ext-test/tiny-qwen2"  # a Hub cache snapshot maps back to its repo
    assert hub_id(str(snapshot), repo_type="datasets") is None
    assert hub_id(str(tmp_path)) is None  # any other local directory
    assert hub_id("embedded:tiny-qwen2") is None
    assert hub_id("./not/a repo id") is None
    assert hub_id(None) is None


def test_recipe_holds_what_was_given_and_reloads(tmp_path):
    argv = ["--config", "examples/configs/sft_allora.yaml", "--output_dir", str(tmp_path), "--max_steps", "3"]
    configs = make_parser().parse_args_and_config(argv)
    recipe = training_recipe(*configs)
    assert recipe["use_allora"] is True and recipe["lora_r"] == 8 and recipe["max_steps"] == 3
    assert recipe["model_name_or_path"] == "embedded:tiny-qwen2"
    assert "accelerator_config" not in recipe and "logging_dir" not in recipe  # derived by __post_init__, not given
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    again = make_parser().parse_args_and_config(["--config", str(tmp_path / "recipe.yaml")])
    assert training_recipe(*again) == recipe


def test_given_fields_leave_secrets_out(tmp_path):
    args = GRPOConfig(str(tmp_path), use_cpu=True, bf16=False, hub_token="hf_secret", loss_type="gtpo")
    assert "hub_token" not in args.given_fields and args.given_fields["loss_type"] == "gtpo"
    assert "hf_secret" not in yaml.safe_dump(training_recipe(args))


def test_rendered_card_parses_back():
    methods = [Method("DoRA", "dora", (DORA, SCALING_DORA), {"r": 8})]
    card = render_model_card(
        model_name="run",
        base_model="Qwen/Qwen2.5-0.5B",
        is_adapter=True,
        trainer_name="SFT",
        trainer_paper=None,
        methods=methods,
        recipe={"lora_r": 8, "use_dora": True},
        metrics={"train_loss": 1.23456, "step": 4},
        tags=["trl", "sft"],
        dataset="trl-lib/Capybara",
        hub_model_id="me/run",
    )
    parsed = ModelCard(str(card))
    data = parsed.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert data["base_model_relation"] == "adapter"
    assert data["datasets"] == ["trl-lib/Capybara"]
    assert data["pipeline_tag"] == "text-generation"
    assert {"hf_ext", "trl", "sft", "dora", "lora", "base_model:adapter:Qwen/Qwen2.5-0.5B"} <= set(data["tags"])
    text = parsed.text
    assert "arXiv 2402.09353" in text and "arXiv 2603.22276" in text
    assert '"me/run"' in text  # the quick start loads the pushed repo
    assert "| train_loss | 1.235 |" in text
    recipe_block = re.search(r"```yaml\n(.*?)```", text, re.S)[1]
    assert yaml.safe_load(recipe_block) == {"lora_r": 8, "use_dora": True}


@pytest.fixture(scope="module")
def dora_sft_run(tmp_path_factory):
    """Two SFT steps of a DoRA adapter (fast path) with the 4-bit optimizer, base model from a Hub cache snapshot."""
    root = tmp_path_factory.mktemp("card_run")
    snapshot = root / "hub" / SNAPSHOT
    shutil.copytree(materialize_model(), snapshot)
    args = SFTConfig(
        str(root / "out"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        optim="hf_ext_adamw_4bit",
        optim_args="min_quantized_numel=64",
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(
        AutoModelForCausalLM.from_pretrained(str(snapshot)),
        args=args,
        train_dataset=count_sft_dataset(32, seed=0),
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model()
    return trainer, root / "out"


def test_saved_card_describes_the_run(dora_sft_run):
    trainer, out = dora_sft_run
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "hf-ext-test/tiny-qwen2"  # the Hub id, not the snapshot path
    assert data["base_model_relation"] == "adapter"
    assert {"hf_ext", "sft", "dora", "hf_ext_adamw_4bit", "lora", "base_model:adapter:hf-ext-test/tiny-qwen2"} <= set(
        data["tags"]
    )
    assert "licence" not in data and "license" not in data
    assert "DoRA, factored weight norm (hf_ext fast path)" in card.text
    for paper in (DORA, SCALING_DORA, ADAMW_4BIT):
        assert f"arXiv {paper.arxiv_id}" in card.text and paper.citation in card.text
    assert "| `min_quantized_numel` | `64` |" in card.text
    final_loss = trainer.state.log_history[-1]["train_loss"]
    assert f"| train_loss | {final_loss:.4g} |" in card.text
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["optim"] == "hf_ext_adamw_4bit" and recipe["use_dora"] is True and recipe["lora_r"] == 4
    assert recipe["model_name_or_path"] == "hf-ext-test/tiny-qwen2"
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(materialize_model()), out)  # plain PEFT


def test_push_path_card_keeps_the_adapter_metadata(dora_sft_run):
    """``push_to_hub`` rewrites the card through ``create_model_card``: TRL's own version puts
    ``library_name: transformers`` over PEFT's metadata and a ``licence`` key in; hf_ext's keeps them right."""
    trainer, out = dora_sft_run
    trl.SFTTrainer.create_model_card(trainer, model_name="out")  # what TRL alone would write
    trl_card = ModelCard.load(out / "README.md").data.to_dict()
    assert trl_card["library_name"] == "transformers" and "licence" in trl_card
    trainer.create_model_card(model_name="out")  # what push_to_hub calls
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == "hf-ext-test/tiny-qwen2"
    assert "licence" not in data


def test_local_base_model_is_left_out(tmp_path):
    args = SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1, save_strategy="no")
    trainer = SFTTrainer(
        str(materialize_model()),
        args=args,
        train_dataset=count_sft_dataset(8, seed=0),
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
    )
    trainer.save_model()
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert "base_model" not in data and data["library_name"] == "peft"
    assert "base_model_relation" not in data  # the Hub infers nothing from a missing base
    assert not any(str(tmp_path) in str(value) or "hf_ext_test_cache" in str(value) for value in data.values())
    assert "given_fields" not in (tmp_path / "recipe.yaml").read_text()


def test_trainer_push_uploads_hf_ext_card(dora_sft_run, local_hub, monkeypatch):
    """``trainer.push_to_hub`` through Transformers' and huggingface_hub's real code to the local Hub: the card that
    arrives is hf_ext's, next to the adapter and the recipe. Without a token the push stops first, saying so."""
    from huggingface_hub import constants

    trainer, _ = dora_sft_run
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"trainer.push_to_hub\(\) needs a Hugging Face token"):
        trainer.push_to_hub()
    _, store = local_hub
    trainer.push_to_hub(token="hf_test", dataset_name="trl-lib/Capybara")
    pushed = next((store / "models").glob("*/out"))
    card = ModelCard.load(pushed / "README.md").data.to_dict()
    assert card["library_name"] == "peft" and card["base_model"] == "hf-ext-test/tiny-qwen2"
    assert card["datasets"] == ["trl-lib/Capybara"]
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml"} <= {p.name for p in pushed.iterdir()}


def test_local_hub_rejects_a_local_base_model_path(local_hub, tmp_path):
    """The stand-in's metadata rule bites: the card PEFT writes for a base loaded from a path cannot be uploaded."""
    from huggingface_hub import HfApi

    (tmp_path / "README.md").write_text("---\nbase_model: /data/models/qwen\nlibrary_name: peft\n---\n# card\n")
    with pytest.raises(ValueError, match='"base_model" must be a Hub model id'):
        HfApi(token="hf_test").upload_folder(repo_id="me/bad", folder_path=str(tmp_path))


def test_python_api_recipe_is_partial_and_yaml_safe(tmp_path):
    """A run set up in Python: the card says its recipe is partial; torch dtypes and regex targets stay readable;
    no local path anywhere in the card or the recipe."""
    args = SFTConfig(
        str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=1,
        save_strategy="no",
        model_init_kwargs={"dtype": torch.float32},
        hub_token="hf_secret",
    )
    peft_config = LoraConfig(r=2, target_modules=r".*\.(q|v)_proj")
    trainer = SFTTrainer(
        str(materialize_model()), args=args, train_dataset=count_sft_dataset(8, seed=0), peft_config=peft_config
    )
    trainer.save_model()
    recipe_text = (tmp_path / "out" / "recipe.yaml").read_text()
    recipe = yaml.safe_load(recipe_text)
    assert recipe["model_init_kwargs"] == {"dtype": "float32"}
    assert recipe["lora_target_modules"] == r".*\.(q|v)_proj"
    assert "output_dir" not in recipe and "model_name_or_path" not in recipe  # the base is a local directory
    card_text = (tmp_path / "out" / "README.md").read_text()
    for text in (recipe_text, card_text):
        assert str(tmp_path) not in text and str(materialize_model()) not in text and "hf_secret" not in text
    assert "this is not a complete recipe" in card_text and "Run it again" not in card_text


def test_create_model_card_takes_license_and_language_and_refuses_the_rest(dora_sft_run):
    trainer, out = dora_sft_run
    trainer.create_model_card(license="apache-2.0", language="en")
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["license"] == "apache-2.0" and data["language"] == "en"
    with pytest.raises(TypeError, match=r"unsupported arguments \['tasks'\]"):
        trainer.create_model_card(tasks="text-generation")


def test_qdora_card_says_how_the_base_was_loaded(tmp_path):
    from transformers import BitsAndBytesConfig

    from hf_ext.peft import FastDoraLinear4bit

    base = AutoModelForCausalLM.from_pretrained(
        materialize_model(), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    args = SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1, save_strategy="no")
    peft_config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    trainer = SFTTrainer(base, args=args, train_dataset=count_sft_dataset(8, seed=0), peft_config=peft_config)
    assert any(isinstance(module, FastDoraLinear4bit) for module in trainer.model.modules())
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "README.md")
    assert "loaded with bitsandbytes 4-bit (nf4)" in card.text
    assert "DoRA, factored weight norm (hf_ext fast path)" in card.text
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["load_in_4bit"] is True and recipe["bnb_4bit_quant_type"] == "nf4"
