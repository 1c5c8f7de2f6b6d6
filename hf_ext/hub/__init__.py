"""Hub publishing: model cards (``card``) and recipes by local path or Hub reference (``configs``)."""
