#!/usr/bin/env bash
# The compiled decode step on a CUDA device (issue 18), in one run that fits in 10 minutes on an H200:
#   1. the compiled-vs-eager exactness tests on the GPU (tests/test_compiled.py -k cuda: 2,000 steps, sink and
#      window, through wrap-around and re-bases, with CUDA graphs);
#   2. the paper's Figure 10, compiled: a Llama-2-7B-shaped model with random bfloat16 weights built on the device,
#      per-token latency and peak memory of sink and of sliding window with re-computation at caches 4,096 down to
#      256, and the ratio beside the paper's 22.2x (bench/fig10.py; each cell is appended to fig10.jsonl as it ends);
#   3. if time is left: SmolLM2-135M's shape through pystream-bench --compile at 4k, 128k and 1M (sink, window,
#      recompute at 1,024), profiled (ATen ops and GPU kernels per step, eager against compiled), to set beside the
#      eager figures in reports/gpu-h200/.
# Usage: bash bench/gpu_compile_check.sh OUT_DIR        (BUDGET_S: seconds for the whole run, default 540)
set -uo pipefail
out=${1:?usage: bash bench/gpu_compile_check.sh OUT_DIR}
py=${PYTHON:-python3}
budget=${BUDGET_S:-540}
cd "$(dirname "$0")/.."
mkdir -p "$out"
failed=()
export PYTHONUNBUFFERED=1
started=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'|', torch.cuda.get_device_name())" || exit 1

left() { echo $((budget - (SECONDS - started))); }
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to OUT_DIR/NAME.log, go on after a failure
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped, no time left"; failed+=("$name(skipped)"); return; fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step exactness 150 "$py" -m pytest tests/test_compiled.py -k cuda -q -p no:cacheprovider
limit=$(left); [ "$limit" -gt 330 ] && limit=330
step fig10 "$limit" "$py" bench/fig10.py --device cuda --out "$out/fig10"
step smollm2 "$(left)" "$py" -m pystream.cli --device cuda --dtype bfloat16 --compile --profile --profile-steps 4 \
  --methods sink,window,recompute --cache-sizes 1024 --lengths 4k,128k,1M --ppl-tokens 0 --steps 64 --warmup 8 \
  --no-report --out "$out/smollm2-compiled"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_compile_check: failed or cut short: ${failed[*]} (after $((SECONDS - started)) s)"
  exit 1
fi
echo "gpu_compile_check: all passed in $((SECONDS - started)) s"
