"""4-bit AdamW (hf_ext) against torch AdamW, bitsandbytes AdamW8bit and torchao AdamW4bit, in the same run.

Three tables, each with the anchors measured beside ours:
1. optimizer state bytes per parameter on LLaMA-like 2-D shapes plus a few 1-D tensors
   (goals: <= 1.05 for hf_ext_adamw_4bit, <= 0.55 for hf_ext_adamw_4bit_factor);
2. median step time on the same parameters, as a ratio to torch AdamW (fused where the device has it) and to
   bitsandbytes AdamW8bit, all stepped in turn (goal: no slower than AdamW8bit, CPU and GPU; on CPU the 4-bit step
   is the C kernel, whose build time, its first-call cost, is reported);
3. final training loss of a short full fine-tune of the embedded default on its task, 3 seeds
   (goal: within 1% of fp32 AdamW; 25 steps, while the loss still moves, so 1% is above seed noise).

    python benchmarks/bench_optim.py [--device cuda] [--steps 200] [--out benchmarks/results/bench_optim_cpu.md]
"""

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch
from timing import timed_ms

from hf_ext.embedded import build_tiny_model, build_tokenizer, count_sft_dataset
from hf_ext.kernels import cpu_library
from hf_ext.optim import AdamW4bit, AdamW4bitFactor
from hf_ext.optim.adamw4bit import state_nbytes


def anchors(device: str) -> dict:
    """name -> optimizer factory(params, lr); anchors whose package is missing are left out with a note."""
    factories = {
        "torch AdamW" + (" (fused)" if device == "cuda" else ""): lambda p, lr: torch.optim.AdamW(
            p, lr=lr, fused=device == "cuda"
        ),
        "hf_ext_adamw_4bit": lambda p, lr: AdamW4bit(p, lr=lr),
        "hf_ext_adamw_4bit_factor": lambda p, lr: AdamW4bitFactor(p, lr=lr),
    }
    try:
        import bitsandbytes

        factories["bitsandbytes AdamW8bit"] = lambda p, lr: bitsandbytes.optim.AdamW8bit(p, lr=lr)
    except ImportError:
        print("bitsandbytes not installed: no AdamW8bit anchor")
    try:
        from torchao.optim import AdamW4bit as TorchaoAdamW4bit

        factories["torchao AdamW4bit"] = lambda p, lr: TorchaoAdamW4bit(p, lr=lr)
    except ImportError:
        print("torchao not installed: no torchao AdamW4bit anchor (pip install hf-ext[bench])")
    return factories


def llama_like_params(device: str, scale: int) -> list[torch.nn.Parameter]:
    """One decoder block's shapes at hidden size 1024 * scale / 4 (q, k, v, o, gate, up, down, 2 norms)."""
    hidden = 256 * scale
    shapes = [(hidden, hidden)] * 4 + [(4 * hidden, hidden)] * 2 + [(hidden, 4 * hidden), (hidden,), (hidden,)]
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in shapes]


def fake_gradients(params, generator):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.device) * 1e-2


def build_ms(device: str) -> float | None:
    """Milliseconds to build the 4-bit step's C kernel in an empty cache (its first-call cost), None off the CPU."""
    if device != "cpu":
        return None
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, HF_EXT_CACHE=cache):
        cpu_library.load.cache_clear()
        start = time.perf_counter()
        assert cpu_library.load("adamw4bit_step") is not None, cpu_library.load_error("adamw4bit_step")
        elapsed = (time.perf_counter() - start) * 1e3
    cpu_library.load.cache_clear()
    return elapsed


def memory_and_speed(factories: dict, device: str, scale: int, steps: int) -> list[str]:
    """State bytes and median step time of every optimizer, stepping them in turn (interleaved) on copies of the
    same parameters and gradients; returns the table's lines."""
    lines = [f"## state bytes per parameter and step time (device={device}, hidden {256 * scale}, interleaved)"]
    built = build_ms(device)
    if built is not None:
        lines.append(f"hf_ext's C kernel built in {built:.0f} ms (first call on a machine; cached afterwards)")
    lines += ["| optimizer | state B/param | step ms | vs torch AdamW | vs AdamW8bit |", "|---|---:|---:|---:|---:|"]
    runs = {}
    for name, factory in factories.items():
        params = llama_like_params(device, scale)
        runs[name] = (params, factory(params, 1e-4), torch.Generator().manual_seed(1))
    times = {name: [] for name in runs}
    for step in range(steps + 2):
        for name, (params, optimizer, generator) in runs.items():
            fake_gradients(params, generator)
            elapsed = timed_ms(optimizer.step, device)
            if step >= 2:
                times[name].append(elapsed)
    results = {}
    for name, (params, optimizer, _) in runs.items():
        numel = sum(p.numel() for p in params)
        results[name] = (state_nbytes(optimizer) / numel, statistics.median(times[name]))
    reference = next(iter(results.values()))[1]
    int8 = results.get("bitsandbytes AdamW8bit", (None, float("nan")))[1]
    for name, (bytes_per_param, ms) in results.items():
        lines.append(f"| {name} | {bytes_per_param:.3f} | {ms:.2f} | {ms / reference:.2f} | {ms / int8:.2f} |")
    return lines


def batches(tokenizer, seed: int, steps: int, batch_size: int = 32):
    data = count_sft_dataset(steps * batch_size, seed)
    texts = [p + c for p, c in zip(data["prompt"], data["completion"], strict=True)]
    ids = torch.tensor([tokenizer(t + tokenizer.eos_token).input_ids for t in texts])
    return ids.split(batch_size)


def final_loss(factory, seed: int, steps: int, device: str) -> float:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = build_tiny_model(tokenizer).to(device).train()
    optimizer = factory(list(model.parameters()), 3e-3)
    losses = []
    for ids in batches(tokenizer, seed, steps):
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return statistics.mean(losses[-10:])


def fine_tune_quality(factories: dict, device: str, steps: int, seeds: list[int]) -> list[str]:
    lines = [
        f"## full fine-tune of the embedded default, {steps} steps, final loss (mean of last 10), seeds {seeds}",
        "| optimizer | mean | per seed | vs torch AdamW |",
        "|---|---:|---|---:|",
    ]
    reference = None
    for name, factory in factories.items():
        losses = [final_loss(factory, seed, steps, device) for seed in seeds]
        mean = statistics.mean(losses)
        reference = reference or mean
        per_seed = " ".join(f"{loss:.4f}" for loss in losses)
        lines.append(f"| {name} | {mean:.4f} | {per_seed} | {mean / reference - 1:+.2%} |")
    return lines


def header(device: str) -> list[str]:
    """What ran where: command, date, machine, thread count and package versions."""
    versions = [f"torch {torch.__version__}"]
    for package in ("bitsandbytes", "torchao"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} {cpu_model()}"
    return [
        "# 4-bit AdamW vs anchors",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {device} ({machine}), {torch.get_num_threads()} threads; {', '.join(versions)}",
    ]


def cpu_model() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=int, default=4, help="hidden size = 256 * scale")
    parser.add_argument("--timed_steps", type=int, default=10)
    parser.add_argument(
        "--steps", type=int, default=25, help="fine-tune steps (few enough that the loss is still falling)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    cli = parser.parse_args()
    factories = anchors(cli.device)
    lines = header(cli.device) + [""]
    lines += memory_and_speed(factories, cli.device, cli.scale, cli.timed_steps) + [""]
    lines += fine_tune_quality(factories, cli.device, cli.steps, cli.seeds)
    print("\n".join(lines))
    if cli.out:
        with open(cli.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
