"""The model card every hf_ext trainer writes: on ``save_model`` (final save and checkpoints), when TRL asks for a
card (``create_model_card``, at each checkpoint and on ``push_to_hub``), always after PEFT has written its own.

Besides ``README.md`` the output directory gets ``recipe.yaml``, the run's recipe, which ``hf-ext grpo|sft --config``
accepts as is (also by Hub reference once pushed: ``--config owner/repo:recipe.yaml``).
"""

import os

import yaml

from ..hub.card import final_metrics, hub_id, render_model_card
from ..hub.publish import require_hub_token
from ..hub.recipe import training_recipe
from ..papers import Method, Paper
from .adapter_args import adapter_card_sections
from .optim_args import optimizer_card_section


RECIPE_FILE = "recipe.yaml"
_ADAPTER_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}


def _trl_paper(trainer) -> Paper | None:
    """The paper of the TRL trainer class (e.g. GRPO's DeepSeekMath), whatever loss type the instance runs."""
    paper = getattr(type(trainer), "_paper", None) or {}
    return Paper(paper["title"], paper["id"], paper.get("citation", "")) if paper.get("id") else None


class ModelCardMixin:
    """Writes hf_ext's model card and ``recipe.yaml``. Scripts may set ``hf_ext_recipe`` to the full recipe (script,
    model and dataset fields too); by default it is the training config's non-default fields plus the model."""

    hf_ext_recipe: dict | None = None

    def _peft_config(self):
        configs = getattr(self.model, "peft_config", None)
        return configs[self.model.active_adapter] if configs else None

    def _base_model_name(self) -> str | None:
        peft_config = self._peft_config()
        name = peft_config.base_model_name_or_path if peft_config is not None else None
        return name or getattr(self.model.config, "name_or_path", None)

    def _recipe(self) -> dict:
        """The scripts' full recipe, or else the training arguments with the model's Hub id and adapter fields."""
        if self.hf_ext_recipe is not None:
            return self.hf_ext_recipe
        model_id = hub_id(self._base_model_name())
        recipe = {"model_name_or_path": model_id} if model_id else {}  # never a local path
        peft_config = self._peft_config()
        if peft_config is not None:
            recipe["use_peft"] = True
            recipe.update({name: getattr(peft_config, key) for key, name in _ADAPTER_FIELDS.items()})
            targets = peft_config.target_modules
            recipe["lora_target_modules"] = targets if isinstance(targets, str) else sorted(targets or [])
            recipe["use_dora"] = bool(peft_config.use_dora)
            recipe["use_rslora"] = bool(peft_config.use_rslora)
            if peft_config.modules_to_save:
                recipe["lora_modules_to_save"] = sorted(peft_config.modules_to_save)
        recipe.update(self._base_quantization_fields())
        return {**recipe, **training_recipe(self.args)}

    def _base_quantization_fields(self) -> dict:
        """TRL ``ModelConfig`` fields of a bitsandbytes-quantized base (``load_in_4bit``, ...), else nothing."""
        quantization = getattr(self.model.config, "quantization_config", None)
        if quantization is None or getattr(quantization, "quant_method", None) != "bitsandbytes":
            return {}
        if quantization.load_in_4bit:
            nested = bool(quantization.bnb_4bit_use_double_quant)
            return {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": quantization.bnb_4bit_quant_type,
                "use_bnb_nested_quant": nested,
            }
        return {"load_in_8bit": True} if quantization.load_in_8bit else {}

    def _base_quantization(self) -> str | None:
        fields = self._base_quantization_fields()
        if "load_in_4bit" in fields:
            return f"bitsandbytes 4-bit ({fields['bnb_4bit_quant_type']})"
        return "bitsandbytes 8-bit" if fields else None

    def _hf_ext_methods(self) -> list[Method]:
        """Each hf_ext method of this run, as the method describes itself: the GRPO loss, the adapter's, the
        optimizer's."""
        grpo_loss = getattr(self, "grpo_loss", None)
        sections = [grpo_loss.card_section()] if grpo_loss is not None else []
        sections += adapter_card_sections(self.args, self.model, self._peft_config())
        optimizer = optimizer_card_section(self.args)
        return [*sections, *([optimizer] if optimizer is not None else [])]

    def write_model_card(
        self,
        output_dir: str,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags=None,
        license: str | None = None,
        language: str | list[str] | None = None,
    ) -> None:
        """Write ``README.md`` and ``recipe.yaml`` for this run into ``output_dir``."""
        recipe = self._recipe()
        dataset_name = dataset_name or recipe.get("dataset_name")
        card = render_model_card(
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            base_model=hub_id(self._base_model_name()),
            is_adapter=self._peft_config() is not None,
            trainer_name=self._name,
            trainer_paper=_trl_paper(self),
            methods=self._hf_ext_methods(),
            recipe=recipe,
            metrics=final_metrics(self.state.log_history),
            tags=[*self._tag_names, *([tags] if isinstance(tags, str) else tags or [])],
            dataset=hub_id(dataset_name, repo_type="datasets"),
            hub_model_id=self.hub_model_id,
            recipe_complete=self.hf_ext_recipe is not None,
            base_quantization=self._base_quantization(),
            license=license,
            language=language,
        )
        recipe_text = yaml.safe_dump(recipe, sort_keys=False)  # before opening the file: no half-written recipe
        os.makedirs(output_dir, exist_ok=True)
        card.save(os.path.join(output_dir, "README.md"))
        with open(os.path.join(output_dir, RECIPE_FILE), "w") as file:
            file.write(recipe_text)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags=None,
        license: str | None = None,
        language: str | list[str] | None = None,
        **unsupported,
    ):
        """TRL's and Transformers' hook (each checkpoint, ``push_to_hub(**kwargs)``); the base model is read from the
        model itself."""
        if unsupported:
            raise TypeError(
                f"create_model_card() got unsupported arguments {sorted(unsupported)}; hf_ext's card takes "
                "model_name, dataset_name, tags, license and language."
            )
        if self.is_world_process_zero():
            self.write_model_card(self.args.output_dir, model_name, dataset_name, tags, license, language)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # after PEFT's save_pretrained, which writes its own README.md
            self.write_model_card(output_dir or self.args.output_dir)

    def push_to_hub(self, *args, token: str | None = None, **kwargs):
        require_hub_token(token or self.args.hub_token, "trainer.push_to_hub()")
        return super().push_to_hub(*args, token=token, **kwargs)
