"""Where hf_ext keeps what it builds once per machine (the embedded default model, compiled CPU kernels)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """``$HF_EXT_CACHE`` when set, else ``$XDG_CACHE_HOME/hf_ext``, else ``~/.cache/hf_ext``."""
    if os.environ.get("HF_EXT_CACHE"):
        return Path(os.environ["HF_EXT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_ext"
