"""The fused CUDA Mimi encoder step (engine/models/fused_mimi.py) against the MLX step it replaces.

GPU only (MLX CUDA backend): `python -m pytest -m gpu tests/test_fused_mimi.py` on the device, or
`python tests/test_fused_mimi.py` where pytest is missing. Released Mimi shapes with random weights,
float32 with TF32 off, so both paths do the same float32 arithmetic up to summation order: latents
must agree to ~1e-5 and the codes (argmins over 2048 codewords, 8 levels) on almost every frame,
over more frames than the transformer's window and the fused K/V ring (so both wrap).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")    # before mlx loads: exact float32 matmuls

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from engine.models import fused as fz  # noqa: E402
from engine.models.mimi import Mimi, MimiConfig, tiny_state_dict  # noqa: E402
from engine.profile import synthetic_input  # noqa: E402

from tests.gpu_script import gpu_marks  # noqa: E402

pytestmark = gpu_marks(fz.cuda_backend())

FRAME = 1920
_MIMI = []


def _mimi():
    if not _MIMI:
        cfg = MimiConfig()
        _MIMI.append(Mimi(cfg, 8).load_reference_weights(tiny_state_dict(cfg, seed=2), source="random"))
    return _MIMI[0]


def _use_fused(mimi, on: bool):
    mimi.fused_encode = True if on else False
    mimi._fused_enc = None


def _encode(mimi, audio, state, fused: bool):
    """Run the frames of `audio` through `state`; returns (latents (n, D), codes (n, 8))."""
    _use_fused(mimi, fused)
    lats, codes = [], []
    for i in range(len(audio) // FRAME):
        x = mx.array(audio[i * FRAME:(i + 1) * FRAME].reshape(1, 1, FRAME))
        lat, c = mimi._encode_step(x, state)
        if c is None:
            raise AssertionError("no codes")
        lats.append(np.array(lat, np.float32).reshape(-1))
        codes.append(np.array(c).reshape(-1))
    return np.array(lats), np.array(codes)


def _compare(la, ca, lb, cb):
    rel = np.abs(la - lb).max(axis=1) / np.abs(lb).max(axis=1)
    agree = (ca == cb).mean()
    return float(rel.max()), float(agree)


def test_fused_encoder_matches_mlx_over_window_wrap():
    mimi = _mimi()
    audio = synthetic_input(11.6, seed=4)[: 145 * FRAME]   # 145 frames: window (125) and ring (128) wrap
    lf, cf = _encode(mimi, audio, mimi.make_state(1), fused=True)
    assert mimi._fused_enc, getattr(mimi, "fused_encode_reason", "")
    lm, cm = _encode(mimi, audio, mimi.make_state(1), fused=False)
    rel, agree = _compare(lf, cf, lm, cm)
    print(f"fused vs MLX encoder: latent rel err {rel:.2e}, codes agree {agree:.4f}")
    assert rel < 1e-4, rel
    assert agree >= 0.99, agree
    assert (cf[:, 0] == cm[:, 0]).mean() >= 0.99
    assert len(np.unique(cm[:, 0])) > 10 and len(np.unique(cm[:, 7])) > 10   # codes vary: not vacuous


def test_state_round_trip_between_paths():
    mimi = _mimi()
    audio = synthetic_input(4.0, seed=5)[: 48 * FRAME]
    ref_l, ref_c = _encode(mimi, audio, mimi.make_state(1), fused=False)
    st = mimi.make_state(1)
    a, b = 16 * FRAME, 32 * FRAME
    l1, c1 = _encode(mimi, audio[:a], st, fused=False)       # MLX
    l2, c2 = _encode(mimi, audio[a:b], st, fused=True)       # flat -> fused state
    assert st.enc_fused is not None
    l3, c3 = _encode(mimi, audio[b:], st, fused=False)       # fused -> flat state
    assert st.enc_fused is None
    rel, agree = _compare(np.concatenate([l1, l2, l3]), np.concatenate([c1, c2, c3]), ref_l, ref_c)
    print(f"MLX -> fused -> MLX: latent rel err {rel:.2e}, codes agree {agree:.4f}")
    assert rel < 1e-4 and agree >= 0.99


def test_no_barrier_timeout_and_reset():
    mimi = _mimi()
    _use_fused(mimi, True)
    fe = mimi._fused_encoder()
    st = fe.init_state()
    x = mx.array(synthetic_input(0.08, seed=6)[:FRAME])
    codes, lat, scr = fe.step(x, st)
    mx.eval(codes, lat, scr)
    assert not fe.barrier_error(scr)
    # A fresh state gives the same first frame again (the in-place state really was reset).
    st2 = fe.init_state()
    codes2, lat2, _ = fe.step(x, st2)
    assert np.array_equal(np.array(codes), np.array(codes2))
    assert np.allclose(np.array(lat), np.array(lat2), rtol=0, atol=0)


if __name__ == "__main__":
    from tests.gpu_script import run_tests
    run_tests(globals())
