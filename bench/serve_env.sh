#!/usr/bin/env bash
# Runs ON the lent GPU (after call 1 of bench/gpu_run.sh): the 16-row full-context sweep of bench/serve.py once per
# MLX CUDA setting, each in its own process (MLX reads these variables once). Results in docs/performance.md (Server).
#   carry [".device/b", ".whl", ".ref"]:  bash bench/serve_env.sh
source .device/b/install.sh >/dev/null && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
for v in "X=1" "MLX_USE_CUDA_GRAPHS=0" "MLX_MAX_OPS_PER_BUFFER=100 MLX_MAX_MB_PER_BUFFER=1000" "MLX_CUDA_GRAPH_CACHE_SIZE=2048" "X=2"; do
  echo "=== $v $(date +%T)"
  env $v timeout 120 python3 bench/serve.py --device gpu --config personaplex --quantize 4 --compiled --sizes 16 --steps 40 2>&1 | grep -v "^sweep"
done 2>&1 | tee "$OUT/envsweep.txt"
