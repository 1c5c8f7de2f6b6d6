"""accelerate launch recipes (``--config_file``); shipped as ``hf_ext.accelerate_configs`` so that
``hf-ext ... --accelerate_config NAME`` finds them."""
