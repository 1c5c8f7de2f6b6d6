"""Publishing to the Hub: the token check every push goes through, and ``push_config`` (``hf-ext push-config``),
which uploads a folder of recipes so that ``--config owner/repo:recipe.yaml`` finds them."""

import os

import yaml
from huggingface_hub import HfApi, constants, get_token

from .recipe import SECRET_KEY


RECIPE_PATTERNS = ["*.yaml", "*.yml", "*.md"]


def require_hub_token(token: str | None, action: str) -> None:
    """Raise before ``action`` talks to the Hub when it cannot: offline mode, or no token anywhere."""
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"{action} needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
            "on a machine with network access, or save locally and push later."
        )
    if not (token or get_token()):
        raise ValueError(
            f"{action} needs a Hugging Face token with write access, and none was found. Run `hf auth login`, "
            "or set the HF_TOKEN environment variable, or pass the token explicitly (hub_token=... in a training "
            "config, --token for hf-ext push-config)."
        )


def _secret_keys(value, path: str = "") -> list[str]:
    if isinstance(value, dict):
        found = [f"{path}{key}" for key in value if SECRET_KEY.search(str(key))]
        return found + [k for key, item in value.items() for k in _secret_keys(item, f"{path}{key}.")]
    if isinstance(value, list):
        return [k for item in value for k in _secret_keys(item, path)]
    return []


def _check_recipes(folder: str) -> list[str]:
    """The YAML files of ``folder`` (recursively); each must hold a mapping, with no credential in it."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"push-config: {folder!r} is not a directory of recipes.")
    recipes = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(root, name)
                with open(path) as file:
                    recipe = yaml.safe_load(file)
                if not isinstance(recipe, dict):
                    raise ValueError(f"push-config: {path} is not a YAML mapping of config fields.")
                if _secret_keys(recipe):
                    raise ValueError(
                        f"push-config: {path} holds credentials ({', '.join(_secret_keys(recipe))}); remove them "
                        "before publishing (tokens belong in HF_TOKEN or `hf auth login`, not in a recipe)."
                    )
                recipes.append(os.path.relpath(path, folder))
    if not recipes:
        raise ValueError(f"push-config: {folder!r} holds no .yaml recipe.")
    return recipes


def push_config(
    folder: str,
    repo_id: str,
    *,
    repo_type: str = "model",
    path_in_repo: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload hf_ext recipes",
):
    """Upload the recipes (``*.yaml``, ``*.yml``) and notes (``*.md``) of ``folder`` to ``repo_id``, creating the repo
    if needed. Returns the commit info; the recipes are then usable as ``--config {repo_id}:<path>``."""
    _check_recipes(folder)
    require_hub_token(token, "push-config")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision is not None:  # a new branch is created from main
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        repo_type=repo_type,
        revision=revision,
        allow_patterns=RECIPE_PATTERNS,
        commit_message=commit_message,
    )
