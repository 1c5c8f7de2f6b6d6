"""Compare GRPO loss types on the embedded task; the same as `hf-ext compare-losses` (see its module docstring)."""

from hf_ext.scripts.compare_losses import main


if __name__ == "__main__":
    main()
