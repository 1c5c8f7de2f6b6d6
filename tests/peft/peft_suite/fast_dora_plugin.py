"""pytest plugin: run PEFT's own test suite with hf_ext's fast DoRA switched on for every DoRA config, and count it.

Load it into a pytest run of PEFT's tests with ``-p fast_dora_plugin`` (this folder on ``PYTHONPATH``). In that process
only, every ``LoraConfig`` built with ``use_dora=True`` gets, at the end of its ``__post_init__``, the custom-module
registration that ``enable_fast_dora`` puts on its copy, so PEFT dispatches its ``nn.Linear`` and ``Conv1D`` targets
to ``FastDoraLinear`` exactly as for a user who wrote ``enable_fast_dora(LoraConfig(use_dora=True, ...))``, while
the test keeps holding the config object it built. hf_ext itself patches nothing at import.

Counted, in total and per test: ``FastDoraLinear`` layers built, forwards through ``FastDoraLinearVariant`` and, for
comparison, DoRA forwards of linear layers that still went through PEFT's ``DoraLinearVariant``. With
``--fast-dora-report PATH`` the counts and every test's outcome (with the failure text) are written to ``PATH`` as
JSON at the end of the session; ``tests/peft/test_peft_dora_suite.py`` reads it. ``--peft-dora-cases`` keeps only the
DoRA cases that ``dora_cases.py`` selects.
"""

import functools
import inspect
import json
from collections import Counter
from pathlib import Path

import peft
import pytest
from peft import LoraConfig
from peft.tuners.lora.variants import DoraLinearVariant

from hf_ext.peft import FastDoraLinear, FastDoraLinearVariant, enable_fast_dora


COUNT_NAMES = ("fast_layers_built", "fast_dora_forwards", "peft_dora_linear_forwards")
FAILURE_TEXT_CHARS = 3000

_counts: Counter = Counter()
_tests: dict[str, dict] = {}
_excluded: dict[str, list[str]] = {}  # EXCLUDED key -> the collected node ids it dropped
_restore: list[tuple[type, str, object]] = []


def _counted(cls: type, name: str, count_name: str) -> None:
    """Replace ``cls.name`` (function, staticmethod or classmethod) by one that adds 1 to ``count_name`` per call
    that returns (a constructor that raises built no layer)."""
    raw = inspect.getattr_static(cls, name)
    kind = type(raw) if isinstance(raw, staticmethod | classmethod) else None
    func = raw.__func__ if kind else raw

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        result = func(*args, **kwargs)
        _counts[count_name] += 1
        return result

    _restore.append((cls, name, cls.__dict__.get(name)))
    setattr(cls, name, kind(wrapper) if kind else wrapper)


def _fast_dora_post_init(original):
    @functools.wraps(original)
    def __post_init__(self):
        original(self)
        if self.use_dora:
            # enable_fast_dora returns a registered copy; move its registration onto the config the test holds.
            self._register_custom_module(enable_fast_dora(self)._custom_modules)

    return __post_init__


def pytest_addoption(parser):
    group = parser.getgroup("fast_dora", "hf_ext fast DoRA in PEFT's test suite")
    group.addoption("--fast-dora-report", metavar="PATH", help="write fast-path counts and test outcomes as JSON")
    group.addoption("--peft-dora-cases", action="store_true", help="keep only the DoRA cases dora_cases.py selects")


def pytest_configure(config):
    _restore.append((LoraConfig, "__post_init__", LoraConfig.__dict__["__post_init__"]))
    LoraConfig.__post_init__ = _fast_dora_post_init(LoraConfig.__post_init__)
    _counted(FastDoraLinear, "__init__", "fast_layers_built")
    _counted(FastDoraLinearVariant, "forward", "fast_dora_forwards")
    _counted(DoraLinearVariant, "forward", "peft_dora_linear_forwards")


def pytest_unconfigure(config):
    while _restore:
        cls, name, original = _restore.pop()
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)


def pytest_collection_modifyitems(session, config, items):
    if not config.getoption("--peft-dora-cases"):
        return
    import dora_cases

    kept, deselected = [], []
    for item in items:
        excluded_by = dora_cases.exclusion_of(item.nodeid)
        if excluded_by is not None:
            _excluded.setdefault(excluded_by, []).append(item.nodeid)
        (kept if dora_cases.is_dora_case(item) and excluded_by is None else deselected).append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=deselected)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = Counter(_counts)
    try:
        return (yield)
    finally:
        entry = _tests.setdefault(item.nodeid, {"outcome": "not run"})
        entry.update({name: _counts[name] - before[name] for name in COUNT_NAMES})


def pytest_runtest_logreport(report):
    entry = _tests.setdefault(report.nodeid, {"outcome": "not run"})
    if report.failed:
        entry["outcome"] = "failed"
        entry["failure"] = f"[{report.when}] {report.longreprtext[-FAILURE_TEXT_CHARS:]}"
    elif entry["outcome"] == "failed":
        return
    elif report.skipped:
        entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        entry["reason"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else report.longreprtext
    elif report.when == "call":
        entry["outcome"] = "passed"


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--fast-dora-report")
    if path:
        report = {
            "peft_version": peft.__version__,
            "exitstatus": int(exitstatus),
            "totals": {name: _counts[name] for name in COUNT_NAMES},
            "tests": _tests,
            "excluded": _excluded,
        }
        Path(path).write_text(json.dumps(report, indent=1))
