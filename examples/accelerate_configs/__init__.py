"""accelerate launch recipes (``--config_file``), shipped as ``hf_ext.accelerate_configs``: ``hf-ext grpo|sft
--accelerate_config NAME`` finds them by name."""
