"""One SFT training step of a random-init Qwen2 of about 0.5 B parameters with each of hf_ext's training methods.

A step is the causal-LM loss on a batch of token ids, backward and the optimizer step (what SFTTrainer's step does,
without data loading). Methods: fast DoRA and ALLoRA adapters (r = 16 on all seven projections, torch AdamW on the
adapter) beside plain LoRA, and a full fine-tune with hf_ext's 4-bit AdamW beside torch AdamW (fused on CUDA).
Printed: trainable parameters, median step time after warm-up, peak memory (CUDA), and whether the loss is finite.

    python benchmarks/gpu/sft_step.py --device cuda [--quick]

``--quick`` builds a tiny model instead (the CPU mode of benchmarks/gpu/run.sh, so the script cannot rot).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (timing)
from timing import timed_ms  # noqa: E402

from hf_ext.optim import AdamW4bit  # noqa: E402
from hf_ext.peft import enable_allora, enable_fast_dora  # noqa: E402


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN2_0_5B = dict(  # Qwen2-0.5B's shape: 494 M parameters, tied embeddings
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip


def build(method: str, shape: dict, dtype: torch.dtype, device: str):
    """(model, optimizer) for ``method``: "fast DoRA", "ALLoRA", "LoRA", "hf_ext_adamw_4bit" or "torch AdamW"."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(dtype)
    if method in ("fast DoRA", "ALLoRA", "LoRA"):
        r = 16
        config = LoraConfig(r=r, lora_alpha=r if method == "ALLoRA" else 2 * r, lora_dropout=0.0,
                            use_dora=method == "fast DoRA", target_modules=TARGETS)  # fmt: skip
        config = {"fast DoRA": enable_fast_dora, "ALLoRA": enable_allora}.get(method, lambda c: c)(config)
        model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method == "hf_ext_adamw_4bit":
        return model, AdamW4bit(trainable, lr=1e-5)
    return model, torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")


def measure(method: str, shape: dict, dtype: torch.dtype, device: str, batch: tuple, steps: int) -> str:
    model, optimizer = build(method, shape, dtype, device)
    ids = torch.randint(0, shape["vocab_size"], batch, generator=torch.Generator().manual_seed(1)).to(device)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed_ms(step, device) for _ in range(steps + 2)][2:]  # 2 warm-up steps (compilation, first states)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device == "cuda" else "-"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    finite = "yes" if all(torch.isfinite(loss).item() for loss in losses) else "NO"
    return f"| {method} | {trainable / 1e6:.2f} M | {statistics.median(times):.1f} | {peak} | {finite} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model (CPU mode)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 2 warm-up steps")
    args = parser.parse_args()
    shape, batch = (TINY, (2, 16)) if args.quick else (QWEN2_0_5B, (4, 512))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    params = sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**TINY)).parameters()) if args.quick else 494e6
    print(f"Qwen2 random init, {params / 1e6:.1f} M parameters, {dtype}, batch {batch}, device {args.device}")
    print("| method | trainable | step ms | peak GiB | finite loss |\n|---|---:|---:|---:|---|")
    rows = []
    for method in ("LoRA", "fast DoRA", "ALLoRA", "torch AdamW", "hf_ext_adamw_4bit"):
        try:  # one method failing on a GPU must not hide the others' rows
            rows.append(measure(method, shape, dtype, args.device, batch, args.steps))  # the model is freed on return
        except Exception as error:  # noqa: BLE001 - reported in the table, and the exit status says it failed
            rows.append(f"| {method} | failed: {type(error).__name__}: {str(error)[:200]} | | | NO |")
        print(rows[-1], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0 if all(row.endswith("| yes |") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
