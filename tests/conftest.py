"""Offline before any Hugging Face import; the Triton interpreter on CPU-only machines (before triton is imported);
one private cache for the embedded model per test session; the local stand-in for the Hub's API."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch


SESSION_ENVIRONMENT = dict(os.environ)  # as the test session found it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_EXT_CACHE", tempfile.mkdtemp(prefix="hf_ext_test_cache_"))
if not torch.cuda.is_available():  # the kernels' CPU tests (tests/triton_interpreter.py); a GPU compiles them instead
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def isolated_environment():
    """Whatever a test sets in os.environ (directly or through code under test) is gone before the next test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """(endpoint, store dir) of a running tests/launched/local_hub.py, with huggingface_hub pointed at it and online
    (its constants are read at import, so they are patched here rather than set in the environment)."""
    from huggingface_hub import constants

    port_file, store = tmp_path / "port", tmp_path / "store"
    script = Path(__file__).parent / "launched" / "local_hub.py"
    server = subprocess.Popen([sys.executable, str(script), str(port_file), str(store)])
    deadline = time.time() + 30
    while not port_file.exists() or not port_file.read_text():
        assert time.time() < deadline and server.poll() is None, "the local Hub did not start"
        time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port_file.read_text()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    yield endpoint, store
    server.kill()
