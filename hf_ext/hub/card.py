"""Rendering of the model card of an hf_ext run: Hub metadata that is right for adapters, the methods with their
papers and hyper-parameters (each method builds its own ``Method`` record), the recipe as YAML, the final metrics and
the framework versions. What goes into a recipe is decided in ``hf_ext.hub.recipe``.

Where this card differs from TRL's: an adapter keeps PEFT's ``library_name: peft`` and its adapter tags (TRL writes
``transformers`` over it); ``base_model`` is a Hub id when one is known (a name that is no local directory, or a
directory inside the Hub cache) and is left out otherwise, since the Hub rejects a local path; there is no
``licence`` key.
"""

import os
import re
from importlib.resources import files

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..papers import Method, Paper
from ..versions import installed_versions
from .configs import REPO_NAME


TEMPLATE = "hf_ext_model_card.md"
_REPO_ID = re.compile(rf"^{REPO_NAME}(/{REPO_NAME})?$")
_HUB_CACHE_DIR = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/")


def hub_id(name_or_path: str | None, repo_type: str = "models") -> str | None:
    """The Hub id behind a model or dataset reference, or None when it is local only.

    A Hub cache snapshot directory (``.../models--org--name/snapshots/<sha>``) maps back to ``org/name``; any other
    existing path, a ``scheme:`` name such as ``embedded:tiny-qwen2`` or a malformed id gives None.
    """
    if not name_or_path:
        return None
    if os.path.exists(name_or_path):
        cached = _HUB_CACHE_DIR.search(os.path.abspath(name_or_path))
        return f"{cached[2]}/{cached[3]}" if cached and cached[1] == repo_type else None
    return name_or_path if _REPO_ID.match(name_or_path) else None


def _format_metric(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def final_metrics(log_history: list[dict]) -> dict:
    """The last logged value of every numeric metric of a run (``Trainer.state.log_history``)."""
    metrics = {}
    for entry in log_history:
        metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return dict(sorted(metrics.items()))


def render_model_card(
    *,
    model_name: str,
    base_model: str | None,
    is_adapter: bool,
    trainer_name: str,
    trainer_paper: Paper | None,
    methods: list[Method],
    recipe: dict,
    metrics: dict,
    tags: list[str],
    dataset: str | None = None,
    hub_model_id: str | None = None,
    recipe_complete: bool = True,
    base_quantization: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
) -> ModelCard:
    """The card of one run. ``base_model`` and ``dataset`` must be Hub ids (see ``hub_id``) or None;
    ``recipe_complete``: the recipe re-runs the job (the scripts' full recipe), not just its training arguments;
    ``base_quantization``: how the base model was loaded, e.g. "bitsandbytes 4-bit (nf4)"."""
    base_tags = ["hf_ext", *tags, *(method.tag for method in methods)]
    if is_adapter:
        base_tags += ["lora"] + ([f"base_model:adapter:{base_model}"] if base_model else [])
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if is_adapter and base_model else None,
        datasets=[dataset] if dataset else None,
        language=language,
        license=license,
        library_name="peft" if is_adapter else "transformers",
        model_name=model_name,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*base_tags, "generated_from_trainer"])),
    )
    papers = [paper for method in methods for paper in method.papers]
    if trainer_paper is not None:
        papers.append(trainer_paper)
    return ModelCard.from_template(
        card_data,
        template_str=files("hf_ext.model_cards").joinpath(TEMPLATE).read_text(),
        model_name=model_name,
        repo_id=hub_model_id or model_name,
        base_model=base_model,
        dataset=dataset,
        is_adapter=is_adapter,
        trainer_name=trainer_name,
        methods=methods,
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        recipe_complete=recipe_complete,
        base_quantization=base_quantization,
        metrics={key: _format_metric(value) for key, value in metrics.items()},
        versions={name: found for name, found in installed_versions().items() if found},
        citations=list(dict.fromkeys(paper.citation for paper in papers)),
    )
