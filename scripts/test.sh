#!/usr/bin/env bash
# The test command: installs what the tests need, starts the virtual audio device, builds and runs
# the C stress test under ThreadSanitizer, then runs pytest (default: everything not marked slow/gpu;
# the tests marked `quiet` run last, once the CPUs are idle). Extra arguments go to pytest.
# The PulseAudio daemon is stopped at the end if this script started it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
eval "$(bash scripts/pulse.sh start)"
if [ "${PERSONAPLEX_PULSE_STARTED:-0}" = 1 ]; then
    trap 'bash scripts/pulse.sh stop' EXIT
fi
make -s -C csrc/tests tsan
.venv/bin/python -m pytest -m "not slow and not gpu" "$@"
