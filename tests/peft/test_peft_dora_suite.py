"""PEFT's own DoRA test cases pass with hf_ext's fast DoRA switched on for every DoRA config.

The tests come from the sdist of the installed PEFT version (pip-downloaded from PyPI into the hf_ext cache once, never
copied into this repository) and run in a pytest subprocess with ``tests/peft/peft_suite/fast_dora_plugin.py``, which
gives every ``LoraConfig(use_dora=True)`` the ``enable_fast_dora`` registration and counts what went through the
fast path. ``tests/peft/peft_suite/dora_cases.py`` says which files and cases run and why the others do not.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path, PurePosixPath

import peft
import pytest

from hf_ext.cache import cache_root


SUITE_DIR = Path(__file__).parent / "peft_suite"
MIN_PASSED = 600  # floor on the PEFT DoRA cases that pass (PEFT itself skips some: merging grouped convs, ...)
MIN_FAST_CASES = 100  # floor on passed cases with at least one forward through FastDoraLinearVariant
MIN_FAST_SHARE = 0.9  # of the DoRA forwards of linear layers
SUITE_TIMEOUT_S = 540
PEFT_TEST_IMPORTS = ("diffusers", "scipy", "attr")  # what the selected PEFT files import beyond hf_ext's deps
FAILURES_SHOWN = 15


def _load_dora_cases():
    spec = importlib.util.spec_from_file_location("dora_cases", SUITE_DIR / "dora_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dora_cases = _load_dora_cases()


def cache_dir() -> Path:
    return cache_root() / "peft-sdist"


def peft_sdist(version: str) -> Path:
    """The cached ``peft-<version>.tar.gz``, downloaded from PyPI with pip when missing (a failure if impossible: the
    suite is a test that must run, not one to skip)."""
    sdist = cache_dir() / f"peft-{version}.tar.gz"
    if sdist.exists():
        return sdist
    sdist.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sdist.parent) as download_dir:
        command = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:", "--no-deps"]
        done = subprocess.run([*command, "-d", download_dir], capture_output=True, text=True, timeout=300)
        downloaded = Path(download_dir) / sdist.name
        if done.returncode != 0 or not downloaded.exists():
            pytest.fail(
                f"could not download the peft=={version} sdist from PyPI (`{' '.join(command)}` exited "
                f"{done.returncode}): {(done.stderr or done.stdout)[-800:]}"
            )
        downloaded.replace(sdist)
    return sdist


def peft_tests_root(version: str) -> Path:
    """A folder with the sdist's ``tests/`` as a package.

    The sdist lacks ``tests/__init__.py`` and its test files import each other relatively.
    """
    root = cache_dir() / f"peft-{version}-tests"
    if (root / "tests" / "__init__.py").exists():
        return root
    sdist = peft_sdist(version)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + "."))
    with tarfile.open(sdist) as tar:
        pkg_info = tar.extractfile(f"peft-{version}/PKG-INFO").read().decode()
        sdist_version = next(
            line.split(":", 1)[1].strip() for line in pkg_info.splitlines() if line.startswith("Version:")
        )
        assert sdist_version == version, f"{sdist} holds peft {sdist_version}, the installed peft is {version}"
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            if member.isfile() and parts[1:2] == ("tests",) and ".." not in parts:
                target = staging.joinpath(*parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    (staging / "tests" / "__init__.py").touch()
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


def run_with_plugin(root: Path, args: list[str], report_path: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """pytest ``args`` in ``root`` with the fast-DoRA plugin; the plugin's JSON report and the finished process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUITE_DIR), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "pytest", *args,
        "-c", str(SUITE_DIR / "pytest.ini"), "--rootdir", str(root), "-p", "no:cacheprovider",
        "-p", "fast_dora_plugin", "--fast-dora-report", str(report_path), "-q", "-rfE",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)
    assert report_path.exists(), f"the plugin wrote no report; pytest exited {done.returncode}:\n{done.stdout[-4000:]}"
    return json.loads(report_path.read_text()), done


@pytest.fixture(scope="module")
def peft_dora_run(tmp_path_factory):
    missing = [name for name in PEFT_TEST_IMPORTS if importlib.util.find_spec(name) is None]
    assert not missing, (
        f"PEFT's tests import {missing}, which are missing; install the test extra: pip install -e '.[test]'"
    )
    root = peft_tests_root(peft.__version__)
    return run_with_plugin(root, [*dora_cases.FILES, "--peft-dora-cases"], tmp_path_factory.mktemp("peft") / "r.json")


def test_peft_dora_cases_pass_with_fast_dora(peft_dora_run):
    report, done = peft_dora_run
    tests = report["tests"]
    failed = {nodeid: t for nodeid, t in tests.items() if t["outcome"] == "failed"}
    shown = "\n\n".join(f"{nodeid}\n{t['failure'][-1200:]}" for nodeid, t in list(failed.items())[:FAILURES_SHOWN])
    assert not failed, f"{len(failed)} of PEFT's DoRA cases failed with fast DoRA on:\n\n{shown}"
    assert done.returncode == 0 and report["exitstatus"] == 0, (
        f"pytest exited {done.returncode}:\n{done.stdout[-4000:]}"
    )
    assert report["peft_version"] == peft.__version__

    passed = [nodeid for nodeid, t in tests.items() if t["outcome"] == "passed"]
    fast_cases = [nodeid for nodeid in passed if tests[nodeid]["fast_dora_forwards"] > 0]
    totals = report["totals"]
    assert len(passed) >= MIN_PASSED, (
        f"only {len(passed)} PEFT DoRA cases passed (floor {MIN_PASSED}):\n{done.stdout[-2000:]}"
    )
    assert totals["fast_layers_built"] > 0 and totals["fast_dora_forwards"] > 0, f"fast path not exercised: {totals}"
    # nearly every DoRA forward of a linear layer goes through the fast path; the rest are
    # DoRA adapters added to a layer that a plain LoRA adapter had already made a PEFT lora.Linear
    linear_forwards = totals["fast_dora_forwards"] + totals["peft_dora_linear_forwards"]
    assert totals["fast_dora_forwards"] >= MIN_FAST_SHARE * linear_forwards, f"fast path bypassed: {totals}"
    assert len(fast_cases) >= MIN_FAST_CASES, (
        f"only {len(fast_cases)} passed cases ran a forward through FastDoraLinearVariant (floor {MIN_FAST_CASES}); "
        f"totals {totals}"
    )


def test_every_exclusion_still_names_a_peft_case(peft_dora_run):
    report, _ = peft_dora_run
    stale = sorted(set(dora_cases.EXCLUDED) - set(report["excluded"]))
    assert not stale, (
        f"EXCLUDED in tests/peft/peft_suite/dora_cases.py names cases PEFT {peft.__version__} lacks: {stale}"
    )


SYNTHETIC_TESTS = """
import pytest

from hf_ext.cache import cache_root
import torch
from peft import LoraConfig, get_peft_model
from torch import nn


def test_linear_dora():
    config = LoraConfig(target_modules=["0", "1"], use_dora=True)
    model = get_peft_model(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), config)
    model(torch.randn(3, 4))
    model(torch.randn(3, 4))


def test_conv_dora_uses_peft():
    model = get_peft_model(nn.Sequential(nn.Conv2d(2, 4, 3)), LoraConfig(target_modules=["0"], use_dora=True))
    model(torch.randn(1, 2, 5, 5))


@pytest.mark.parametrize("config_kwargs", [{"use_dora": True}, {"use_dora": False}])
def test_by_config(config_kwargs):
    model = get_peft_model(nn.Sequential(nn.Linear(4, 6)), LoraConfig(target_modules=["0"], **config_kwargs))
    model(torch.randn(3, 4))


def test_plain_lora():
    get_peft_model(nn.Sequential(nn.Linear(4, 6)), LoraConfig(target_modules=["0"]))


def test_dora_failure_is_reported():
    assert 1 == 2, "a deliberate failure"
"""


def test_plugin_counts_fast_path_per_case_and_reports_failures(tmp_path):
    (tmp_path / "test_synthetic.py").write_text(textwrap.dedent(SYNTHETIC_TESTS))
    report, done = run_with_plugin(tmp_path, ["test_synthetic.py", "--peft-dora-cases"], tmp_path / "r.json")
    tests = {nodeid.split("::", 1)[1]: t for nodeid, t in report["tests"].items()}

    assert sorted(tests) == [
        "test_by_config[config_kwargs0]", "test_conv_dora_uses_peft", "test_dora_failure_is_reported",
        "test_linear_dora",
    ]  # fmt: skip
    assert done.returncode == 1 and report["exitstatus"] == 1
    assert tests["test_dora_failure_is_reported"]["outcome"] == "failed"
    assert "a deliberate failure" in tests["test_dora_failure_is_reported"]["failure"]
    counts = {name: (t["fast_layers_built"], t["fast_dora_forwards"]) for name, t in tests.items()}
    assert counts == {
        "test_linear_dora": (2, 4),  # two layers, two forwards each
        "test_by_config[config_kwargs0]": (1, 1),
        "test_conv_dora_uses_peft": (0, 0),  # Conv2d falls back to PEFT's DoRA
        "test_dora_failure_is_reported": (0, 0),
    }
    assert report["totals"] == {"fast_layers_built": 3, "fast_dora_forwards": 5, "peft_dora_linear_forwards": 0}
