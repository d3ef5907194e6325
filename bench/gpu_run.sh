#!/usr/bin/env bash
# All GPU benchmarks, run ON the lent GPU machine through the device tool (shared/tools/README.md):
#   here:   bash ../shared/tools/device-mlx-prepare.sh     (.device/a + .device/b: the MLX CUDA wheels)
#           pip download the reference's pure deps into .whl (moshi==0.2.13, einops, safetensors,
#           sentencepiece, huggingface_hub==0.36.0 and its deps, cffi, pycparser; see docs/performance.md)
#   call 1: carry [".device/a"]                 mkdir -p /root/mlxparts && cp .device/a/* /root/mlxparts/
#           (with [".device/a", ".device/ptx"] and `tar xzf .device/ptx/ptx.tgz -C /tmp` it also restores MLX's
#            NVRTC kernel cache from an earlier machine: `tar czf $OUT/ptx.tgz -C /tmp mlx` there; serve startup
#            for 16 sessions then takes ~10 s instead of ~220 s)
#   call 2: carry [".device/b", ".whl", ".ref"] STAGES="ref lm gen" bash bench/gpu_run.sh
#   call 3: same carry                          STAGES="mimi duplex profile" bash bench/gpu_run.sh
#   call 4: same carry                          STAGES="serve" bash bench/gpu_run.sh
#   server, next steps: STAGES="joins soak" STAGE_TIMEOUT=400 (bench/join_probe.py, then the 16 x 300 s soak; needs
#           the PTX cache restored in call 1, or the soak's startup alone takes ~220 s)
#   before a GPU session: `python bench/cuda_check.py` here (nvcc, no GPU) catches compile errors and register
#           counts that would not launch, without spending device time
#   batched fused kernels (the depformer one is the server's default on CUDA up to 16 rows): STAGES="rows rprobe"
#           (tests/test_fused_rows.py [ROWS_K=a,b], bench/rows_probe.py: launch shapes and time per batch size); STAGES=soak runs --fused auto (above 16 sessions that is MLX's depformer too:
#           SOAK_ARGS="--fused depformer" for the kernel at every size), SOAK_ARGS="--fused off" the MLX path;
#           STAGES=sweep: the 16-row sweep with (SWEEP_FUSED, default depformer) and without the kernels
#   ring attention kernels against MLX's attention, one layer: STAGES=rattn (bench/ring_attn.py [RATTN_ARGS])
#   fused Mimi encoder: STAGES="fmimi" (tests/test_fused_mimi.py + bench/fused_mimi.py)
#   fused LM step: STAGES="fused" (tests/test_fused.py on the GPU + bench/fused_step.py); "ref duplex" for the frame
# (libspeexdsp1's .deb from `apt-get download libspeexdsp1` goes into .whl too: the duplex stage unpacks it;
#  the servews stage (the whole websocket path, bench/serve_ws.py) needs aiohttp's cp312 wheels and libopus0's .deb)
# .ref/moshi is NVIDIA/personaplex's moshi package (git-ignored, exported from a fetched copy) for the
# PersonaPlex reference frame timing (.device/b/peers_gpu.py = shared/tools/peers_gpu.py).
# The reference imports sphn (file I/O only, unused here): .device/b/stub/sphn.py is an empty module standing in.
# The sweep of issue 16: STAGES=sweep SWEEP_SIZES=1,8,16,32,48,64 (add SWEEP_ARGS=--fresh for fresh rows), then
# bench/plot_sweep.py on the saved rows.
# A soak longer than one call (10 minutes; a call runs at most 10 minutes, startup included): STAGES=soakbg starts
# it in its own process session (it outlives the call while the machine stays warm: make the next call within
# ~30 s) and returns; then STAGES=soakwait (WAIT_S, default 560) as often as needed, back to back, until it says
# "soak finished"; its log comes back as $OUT/soakbg.log. SOAK_N, SOAK_S, SOAK_ARGS as for STAGES=soak
# (e.g. SOAK_N=64 SOAK_S=600 SOAK_ARGS="--fused auto --kv fp8").
# Every stage writes JSON lines / logs under $OUT. Ours and the reference run in the same call.
set -uo pipefail
export PYTHONUNBUFFERED=1
source .device/b/install.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
T=${STAGE_TIMEOUT:-280}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; python3 -c 'import torch, mlx.core as mx; print("torch", torch.__version__, "mlx", mx.__version__)'; } 2>&1 | tee -a "$OUT/env.txt"
for s in ${STAGES:-ref lm gen mimi duplex profile}; do
  echo "=== $s $(date +%T)"
  case $s in
    ref)     PYTHONPATH=$PWD/.ref/moshi:/tmp/site:$PWD/.device/b/stub N=100 WARM=10 timeout $T python3 .device/b/peers_gpu.py ref "$OUT/ref.jsonl" ;;
    fused)   timeout 250 python3 tests/test_fused.py ${FUSED_K:+-k $FUSED_K}
             [ "${FUSED_BENCH:-1}" = 1 ] && timeout $T python3 bench/fused_step.py --quantize ${FUSED_Q:-4} --steps 200 --json "$OUT/fused_step.jsonl" ;;
    fmimi)   timeout 250 python3 tests/test_fused_mimi.py
             timeout 150 python3 bench/fused_mimi.py --frames 300 --json "$OUT/fused_mimi.jsonl" ;;
    lm)      timeout $T python3 bench/lm_step.py --device gpu --steps 100 --warmup 10 --json "$OUT/lm_step.jsonl" ;;
    lm2)     timeout $T python3 bench/lm_step.py --device gpu --quant 8,4 --modes compiled,gen --steps 100 --warmup 10 --json "$OUT/lm_step.jsonl" ;;
    probe)   timeout 150 python3 bench/gpu_probe.py --device gpu --json "$OUT/gpu_probe.jsonl" ;;
    gen)     for q in 4 8; do timeout 120 python3 bench/gen_step.py --device gpu --config personaplex --dtype bfloat16 --quantize $q --steps 100; done ;;
    mimi)    timeout 150 python3 bench/mimi.py --device gpu --modes compiled,fixed,eager --count-ops --warmup 130 --frames 200
             timeout 100 python3 bench/mimi.py --device gpu --dtype bfloat16 --modes compiled,eager --no-ref --frames 100 ;;
    duplex)  dpkg -x .whl/libspeexdsp1_*.deb /tmp/spx && export LD_LIBRARY_PATH=/tmp/spx/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
             timeout $T python3 bench/duplex.py --model random:personaplex --quantize 4 --device gpu --seconds ${DUPLEX_S:-600} ${DUPLEX_ARGS:-} --json "$OUT/duplex.jsonl" ;;
    rprobe)  timeout 280 python3 bench/rows_probe.py --device gpu --config personaplex --quantize 4 ${RPROBE_ARGS:-} ;;
    rattn)   timeout 200 python3 bench/ring_attn.py ${RATTN_ARGS:-} --json "$OUT/ring_attn.jsonl" ;;
    rows)    timeout 300 python3 tests/test_fused_rows.py ${ROWS_K:+-k $ROWS_K} ;;
    sweep)   for f in "--fused ${SWEEP_FUSED:-depformer}" "--fused off"; do timeout $T python3 bench/serve.py --device gpu --config personaplex --quantize 4 --compiled --sizes ${SWEEP_SIZES:-16} --steps 40 ${SWEEP_ARGS:-} $f; done ;;
    joins)   timeout 200 python3 bench/join_probe.py --device gpu --config personaplex --quantize 4 --capacity 16 ;;
    soakbg)  rm -f /tmp/soakbg.log
             setsid nohup bash -c "timeout 1500 python3 bench/serve.py --device gpu --config personaplex --quantize 4 --compiled --sizes '' --soak-sessions ${SOAK_N:-64} --soak-seconds ${SOAK_S:-600} ${SOAK_ARGS:-} > /tmp/soakbg.log 2>&1; echo \"soak finished, exit \$?\" >> /tmp/soakbg.log" < /dev/null > /dev/null 2>&1 &
             sleep 5; cat /tmp/soakbg.log ;;
    soakwait) for _ in $(seq ${WAIT_S:-560}); do grep -q "^soak finished" /tmp/soakbg.log 2>/dev/null && break; sleep 1; done
             cp /tmp/soakbg.log "$OUT/soakbg.log" 2>/dev/null; tail -5 /tmp/soakbg.log ;;
    soak)    timeout $T python3 bench/serve.py --device gpu --config personaplex --quantize 4 --compiled --sizes "" --soak-sessions ${SOAK_N:-16} --soak-seconds ${SOAK_S:-300} ${SOAK_ARGS:-} ;;
    serve)   timeout $T python3 bench/serve.py --device gpu --config personaplex --quantize 4 --compiled --sizes 1,8,16,32 --steps 40 --soak-sessions 16 --soak-seconds ${SOAK_S:-60} ;;
    servews) dpkg -x .whl/libopus0_*.deb /tmp/opus && export LD_LIBRARY_PATH=/tmp/opus/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
             timeout $T python3 bench/serve_ws.py --model random:personaplex --quantize 4 --device gpu --clients ${WS_CLIENTS:-16} --seconds ${WS_S:-240} --variants compiled:5 --json "$OUT/serve_ws.json" ;;
    respond) timeout 200 python3 bench/respond.py --model random:personaplex --quantize 4 --device gpu ;;
    profile) DEST=$OUT STEPS=300 timeout $T bash bench/profile_gpu.sh ;;
  esac 2>&1 | tee "$OUT/$s.log"
done
echo "=== done $(date +%T)"
