"""The packages whose versions describe an hf_ext run (``hf-ext env`` prints them, model cards list them)."""

from importlib.metadata import PackageNotFoundError, version


FRAMEWORKS = (
    "hf-ext",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "triton",
    "bitsandbytes",
    "huggingface_hub",
)


def installed_versions() -> dict[str, str | None]:
    """Each of ``FRAMEWORKS`` -> its installed version, or None when it is not installed."""
    found = {}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
