"""Model-card templates (Jinja, rendered by ``hf_ext.hub.card``); shipped as ``hf_ext.model_cards``."""
