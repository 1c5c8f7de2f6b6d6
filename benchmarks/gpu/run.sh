#!/usr/bin/env bash
# Everything hf_ext proves on a GPU, in one call: correctness of the Triton kernels (against their torch twins and
# fp64), then speed and memory against the anchors measured in the same run (the DoRA layer, the 4-bit step, and one
# SFT step of a random-init 0.5 B Qwen2 with each method: benchmarks/gpu/sft_step.py). Writes one report,
# gpu_<device>_<date>.md, with the device, versions, command, date and every table.
#
#   bash benchmarks/gpu/run.sh                        # on a GPU machine; the report goes to $OUT (or benchmarks/results)
#   bash benchmarks/gpu/run.sh --only correctness     # one step: correctness | speed
#   bash benchmarks/gpu/run.sh --device cpu --quick   # every step at tiny sizes, kernels under Triton's interpreter
#
# On the GPU machine, packages hf_ext needs that the image lacks travel in .gpu/ (see the developers' notes on GPU
# runs); when .gpu/install.sh is there it is run first. Exits non-zero when a correctness check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

device=cuda quick="" only="" out="${OUT:-benchmarks/results}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) quick="--quick"; shift ;;
    --only) only="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "run.sh: unknown argument $1 (--device cuda|cpu, --quick, --only correctness|speed, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$only" in ""|correctness|speed) ;; *) echo "run.sh: --only takes correctness or speed, got $only" >&2; exit 2 ;; esac

if [ "$device" = cuda ] && [ -f .gpu/install.sh ]; then
  bash .gpu/install.sh
  export PYTHONPATH="$PWD/.site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if [ "$device" = cpu ]; then
  export TRITON_INTERPRET=1  # the kernels run, interpreted, on CPU tensors
fi

name="$(python - "$device" <<'PY'
import sys, torch
if sys.argv[1] == "cuda":
    print(torch.cuda.get_device_name().replace(" ", "_").replace("/", "_"))
else:
    print("cpu")
PY
)"
mkdir -p "$out"
report="$out/gpu_${name}_$(date -u +%Y-%m-%d).md"
{
  echo "# hf_ext on ${name//_/ }"
  echo
  echo "- command: \`bash benchmarks/gpu/run.sh $*\` (device $device${quick:+, quick})"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  python - <<'PY'
import platform, torch
from importlib.metadata import PackageNotFoundError, version
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
print(f"- python {platform.python_version()}, torch {torch.__version__}, triton {v('triton')}, "
      f"transformers {v('transformers')}, peft {v('peft')}, bitsandbytes {v('bitsandbytes')}, torchao {v('torchao')}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
          f"CUDA {torch.version.cuda}")
PY
  if command -v nvidia-smi >/dev/null && [ "$device" = cuda ]; then
    echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
  fi
} > "$report"

status=0
run_step() {  # name, then the command; its output goes to the terminal and into the report
  local step="$1"; shift
  if [ -n "$only" ] && [ "$only" != "$step" ]; then return; fi
  printf '\n## %s\n\n```\n$ %s\n```\n\n' "$step" "$*" >> "$report"
  echo "::: $step: $*"
  local log; log="$(mktemp)"
  if ! "$@" > "$log" 2>&1; then status=1; fi
  grep -v -E 'Failed to load|is an Enum subclass|kernels-community' "$log" | tee -a "$report"
}

run_step correctness python benchmarks/gpu/check_kernels.py --device "$device" $quick
if [ -n "$quick" ]; then
  run_step speed python benchmarks/bench_dora.py --device "$device" --dims 64 --ranks 4 --dtypes fp32 --repeats 1 --step_ranks
  run_step speed python benchmarks/bench_optim.py --device "$device" --scale 1 --timed_steps 1 --steps 2 --seeds 0
  run_step speed python benchmarks/gpu/sft_step.py --device "$device" --quick --steps 1
else
  run_step speed python benchmarks/bench_dora.py --device "$device" --dims 4096 --ranks 16 384 --dtypes bf16
  run_step speed python benchmarks/bench_optim.py --device "$device" --decoder_1b --timed_steps 5 --seeds 0 1 2
  run_step speed python benchmarks/gpu/sft_step.py --device "$device"
fi
echo "report: $report"
exit "$status"
