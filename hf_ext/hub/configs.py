"""Recipes (training YAML files) by local path, packaged name or Hub reference, for every ``--config`` of hf_ext.

A reference is one of

    path/to/recipe.yaml                       an existing local file (looked for first)
    grpo_ba                                   a recipe shipped with hf_ext (``hf_ext.recipes``, ``examples/configs/``
                                              in the repository), by name: ``packaged_recipes()`` lists them
    owner/repo:path/in/repo.yaml              a file of a Hub repo (model repo unless ``repo_type`` says otherwise)
    owner/repo@revision:path/in/repo.yaml     the same at a branch, tag or commit
    owner/repo                                the ``recipe.yaml`` an hf_ext run pushed with its model
    hf://[datasets/|spaces/]owner/repo[@revision]/path/in/repo.yaml

Hub files are fetched with ``hf_hub_download``: cached in the Hub cache and read from it in offline mode
(``HF_HUB_OFFLINE=1``); a file missing from the cache in offline mode is an error that says how to get it.
"""

import os
import re
from dataclasses import dataclass
from importlib.resources import files

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


DEFAULT_RECIPE = "recipe.yaml"
RECIPES_PACKAGE = "hf_ext.recipes"
REPO_TYPES = {"datasets": "dataset", "spaces": "space"}
REPO_NAME = r"[A-Za-z0-9][\w.-]*"  # one part of a Hub repo id (owner or name)
_REPO = rf"(?P<repo>{REPO_NAME}/{REPO_NAME})(?:@(?P<revision>[^:/]+))?"
_COLON_FORM = re.compile(rf"^{_REPO}(?::(?P<path>.+))?$")
_URI_FORM = re.compile(rf"^hf://(?:(?P<kind>datasets|spaces)/)?{_REPO}/(?P<path>.+)$")


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    repo_type: str = "model"
    revision: str | None = None

    def command(self) -> str:
        """The CLI line that downloads this file into the cache."""
        options = "" if self.repo_type == "model" else f" --repo-type {self.repo_type}"
        options += f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id} {self.filename}{options}"


def packaged_recipes() -> dict[str, str]:
    """The paths of hf_ext's shipped recipes by name (file name without ``.yaml``), sorted by name."""
    recipes = sorted(files(RECIPES_PACKAGE).iterdir(), key=lambda recipe: recipe.name)
    return {recipe.name.removesuffix(".yaml"): str(recipe) for recipe in recipes if recipe.name.endswith(".yaml")}


def parse_reference(reference: str) -> HubFile | None:
    """The Hub file a config reference names, or None for a local path or a packaged name."""
    if os.path.exists(reference):
        return None
    match = _URI_FORM.match(reference)
    if match:
        return HubFile(match["repo"], match["path"], REPO_TYPES.get(match["kind"], "model"), match["revision"])
    match = _COLON_FORM.match(reference)
    if match and (match["path"] or not reference.endswith((".yaml", ".yml"))):
        return HubFile(match["repo"], match["path"] or DEFAULT_RECIPE, "model", match["revision"])
    return None


def resolve_config(reference: str) -> str:
    """A local path to the recipe ``reference`` names (see the module docstring)."""
    hub_file = parse_reference(reference)
    if hub_file is None:
        if os.path.isfile(reference):
            return reference
        packaged = packaged_recipes()
        if reference in packaged:
            return packaged[reference]
        raise FileNotFoundError(
            f"--config {reference!r}: no such file and no packaged recipe of that name. Pass a local YAML path, a "
            f"packaged recipe name ({', '.join(packaged)}) or a Hub reference such as 'owner/repo:recipe.yaml', "
            "'owner/repo@main:configs/grpo.yaml' or 'hf://owner/repo/recipe.yaml'."
        )
    try:
        return hf_hub_download(
            hub_file.repo_id, hub_file.filename, repo_type=hub_file.repo_type, revision=hub_file.revision
        )
    except LocalEntryNotFoundError:
        where = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"--config {reference!r}: {hub_file.filename} of the {hub_file.repo_type} repo {hub_file.repo_id} is not "
            f"in the local Hub cache ({constants.HF_HUB_CACHE}) and {where}. Download it once with network access "
            f"(`{hub_file.command()}`), or pass a local path."
        ) from None
    except GatedRepoError:
        raise FileNotFoundError(
            f"--config {reference!r}: the {hub_file.repo_type} repo {hub_file.repo_id} is gated: accept its terms on "
            f"https://huggingface.co/{hub_file.repo_id} and log in (`hf auth login`)."
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"--config {reference!r}: the {hub_file.repo_type} repo {hub_file.repo_id} has no revision "
            f"{hub_file.revision!r}."
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"--config {reference!r}: no {hub_file.repo_type} repo {hub_file.repo_id} on the Hub, or it is private "
            "(log in with `hf auth login`); for a dataset or Space repo use 'hf://datasets/...' or 'hf://spaces/...'."
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"--config {reference!r}: the {hub_file.repo_type} repo {hub_file.repo_id} has no file "
            f"{hub_file.filename!r}."
        ) from None


def resolve_config_argument(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config X`` (the form TRL's parser reads) replaced by a local path."""
    resolved = list(argv)
    if "--config" in resolved[:-1]:
        index = resolved.index("--config") + 1
        resolved[index] = resolve_config(resolved[index])
    return resolved
