#!/usr/bin/env bash
# The checks that need a CUDA device (CI has none), in order of importance, each logged under OUT_DIR:
#   1. the unit tests marked gpu: the oracles again on the GPU, the allocation-free decode step through the CUDA
#      caching allocator, positions through the pinned buffer under a busy stream, pystream-bench --device cuda;
#   2. pystream-bench on the GPU in bfloat16: every method at 4k and 128k; the streaming caches and recompute at 1M,
#      profiled; and the same at 1M with 16 streams decoded together;
#   3. the layer-update benchmarks on CUDA (bench/test_cache_update.py -k cuda).
# Usage: bash bench/gpu_check.sh OUT_DIR [MODEL]    (MODEL: default the bundled SmolLM2-135M)
# PPL_TOKENS=0 skips the perplexity pass (for a model with random weights); PYTHON picks the interpreter.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [MODEL]}
model=${2:-smollm2-135m}
py=${PYTHON:-python3}
ppl_tokens=${PPL_TOKENS:-1536}
cd "$(dirname "$0")/.."
mkdir -p "$out"
failed=()
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import torch, transformers, pystream; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| pystream', pystream.__version__, '|', torch.cuda.get_device_name())" || exit 1

step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure and go on
  local name=$1; shift
  echo "== $name: $*"
  local started=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 4)
step gpu-tests "$py" -m pytest tests -m gpu -q -p no:cacheprovider "${parallel[@]}"

bench=("$py" -m pystream.cli --model "$model" --device cuda --dtype bfloat16 --steps 64 --warmup 8 --no-report)
step bench-cells "${bench[@]}" --lengths 4k,128k --cache-sizes 256,1024 --ppl-tokens "$ppl_tokens" \
  --out "$out/cells"
step bench-1m "${bench[@]}" --lengths 1M --methods sink,window,recompute --cache-sizes 1024,4096 \
  --ppl-tokens 0 --profile --out "$out/1m"
step bench-1m-batch16 "${bench[@]}" --lengths 1M --methods sink,window,recompute --cache-sizes 1024 --batch 16 \
  --ppl-tokens 0 --out "$out/1m-batch16"
for run in cells 1m 1m-batch16; do
  [ -f "$out/$run/results.jsonl" ] && "$py" -m pystream.report "$out/$run" >/dev/null
done

step bench-update "$py" -m pytest bench/test_cache_update.py -k cuda -q -p no:cacheprovider \
  --benchmark-columns=min,median,rounds --benchmark-json="$out/bench-update.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all passed"
