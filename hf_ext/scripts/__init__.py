"""Training scripts behind `hf-ext <command>` and `examples/*.py`: `make_parser()` + `main(...)`, as in TRL."""
