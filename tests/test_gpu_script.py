"""The one-call GPU proof (benchmarks/gpu/run.sh) in its CPU mode: every step runs at tiny sizes, the kernels under
Triton's interpreter, so the script a GPU session will run cannot rot between GPU runs."""

import os
import re
import subprocess

from runs import REPO


def test_cpu_quick_mode_runs_every_step_and_writes_the_report(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        "bash",
        str(REPO / "benchmarks" / "gpu" / "run.sh"),
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("gpu_cpu_*.md")
    text = report.read_text()
    checks = re.search(r"(\d+) of (\d+) checks within their bounds", text)
    assert checks is not None and checks[1] == checks[2] and int(checks[2]) > 30, text[-2000:]
    assert "- python " in text and "torch " in text and "- command: `bash benchmarks/gpu/run.sh" in text
    assert text.count("\n## speed") == 3 and "| hf_ext_adamw_4bit |" in text
    for method in ("LoRA", "fast DoRA", "ALLoRA", "torch AdamW", "hf_ext_adamw_4bit"):  # the SFT steps, finite loss
        assert re.search(rf"^\| {method} \| [\d.]+ M \| [\d.]+ \| - \| yes \|$", text, re.MULTILINE), method


def test_a_bad_step_name_is_refused(tmp_path):
    command = ["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--only", "timing", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "--only takes correctness or speed, got timing" in done.stderr
