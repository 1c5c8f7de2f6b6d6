"""Training recipes (``--config`` YAML files), shipped as ``hf_ext.recipes``: ``hf-ext grpo|sft --config NAME``
finds them by name (``hf_ext.hub.configs``)."""
