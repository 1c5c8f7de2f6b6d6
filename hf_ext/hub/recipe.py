"""The recipe of a run: the config fields it was given, YAML-ready, without secrets or run-local paths.

``hf-ext grpo|sft --config recipe.yaml`` runs the same job again from it. Secrets never enter a recipe: keys that
name credentials (``SECRET_KEY``) are dropped at any depth and credentials inside URLs are cut out; the fields that
say where this run wrote, resumed and pushed (``RUN_LOCAL_FIELDS``) are left out, since another run must not reuse
them.
"""

import dataclasses
import enum
import re

import torch


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
