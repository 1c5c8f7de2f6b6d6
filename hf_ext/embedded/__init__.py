"""The embedded default: a tiny causal LM, its tokenizer and a verifiable task, all built from code.

Nothing here is downloaded. ``EMBEDDED_MODEL`` and ``EMBEDDED_TASK`` are the names the scripts accept in place
of a Hub id or local path (``--model_name_or_path`` / ``--dataset_name``).
"""

from .model import ALPHABET, EMBEDDED_MODEL, build_tiny_model, build_tokenizer, materialize_model, resolve_model
from .task import EMBEDDED_TASK, count_dataset, count_reward, count_sft_dataset


__all__ = [
    "ALPHABET",
    "EMBEDDED_MODEL",
    "EMBEDDED_TASK",
    "build_tiny_model",
    "build_tokenizer",
    "count_dataset",
    "count_reward",
    "count_sft_dataset",
    "materialize_model",
    "resolve_model",
]
