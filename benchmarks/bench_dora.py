"""hf_ext's fast DoRA (``enable_fast_dora``, factored weight norm) against PEFT's DoRA on one DoRA linear layer.

Per (d, r, base dtype) with a d x d base ``nn.Linear`` (fp32 or bf16 weights; adapters fp32 as PEFT leaves them),
256 tokens, ``lora_alpha = 2 r``, ``lora_B`` set to normal(0, 0.02) so DoRA is non-trivial, and the same adapter
weights copied into both models:
1. median forward+backward time of the layer (fast and PEFT interleaved across repeats, after a warm-up) and the
   ratio PEFT/fast (goal: on an H100 in bf16, at least 2x at r=384);
2. peak transient memory of the weight-norm computation alone: ``hf_ext.kernels.dora_norm.factored_row_norm``
   against PEFT's ``get_lora_weight`` (the dense B A, formed through an identity) plus ``get_weight_norm``
   (goal: fast below 5% of PEFT's at d=4096, r=384). On CUDA: ``torch.cuda.max_memory_allocated`` above the
   allocation before the call. On CPU (Linux): each measurement in a fresh subprocess with
   ``MALLOC_MMAP_THRESHOLD_=131072`` and 2 threads; after a warm-up call VmHWM is reset (``/proc/self/clear_refs``)
   and the transient is VmHWM after one call minus VmRSS before it;
3. max relative error of the fast layer's output against PEFT's (sanity check).

    python benchmarks/bench_dora.py                                  # CPU, d in (1024, 4096), r in (16, 64, 384)
    python benchmarks/bench_dora.py --device cuda --dims 1024 4096 8192 --repeats 20
    python benchmarks/bench_dora.py --dims 1024 --ranks 16 --repeats 3   # quick check
"""

import argparse
import json
import os
import subprocess
import sys

import peft
import torch
from peft import LoraConfig, get_peft_model
from timing import interleaved_medians_ms
from torch import nn

from hf_ext.kernels.dora_norm import factored_row_norm
from hf_ext.peft import enable_fast_dora


TOKENS = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEM_FLAG = "--_mem-child"


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


def proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mem_child(method: str, d: int, r: int, dtype_name: str) -> None:
    """Runs in a fresh process: prints the CPU transient bytes of one weight-norm call as JSON."""
    torch.set_num_threads(2)
    fast, ref = build_pair(d, r, DTYPES[dtype_name], "cpu")
    layer = (fast if method == "fast" else ref).base_model.model.proj
    del fast, ref  # the layer keeps its own parameters alive; the other model is freed
    fn = norm_fn(method, layer)
    fn()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_kib("VmRSS")
    result = fn()
    peak = proc_kib("VmHWM")
    del result
    print(json.dumps({"transient": max(0, peak - before) * 1024}))


def transient_cpu(method: str, d: int, r: int, dtype_name: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), MEM_FLAG, method, str(d), str(r), dtype_name]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["transient"]


def transient_cuda(method: str, d: int, r: int, dtype: torch.dtype) -> int:
    fast, ref = build_pair(d, r, dtype, "cuda")
    layer = (fast if method == "fast" else ref).base_model.model.proj
    fn = norm_fn(method, layer)
    fn()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result, layer, fn, fast, ref
    torch.cuda.empty_cache()
    return peak - before


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == MEM_FLAG:
        method, d, r, dtype_name = sys.argv[2:6]
        mem_child(method, int(d), int(r), dtype_name)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 384])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if args.device == "cpu" and not sys.platform.startswith("linux"):
        sys.exit("the CPU memory measurement reads /proc: Linux only")

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(f"device: {device_name}; torch {torch.__version__}; peft {peft.__version__}; tokens {TOKENS}; `{command}`")
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
                if args.device == "cuda":
                    m_fast, m_peft = (transient_cuda(m, d, r, dtype) for m in ("fast", "peft"))
                else:
                    m_fast, m_peft = (transient_cpu(m, d, r, dtype_name) for m in ("fast", "peft"))
                pct = f"{100 * m_fast / m_peft:.1f}%" if m_peft > 0 else "n/a"
                print(
                    f"| {d} | {r} | {dtype_name} | {t_fast:.2f} | {t_peft:.2f} | {t_peft / t_fast:.2f}x "
                    f"| {mib(m_fast)} | {mib(m_peft)} | {pct} | {rel_err:.2e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
