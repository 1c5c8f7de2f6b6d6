"""Which of PEFT's own tests (from the sdist of the installed PEFT) run with hf_ext's fast DoRA switched on, and why.

The one place that decides it: ``FILES`` are handed to pytest, ``is_dora_case`` keeps their DoRA cases, ``EXCLUDED``
drops the cases that cannot run here, each with its reason. ``NOT_RUN`` records the other PEFT test files that
mention DoRA and why none of their cases is run.
"""

# PEFT test file -> why it is run. Only its DoRA cases run (is_dora_case).
FILES = {
    "tests/test_custom_models.py": (
        "the bulk: PEFT's common tester (forward in fp32/fp16/bf16, training, merge/unmerge, safe merge, save/load, "
        "multiple and deleted adapters, dtype autocast, FSDP state dicts) on small in-file models for its 13 "
        "use_dora=True configs (MLP nn.Linear and transformers Conv1D targets take the fast path; Embedding and "
        "Conv1d/2d/3d targets check the fallback to PEFT's DoRA), plus multiple active DoRA adapters and mixed "
        "LoRA/DoRA batches"
    ),
    "tests/test_lora_variants.py": (
        "the DoRA variant is applied to every layer type, its parameters get gradients, and unmerge inverts merge "
        "on a fan_in_fan_out (Conv1D) layer"
    ),
    "tests/test_initialization.py": (
        "DoRA is a no-op at default init and not with init_lora_weights=False; the errors for DoRA with "
        "MultiheadAttention, megatron, AdaLoRA, lora_bias and conv groups"
    ),
    "tests/test_helpers.py": "DoraCaching on conv layers (PEFT's DoRA, reached through the fast-path factory)",
    "tests/test_riemannian_lora.py": "the Riemannian optimizer leaves the DoRA magnitude vector alone",
}

# node id (without the parameter suffix: all its parametrizations) -> why it is not run.
EXCLUDED = {
    "tests/test_custom_models.py::TestPeftCustomModel::test_gpt2_dora_merge_and_unload": (
        "loads 'gpt2' from the Hugging Face Hub"
    ),
    "tests/test_custom_models.py::TestPeftCustomModel::test_gpt2_dora_merge_and_unload_safe_merge": (
        "loads 'gpt2' from the Hugging Face Hub"
    ),
    "tests/test_custom_models.py::TestPeftCustomModel::test_dora_save_and_load_remapping": (
        "loads 'peft-internal-testing/opt-125m' from the Hugging Face Hub"
    ),
    "tests/test_helpers.py::TestDoraCaching::test_dora_caching_linear": (
        "loads 'trl-internal-testing/tiny-random-LlamaForCausalLM' from the Hub (hub_online_once turns offline mode "
        "off, so it waits on the network); it also asserts that PEFT's DoraLinearLayer._dora_cache is filled under "
        "DoraCaching, which FastDoraLinearVariant never reads or fills (outputs are unchanged; the cache is PEFT's)"
    ),
    "tests/test_helpers.py::TestDoraCaching::test_dora_caching_embedding": (
        "loads 'trl-internal-testing/tiny-random-LlamaForCausalLM' from the Hub; Embedding DoRA is PEFT's own"
    ),
}

# PEFT test files that mention DoRA and are not run at all, and why.
NOT_RUN = {
    "tests/test_common_gpu.py": "GPU only (require_non_cpu / bitsandbytes on CUDA)",
    "tests/test_gpu_examples.py": "GPU only, and loads models and data sets from the Hub",
    "tests/test_decoder_models.py": "its one DoRA case (test_lora_embed_scale_is_applied[True]) loads a Hub model",
    "tests/test_torch_compile.py": "opt-in (PEFT_DEBUG_WITH_TORCH_COMPILE=1) and loads a Hub model",
}


def _uses_dora(name: str, value) -> bool:
    if name == "use_dora":
        return value is True
    if isinstance(value, dict):
        return value.get("use_dora") is True
    return getattr(value, "use_dora", None) is True  # a config object passed as a parameter


def is_dora_case(item) -> bool:
    """A test that names DoRA, or whose parameters carry ``use_dora=True`` (config kwargs, a config, a flag)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "dora" in item.nodeid.lower() or any(_uses_dora(name, value) for name, value in params.items())


def exclusion_of(nodeid: str) -> str | None:
    """The ``EXCLUDED`` entry that covers ``nodeid`` (itself or, for a parametrized case, its function), if any."""
    for key in EXCLUDED:
        if nodeid == key or nodeid.startswith(key + "["):
            return key
    return None
