#!/usr/bin/env bash
# The test command: installs what the tests need, starts the virtual audio device, builds and runs
# the C stress test under ThreadSanitizer, then runs pytest (default: everything not marked slow/gpu).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
eval "$(bash scripts/pulse.sh start)"
make -s -C csrc/tests tsan
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
