"""Running a test file's Triton kernels on CPU: TRITON_INTERPRET=1 must be set before triton is first imported, so
the kernel tests (marked ``interpreted``) run in a pytest subprocess started by ``check_interpreted_tests``."""

import os
import subprocess
import sys

import pytest

from hf_ext.kernels.dispatch import triton


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    triton is None or not INTERPRETING, reason="runs in the interpreter subprocess (test_kernel_under_the_interpreter)"
)
parent_only = pytest.mark.skipif(triton is None or INTERPRETING, reason="needs triton; this is the parent process")


def check_interpreted_tests(test_file: str) -> None:
    """Run the ``interpreted`` tests of ``test_file`` under the interpreter; all must run and pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreted"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
