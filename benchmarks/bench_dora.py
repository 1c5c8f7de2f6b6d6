"""hf_ext's fast DoRA (``enable_fast_dora``, factored weight norm) against PEFT's DoRA on one DoRA linear layer.

Per (d, r, base dtype) with a d x d base ``nn.Linear`` (fp32 or bf16 weights; adapters fp32 as PEFT leaves them),
256 tokens, ``lora_alpha = 2 r``, ``lora_B`` set to normal(0, 0.02) so DoRA is non-trivial, and the same adapter
weights copied into both models:
1. median forward+backward time of the layer (fast and PEFT interleaved across repeats, after a warm-up) and the
   ratio PEFT/fast (goal: on an H100 in bf16, at least 2x at r=384);
2. peak transient memory of the weight-norm computation alone: ``hf_ext.kernels.dora_norm.factored_row_norm``
   against PEFT's ``get_lora_weight`` (the dense B A, formed through an identity) plus ``get_weight_norm``
   (goal: fast below 5% of PEFT's at d=4096, r=384), measured after a warm-up call by ``peak_memory``: on CUDA
   the allocator's peak above the allocation before the call, on CPU (Linux) the peak resident-set growth, each
   measurement in a fresh subprocess with 2 threads;
3. max relative error of the fast layer's output against PEFT's (sanity check);
4. a small model step (``--step_ranks``): a Qwen2 (hidden 1024, 2 layers) with DoRA on all seven linears, one
   training step (forward, loss, backward, AdamW) on 4 x 128 tokens: median time, fast DoRA, PEFT's DoRA and plain
   LoRA interleaved (LoRA is the floor: DoRA adds row work to it), and the step's peak memory above the allocation
   before it (CUDA) or its peak-RSS growth in a fresh process (CPU), for the two DoRAs.

    python benchmarks/bench_dora.py                                  # CPU, d in (1024, 4096), r in (16, 64, 384)
    python benchmarks/bench_dora.py --device cuda --dims 1024 4096 8192 --repeats 20
    python benchmarks/bench_dora.py --dims 1024 --ranks 16 --repeats 3   # quick check
"""

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys

import peft
import torch
from peak_memory import FRESH_PROCESS_ENV, cpu_transient_bytes, cuda_transient_bytes
from peft import LoraConfig, get_peft_model
from timing import interleaved_medians_ms
from torch import nn

from hf_ext.kernels.dora_norm import factored_row_norm
from hf_ext.peft import enable_fast_dora


TOKENS = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHILD_FLAG = "--_memory-child"
STEP_BATCH = (4, 128)  # sequences x tokens of the small-model step
SMALL_MODEL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class OneLayer(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def build_pair(d: int, r: int, dtype: torch.dtype, device: str):
    """(fast model, PEFT model) with the same base weight and adapter weights (B ~ normal(0, 0.02))."""
    torch.manual_seed(0)
    base = OneLayer(d, dtype)
    models = []
    for fast in (True, False):
        config = LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, lora_dropout=0.0, target_modules=["proj"])
        model = OneLayer(d, dtype)
        model.load_state_dict(base.state_dict())
        model = get_peft_model(model, enable_fast_dora(config) if fast else config).to(device)
        models.append(model)
    fast_layer, peft_layer = (m.base_model.model.proj for m in models)
    with torch.no_grad():
        torch.nn.init.normal_(fast_layer.lora_B["default"].weight, std=0.02)
        for name in ("lora_A", "lora_B"):
            getattr(peft_layer, name)["default"].weight.copy_(getattr(fast_layer, name)["default"].weight)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(fast_layer.lora_magnitude_vector["default"].weight)
    return models


def build_small_model(method: str, r: int, dtype: torch.dtype, device: str):
    """A small Qwen2 (hidden 1024, 2 layers) with an adapter on all seven linear projections, and AdamW on the
    adapter: ``method`` "fast" (fast DoRA), "peft" (PEFT's DoRA) or "lora" (plain LoRA, the floor DoRA adds to)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).to(dtype)
    lora = LoraConfig(
        r=r, lora_alpha=2 * r, use_dora=method != "lora", target_modules=SMALL_MODEL_TARGETS, init_lora_weights=False
    )
    model = get_peft_model(model, enable_fast_dora(lora) if method == "fast" else lora).to(device)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def train_step(model, optimizer, batch) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_batch(device: str) -> torch.Tensor:
    return torch.randint(0, 4096, STEP_BATCH, generator=torch.Generator().manual_seed(2)).to(device)


def time_model_step(r: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Median step ms of the small model for each method ("fast", "peft", "lora"), interleaved."""
    built = {method: build_small_model(method, r, dtype, device) for method in ("fast", "peft", "lora")}
    batch = step_batch(device)
    steps = {method: functools.partial(train_step, *built[method], batch) for method in built}
    return interleaved_medians_ms(steps, device, repeats, warmup=2)


def fwd_bwd(model, x, grad) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.backward(grad)
    return out


def time_layer(d: int, r: int, dtype: torch.dtype, device: str, repeats: int):
    fast, ref = build_pair(d, r, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, d, generator=gen).to(device=device, dtype=dtype)
    grad = torch.randn(TOKENS, d, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        out_fast, out_ref = fast(x).float(), ref(x).float()
        rel_err = ((out_fast - out_ref).abs().max() / out_ref.abs().max().clamp_min(1e-12)).item()
    times = interleaved_medians_ms(
        {"fast": lambda: fwd_bwd(fast, x, grad), "peft": lambda: fwd_bwd(ref, x, grad)}, device, repeats, warmup=2
    )
    return times["fast"], times["peft"], rel_err


def norm_fn(method: str, layer):
    """A no-grad callable computing the DoRA weight norm of ``layer`` the hf_ext way or the PEFT way."""
    weight = layer.get_base_layer().weight
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    scaling = layer.scaling["default"]
    dora = layer.lora_magnitude_vector["default"]

    @torch.no_grad()
    def fast():
        return factored_row_norm(weight, lora_A.weight, lora_B.weight, scaling)

    @torch.no_grad()
    def reference():
        lora_weight = dora.get_lora_weight(lora_A, lora_B).to(weight.dtype)  # as PEFT's DoRA forward does
        return dora.get_weight_norm(weight, lora_weight, scaling)

    return fast if method == "fast" else reference


def workload(kind: str, method: str, device: str, *args):
    """The call whose transient is measured: ``"norm"``, one weight-norm call of a layer (args d, r, dtype name),
    or ``"step"``, one training step of the small model (args r, dtype name); ``method`` "fast" or "peft"."""
    if kind == "norm":
        d, r, dtype_name = args
        fast, ref = build_pair(int(d), int(r), DTYPES[dtype_name], device)
        return norm_fn(method, (fast if method == "fast" else ref).base_model.model.proj)  # holds only what it reads
    r, dtype_name = args
    model, optimizer = build_small_model(method, int(r), DTYPES[dtype_name], device)
    return functools.partial(train_step, model, optimizer, step_batch(device))


def memory_child(kind: str, method: str, *args) -> None:
    """Runs in a fresh process: prints the CPU transient bytes of one ``workload`` call as JSON."""
    torch.set_num_threads(2)
    fn = workload(kind, method, "cpu", *args)
    fn()  # warm-up
    print(json.dumps({"transient": cpu_transient_bytes(fn)}))


def transient_bytes(kind: str, method: str, device: str, *args) -> int:
    """Transient of one ``workload`` call after a warm-up: in this process on CUDA, in a fresh one on CPU."""
    if device == "cpu":
        cmd = [sys.executable, os.path.abspath(__file__), CHILD_FLAG, kind, method, *map(str, args)]
        env = dict(os.environ, **FRESH_PROCESS_ENV)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])["transient"]
    fn = workload(kind, method, device, *args)
    fn()  # warm-up
    transient = cuda_transient_bytes(fn)
    del fn
    torch.cuda.empty_cache()
    return transient


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        memory_child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 384])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--step_ranks", type=int, nargs="*", default=[16, 64], help="ranks of the small-model step")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if args.device == "cpu" and not sys.platform.startswith("linux"):
        sys.exit("the CPU memory measurement reads /proc: Linux only")

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(
        f"device: {device_name}; torch {torch.__version__}; peft {peft.__version__}; tokens {TOKENS}; `{command}`; "
        f"{datetime.date.today().isoformat()}"
    )
    print()
    print(
        "| d | r | dtype | fast fwd+bwd ms | PEFT fwd+bwd ms | PEFT/fast | fast norm transient MiB "
        "| PEFT norm transient MiB | fast/PEFT transient | max rel err |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in args.dims:
        for r in args.ranks:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                t_fast, t_peft, rel_err = time_layer(d, r, dtype, args.device, args.repeats)
                m_fast, m_peft = (transient_bytes("norm", m, args.device, d, r, dtype_name) for m in ("fast", "peft"))
                pct = f"{100 * m_fast / m_peft:.1f}%" if m_peft > 0 else "n/a"
                print(
                    f"| {d} | {r} | {dtype_name} | {t_fast:.2f} | {t_peft:.2f} | {t_peft / t_fast:.2f}x "
                    f"| {mib(m_fast)} | {mib(m_peft)} | {pct} | {rel_err:.2e} |",
                    flush=True,
                )

    if not args.step_ranks:
        return
    print()
    print(f"Small model step (Qwen2, hidden 1024, 2 layers, adapters on all linears, batch {STEP_BATCH}, AdamW):")
    print()
    print(
        "| r | dtype | fast DoRA step ms | PEFT DoRA step ms | LoRA step ms | fast/LoRA | PEFT/LoRA | PEFT/fast "
        "| fast step peak MiB | PEFT step peak MiB | fast/PEFT |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in args.step_ranks:
        for dtype_name in args.dtypes:
            t = time_model_step(r, DTYPES[dtype_name], args.device, args.repeats)
            m_fast, m_peft = (transient_bytes("step", m, args.device, r, dtype_name) for m in ("fast", "peft"))
            print(
                f"| {r} | {dtype_name} | {t['fast']:.1f} | {t['peft']:.1f} | {t['lora']:.1f} "
                f"| {t['fast'] / t['lora']:.2f}x | {t['peft'] / t['lora']:.2f}x | {t['peft'] / t['fast']:.2f}x "
                f"| {mib(m_fast)} | {mib(m_peft)} | {100 * m_fast / max(m_peft, 1):.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
