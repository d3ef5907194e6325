#!/usr/bin/env bash
# Installs everything the engine needs on a fresh Debian/Ubuntu machine into ./.venv.
#   bash scripts/setup.sh          runtime + audio + server (python -m engine.serve) extras
#   bash scripts/setup.sh --test   also the test extras, the reference oracle (moshi 0.2.13 + torch CPU),
#                                  the cluster (Ray Serve) and asr extras and headless Chromium (web page test)
# macOS: `brew install portaudio speexdsp opus` then the same pip steps (no apt, no OpenBLAS needed).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
if command -v apt-get >/dev/null; then
    pkgs="build-essential python3-dev python3-venv portaudio19-dev libspeexdsp1 libopus0 libopenblas0-pthread"
    [ $WITH_TEST = 1 ] && pkgs="$pkgs pulseaudio pulseaudio-utils libasound2-plugins espeak-ng chromium"
    missing=""
    for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        echo "[setup] apt-get install$missing"
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ $WITH_TEST = 1 ]; then
    # torch 2.13.0 CPU (the oracle's backend); moshi itself without its stale version pins.
    .venv/bin/pip install -q -e ".[audio,test,plot,serve,cluster,asr]"
    .venv/bin/pip install -q --no-deps "moshi==0.2.13"
else
    .venv/bin/pip install -q -e ".[audio,serve]"
fi
echo "[setup] ok: $(.venv/bin/python -c 'import engine, sys; print("python", sys.version.split()[0], "|", engine._blas.BLAS_IN_USE)')"
