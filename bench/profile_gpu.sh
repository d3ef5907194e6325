#!/usr/bin/env bash
# Latency profile of the FULL-SIZE PersonaPlex on a GPU: the 7B LM and the released Mimi at their
# real shapes with RANDOM weights (`--model random:personaplex`, built in memory: no 16 GB download,
# no files), quantized, through the real session loop. Writes <name>.json (+ <name>.png when
# matplotlib is importable; else render it anywhere with the second command below).
#
# On the lent GPU machine (MLX CUDA install: shared/tools/README.md; needs only mlx + numpy):
#   source .device/b/install.sh && bash bench/profile_gpu.sh          # -> $OUT/h100-4bit.json (+ .png)
# Then, on the development machine (matplotlib), copy the JSON into the repo and draw the plot:
#   python -m engine.profile --from-json docs/profiles/h100-4bit.json --plot docs/profiles/h100-4bit.png
#
# Environment: PY (python3), NAME (h100-4bit), MODEL (random:personaplex), DEVICE (gpu), QUANT (4), STEPS (300), WARMUP (10), DEST (the device
# tool's $OUT if set, else docs/profiles). Extra arguments go to engine.profile. --overhead
# (on) adds 3 timer-off and 3 timer-on runs, so the stage timer's own syncs are measured on the GPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
NAME=${NAME:-h100-4bit}
QUANT=${QUANT:-4}
MODEL=${MODEL:-random:personaplex}
DEVICE=${DEVICE:-gpu}
STEPS=${STEPS:-300}
WARMUP=${WARMUP:-10}
DEST=${DEST:-${OUT:-docs/profiles}}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

plot=()
if "$PY" -c "import matplotlib" 2>/dev/null; then plot=(--plot "$DEST/$NAME.png"); fi

"$PY" -m engine.profile --model "$MODEL" --quantize "$QUANT" --device "$DEVICE" \
    --steps "$STEPS" --warmup "$WARMUP" --overhead --no-progress --json "$DEST/$NAME.json" "${plot[@]}" "$@"
