"""The 60-second version of bench/soak.py: real loop, real rings, simulated device at real-time pace."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_60s(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "bench/soak.py", "--seconds", "60", "--quiet", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["frames"] == 750
    assert res["capture_accounted"] and res["playback_accounted"]       # every sample accounted for
    assert res["capture_overflow"] == 0
    # processed frames + frames dropped by the deadline policy (counted; only under a stalled CPU)
    assert res["consumed"] == (750 + res["dropped_input_frames"]) * 1920
    assert res["sink_received"] == res["played"]
    assert res["rss_growth_mb"] is not None and res["rss_growth_mb"] < 20
    assert res["step_p50_ms"] < 80
