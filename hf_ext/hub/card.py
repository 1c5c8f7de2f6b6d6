"""Model cards for hf_ext runs: Hub metadata that is right for adapters, the methods with their papers and
hyper-parameters, the recipe as YAML, the final metrics and the framework versions.

What TRL's own card gets wrong, and this one does not (ecosystem spec, section 5): TRL writes
``library_name: transformers`` over PEFT's ``peft`` and drops the adapter tags; a local ``base_model`` path makes
the Hub reject the upload, so ``base_model`` is a Hub id when one is known (a name that is no local directory, or
a directory inside the Hub cache) and is left out otherwise; no ``licence`` key.
"""

import dataclasses
import enum
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..papers import Paper
from .configs import REPO_NAME


TEMPLATE = "hf_ext_model_card.md"
FRAMEWORKS = ("hf-ext", "trl", "transformers", "peft", "torch", "accelerate", "datasets", "bitsandbytes")
_REPO_ID = re.compile(rf"^{REPO_NAME}(/{REPO_NAME})?$")
_HUB_CACHE_DIR = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/")
# Never written into a recipe: where this run wrote, resumed and pushed (another run must not reuse them).
RUN_LOCAL_FIELDS = {
    "output_dir",
    "logging_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
    "hub_revision",
    "hub_always_push",
}
# Keys whose values are credentials (not tokenizer tokens such as eos_token).
SECRET_KEY = re.compile(
    r"^(token|.*(hub|access|auth|bearer|api)_token|.*api_?key|.*secret.*|.*passw(or)?d.*|.*credentials?)$",
    re.IGNORECASE,
)
_URL_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")


@dataclass
class Method:
    """One hf_ext method used in a run, as the card lists it."""

    name: str
    tag: str
    papers: tuple[Paper, ...]
    hyperparameters: dict = field(default_factory=dict)


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


def _plain(value):
    """A YAML-safe copy of a config value: enums by value, dtypes by name ("bfloat16"), dataclasses, tuples and sets
    as dicts and lists, credentials in URLs and keys that look secret dropped, anything else as its ``str``."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items() if not SECRET_KEY.search(str(key))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(item) for item in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\1", value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def given_fields(config) -> dict:
    """The init fields of dataclass instance ``config`` that differ from their defaults, YAML-ready, without
    secrets (keys like ``*token*``, URL credentials) or ``RUN_LOCAL_FIELDS``. hf_ext's training configs take this
    snapshot first thing in ``__post_init__`` (as ``given_fields``), before Transformers derives other fields."""
    given = {}
    for f in dataclasses.fields(config):
        if f.init and f.name not in RUN_LOCAL_FIELDS and not SECRET_KEY.search(f.name):
            value, default = _plain(getattr(config, f.name)), _plain(_default(f))
            if value != default and not (value is None and not default):  # parsers turn an empty default into None
                given[f.name] = value
    return given


def training_recipe(*configs) -> dict:
    """One flat recipe from ``configs`` (e.g. script, training, model and dataset arguments): the fields each was
    given; what ``hf-ext grpo --config`` needs to run the same job again."""
    recipe = {}
    for config in configs:
        snapshot = getattr(config, "given_fields", None)
        recipe.update(given_fields(config) if snapshot is None else snapshot)
    return recipe


def _versions() -> dict:
    found = {}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


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
        versions=_versions(),
        citations=list(dict.fromkeys(paper.citation for paper in papers)),
    )
