"""What many tests share to run hf_ext: the repository's paths, the ``hf-ext`` command in a fresh process, and the
smallest GRPO config that trains on the embedded task (CPU, groups of 3, two groups per step)."""

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "configs" / "grpo_ba.yaml"
TINY_GRPO = dict(
    num_generations=3,
    per_device_train_batch_size=6,
    max_completion_length=6,
    use_cpu=True,
    bf16=False,
    report_to="none",
    save_strategy="no",
)


def hf_ext_command(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``hf-ext <args>`` in a fresh Python process (the installed package), its output captured."""
    command = [sys.executable, "-c", "from hf_ext.cli import main; raise SystemExit(main())", *args]
    kwargs.setdefault("timeout", 300)
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)


def tiny_grpo_config(tmp_path, config_cls=None, **overrides):
    """A GRPO config (``hf_ext.GRPOConfig`` unless ``config_cls`` is given) writing to ``tmp_path``: ``TINY_GRPO``
    with ``overrides``."""
    if config_cls is None:
        from hf_ext import GRPOConfig as config_cls
    return config_cls(output_dir=str(tmp_path), **{**TINY_GRPO, **overrides})
