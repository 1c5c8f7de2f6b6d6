"""The package list in pyproject.toml is explicit (three packages are mapped from outside hf_ext/): every package
under hf_ext/ must be in it, and the mapped card templates, training recipes and accelerate recipes must be found as
resources. tests/test_wheel.py checks that a built wheel carries them."""

from importlib.resources import files
from pathlib import Path

import pytest


tomllib = pytest.importorskip("tomllib")  # Python 3.11+


REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "hf_ext").rglob("__init__.py")}
    mapped = set(setuptools["package-dir"])
    assert set(setuptools["packages"]) == on_disk | mapped
    for package, folder in setuptools["package-dir"].items():
        assert (REPO / folder / "__init__.py").exists(), package


def test_mapped_resources_are_found():
    assert "{{ card_data }}" in files("hf_ext.model_cards").joinpath("hf_ext_model_card.md").read_text()
    assert files("hf_ext.recipes").joinpath("grpo_ba.yaml").is_file()
    assert files("hf_ext.accelerate_configs").joinpath("__init__.py").is_file()
