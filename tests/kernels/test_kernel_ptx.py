"""hf_ext's Triton kernels compiled for an sm_90 GPU on this CPU-only machine (Triton's bundled ptxas; a subprocess,
since this session runs the interpreter): every variant compiles, and the 4-bit step's, with the options their
launches pass (``dispatch.TWIN_ROUNDING``), hold no fma in their PTX, so a GPU rounds each op as the twin does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_ext.kernels.dispatch import triton


SCRIPT = Path(__file__).with_name("ptx_for_sm90.py")


def fma_counts(tmp_path, *flags) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(triton is None, reason="needs triton")
def test_the_kernels_compile_for_sm90_and_the_step_kernels_hold_no_fma(tmp_path):
    compiled = fma_counts(tmp_path)
    counts = compiled["step"]
    assert len(counts) == 12 and all(count == 0 for count in counts.values()), counts
    assert len(compiled["dora"]) == 11
    control = fma_counts(tmp_path, "--fusion")["step"]  # the same kernels with FP fusion on do contract
    assert all(control[name] > 0 for name in counts if "states" in name or "step" in name), control
