"""The accelerate configs and the composition recipes through the real `hf-ext` CLI, on 1 and 2 CPU processes
(`--accelerate_config two_process_cpu`, by name): what really ran (a probe callback in every process), the
quantized optimizer checkpoint, the adapter in vanilla PEFT; and the combinations refused before any launch."""

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import SESSION_ENVIRONMENT
from huggingface_hub import ModelCard

from hf_ext.cli import main, resolve_accelerate_config


REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"
PROBE = REPO / "tests" / "launched" / "probe"
sys.path.insert(0, str(REPO / "tests" / "launched"))
from multiproc import free_port  # noqa: E402


STEPS = 4
NUM_ADAPTER_LAYERS = 14  # 7 target modules x 2 decoder layers of the embedded model
COMPOSITIONS = {
    "grpo_gtpo_dora_4bit": {
        "command": "grpo",
        "loss_type": "gtpo",
        "metric_prefix": "gtpo",
        "layer": "hf_ext.peft.dora.FastDoraLinear",
        "variant": "FastDoraLinearVariant",
        "params_per_layer": 3,  # A, B and the DoRA magnitude (fp32 states: at most 128 elements)
        "use_dora": True,
        "card_tags": {"hf_ext", "grpo", "gtpo", "dora", "hf_ext_adamw_4bit", "lora"},
        "card_papers": ("2508.03772", "2402.09353", "2603.22276", "2309.01507"),
    },
    "sft_allora_4bit": {
        "command": "sft",
        "loss_type": "nll",
        "metric_prefix": None,
        "layer": "hf_ext.peft.allora.ALLoRALinear",
        "variant": "ALLoRALinearVariant",
        "params_per_layer": 2,
        "use_dora": False,
        "card_tags": {"hf_ext", "sft", "allora", "hf_ext_adamw_4bit", "lora"},
        "card_papers": ("2410.09692", "2309.01507"),
    },
}


def run_recipe(name: str, out: Path, *extra: str) -> list[dict]:
    """`hf-ext COMMAND --config NAME.yaml` in a subprocess with the probe; returns each rank's probe record."""
    probe_dir = out / "probe"
    probe_dir.mkdir(parents=True)
    python_path = os.pathsep.join(filter(None, [str(PROBE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "HF_EXT_PROBE_DIR": str(probe_dir)}
    command = [sys.executable, "-m", "hf_ext.cli", COMPOSITIONS[name]["command"], "--config", f"{CONFIGS / name}.yaml"]
    command += ["--output_dir", str(out / "run"), "--max_steps", str(STEPS), "--save_strategy", "steps"]
    command += ["--save_steps", str(STEPS), *extra]
    log = out / "run.log"
    with open(log, "w") as handle:
        result = subprocess.run(
            command, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, timeout=240
        )
    assert result.returncode == 0, log.read_text()[-3000:]
    return [json.loads(path.read_text()) for path in sorted(probe_dir.glob("rank*.json"))]


def check_adapter_in_vanilla_peft(run_dir: Path, use_dora: bool) -> None:
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from hf_ext.embedded import materialize_model

    assert json.loads((run_dir / "adapter_config.json").read_text())["use_dora"] is use_dora
    base = AutoModelForCausalLM.from_pretrained(materialize_model())
    inputs = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        base_logits = base(inputs).logits
        model = PeftModel.from_pretrained(base, run_dir)
        adapted_logits = model(inputs).logits
    layers = [m for m in model.modules() if hasattr(m, "lora_variant")]
    assert len(layers) == NUM_ADAPTER_LAYERS and {type(m) for m in layers} == {LoraLinear}
    variants = {type(v).__name__ for m in layers for v in m.lora_variant.values()}
    assert variants == ({"DoraLinearVariant"} if use_dora else set())
    assert (adapted_logits - base_logits).abs().max() > 1e-4  # the trained adapter is applied


@pytest.mark.multiproc
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_composition_recipe_runs_what_it_says(tmp_path, name, processes):
    expected = COMPOSITIONS[name]
    extra = (
        ["--accelerate_config", "two_process_cpu", "--main_process_port", str(free_port())] if processes == 2 else []
    )
    records = run_recipe(name, tmp_path, *extra)

    assert len(records) == processes and {r["world_size"] for r in records} == {processes}
    for record in records:
        assert record["loss_type"] == expected["loss_type"]
        if expected["metric_prefix"]:
            assert expected["metric_prefix"] in record["metric_prefixes"]  # logged by hf_ext's loss code
        assert record["layer_classes"] == [expected["layer"]] and record["variant_classes"] == [expected["variant"]]
        assert record["num_adapter_layers"] == NUM_ADAPTER_LAYERS
        assert record["optimizer"] == "AdamW4bit"
        assert record["num_states"] == expected["params_per_layer"] * NUM_ADAPTER_LAYERS
        assert record["uint8_states"] == 2 * NUM_ADAPTER_LAYERS  # every LoRA A and B has 4-bit codes

    run_dir = tmp_path / "run"
    saved = torch.load(run_dir / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)["state"].values()
    assert sum(s.get("exp_avg_codes", torch.empty(0)).dtype == torch.uint8 for s in saved) == 2 * NUM_ADAPTER_LAYERS
    check_adapter_in_vanilla_peft(run_dir, expected["use_dora"])
    card = ModelCard.load(run_dir / "README.md")  # the card names every method of the composition
    assert card.data.library_name == "peft" and expected["card_tags"] <= set(card.data.tags)
    assert all(f"arXiv {arxiv_id}" in card.text for arxiv_id in expected["card_papers"])


@pytest.fixture
def no_launch(monkeypatch):
    """Records what `hf-ext` would hand to `accelerate launch` instead of launching."""
    from hf_ext.scripts import accelerate_compat

    launched = []
    monkeypatch.setattr(accelerate_compat, "launch_command", launched.append)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    return launched


def test_accelerate_config_names_resolve_to_hf_ext_then_trl(tmp_path):
    assert Path(resolve_accelerate_config("zero3")) == files("hf_ext.accelerate_configs") / "zero3.yaml"
    assert Path(resolve_accelerate_config("fsdp1")) == files("trl.accelerate_configs") / "fsdp1.yaml"
    path = tmp_path / "zero3"
    path.write_text("distributed_type: 'NO'\n")
    assert resolve_accelerate_config(str(path)) == str(path)  # an existing file wins over a name


def test_unknown_accelerate_config_lists_the_names(no_launch):
    argv = ["grpo", "--config", str(CONFIGS / "grpo_gtpo_dora_4bit.yaml"), "--accelerate_config", "no_such_name"]
    with pytest.raises(ValueError, match="'no_such_name' is neither a file nor a packaged config") as error:
        main(argv)
    assert "hf_ext's: fsdp2, multi_gpu, single_process, two_process_cpu, zero2, zero3;" in str(error.value)
    assert "TRL's: fsdp1," in str(error.value)
    assert not no_launch


def test_two_process_cpu_config_reaches_the_ranks_as_cpu(no_launch):
    main(["sft", "--config", str(CONFIGS / "sft_allora_4bit.yaml"), "--accelerate_config", "two_process_cpu"])
    (args,) = no_launch
    assert Path(args.config_file) == files("hf_ext.accelerate_configs") / "two_process_cpu.yaml"
    assert args.training_script.endswith("sft.py") and "--accelerate_config" not in args.training_script_args
    assert os.environ["ACCELERATE_USE_CPU"] == "true"  # accelerate's multi-GPU launcher drops the file's use_cpu


def test_the_exported_cpu_switch_does_not_outlive_its_test():
    """Runs right after the test above (file order): ACCELERATE_USE_CPU is back to its value at session start, so
    later tests (on a GPU host: every one) are not silently moved to the CPU."""
    assert os.environ.get("ACCELERATE_USE_CPU") == SESSION_ENVIRONMENT.get("ACCELERATE_USE_CPU")


def test_allora_with_dora_is_refused_before_launch_and_model_loading(no_launch, monkeypatch):
    import hf_ext.scripts.common
    from hf_ext.scripts.sft import run

    monkeypatch.setattr(hf_ext.scripts.common, "model_and_init_kwargs", lambda *a: pytest.fail("model loaded"))
    argv = ["--config", str(CONFIGS / "sft_allora_4bit.yaml"), "--use_dora", "true"]
    for call in (lambda: main(["sft", *argv]), lambda: run(argv)):
        with pytest.raises(ValueError, match="use_allora conflicts with use_dora: ALLoRA with DoRA is not defined"):
            call()
    assert not no_launch


@pytest.mark.parametrize(("optim", "refused"), [("hf_ext_adamw_4bit", True), ("adamw_torch", False)])
def test_hf_ext_optimizer_under_a_deepspeed_optimizer_block_is_refused(tmp_path, no_launch, optim, refused):
    deepspeed_file = tmp_path / "ds.json"
    deepspeed_file.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}))
    accelerate_file = tmp_path / "zero2_own_optimizer.yaml"
    accelerate_file.write_text(
        "distributed_type: DEEPSPEED\nnum_processes: 2\n"
        f"deepspeed_config:\n  zero_stage: 2\n  deepspeed_config_file: {deepspeed_file}\n"
    )
    argv = ["grpo", "--config", str(CONFIGS / "grpo_gtpo_dora_4bit.yaml"), "--optim", optim]
    argv += ["--accelerate_config", str(accelerate_file)]
    if refused:
        with pytest.raises(ValueError, match=r"optim='hf_ext_adamw_4bit' conflicts with the DeepSpeed config's"):
            main(argv)
        assert not no_launch
    else:
        main(argv)
        assert no_launch[0].config_file == str(accelerate_file)


@pytest.mark.parametrize("optim", ["hf_ext_adamw_4bit", "hf_ext_adamw_4bit_factor", "adamw_torch"])
def test_fsdp2_recipe_launches_every_optimizer(no_launch, optim):
    """The 4-bit optimizers shard their states with FSDP2's DTensor parameters (tests/distributed): not refused."""
    argv = ["sft", "--config", str(CONFIGS / "sft_allora_4bit.yaml"), "--optim", optim, "--accelerate_config", "fsdp2"]
    main(argv)
    assert no_launch[0].config_file.endswith("fsdp2.yaml")
