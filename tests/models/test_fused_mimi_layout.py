"""The fused Mimi encoder's host side, off the GPU: the layer plan it compiles, the generated
kernel's stage count, and the state conversion between the MLX fixed-shape layout and the fused
buffer (K/V ring with wrap-around, conv tails, offset, first-frame flag). The kernel itself runs
in tests/test_fused_mimi.py on the GPU."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from engine.models.fused import FusedUnavailable
from engine.models.fused_mimi import RING, FusedMimiEncoder
from engine.models.mimi import Mimi, MimiConfig, tiny_state_dict

from .conftest import speech_like


@pytest.fixture(scope="module")
def tiny_mimi():
    cfg = MimiConfig.tiny()
    return Mimi(cfg, 8).load_reference_weights(tiny_state_dict(cfg, seed=3), source="random")


def test_auto_falls_back_off_cuda_and_true_says_why(tiny_mimi):
    tiny_mimi.fused_encode, tiny_mimi._fused_enc = "auto", None
    assert tiny_mimi._fused_encoder() is None
    assert "CUDA" in tiny_mimi.fused_encode_reason
    tiny_mimi.fused_encode, tiny_mimi._fused_enc = True, None
    with pytest.raises(FusedUnavailable, match="CUDA"):
        tiny_mimi._fused_encoder()
    tiny_mimi.fused_encode, tiny_mimi._fused_enc = "auto", None


def test_plan_follows_the_seanet(tiny_mimi):
    fe = FusedMimiEncoder(tiny_mimi, blocks=4, check=False)
    cfg = tiny_mimi.config
    n_res = len(cfg.ratios) * cfg.n_residual_layers
    assert len(fe.nodes) == 2 + len(cfg.ratios) + 2 * n_res      # first, downsamplers, res convs, last
    assert fe.nodes[0].tin == cfg.frame_size and not fe.nodes[0].elu_in
    assert fe.nodes[-1].cout == fe.D and fe.nodes[-1].tout == fe.NTOK
    skips = [n.resid for n in fe.nodes if n.resid is not None]
    assert len(skips) == n_res and all(fe.nodes[s].raw for s in skips)
    # One grid barrier after: the input copy, each conv, 5 per transformer layer, the
    # downsampling conv, the VQ input projection and each acoustic level.
    barriers = fe.body.count("grid_sync(sync, epoch)") + 5 * fe.NL - 5
    assert barriers == 1 + len(fe.nodes) + 5 * fe.NL + 1 + 1 + fe.NA
    # Weights packed in order, 16-byte aligned.
    assert all(v % 4 == 0 for v in fe.W.at.values()) and fe.w.size == fe.W.size


def test_state_round_trip_through_the_fused_layout(tiny_mimi):
    """MLX state after enough frames that the K/V window and the 256-slot ring both wrap ->
    fused buffer -> MLX state: every array identical (keys before position 0 stay zero)."""
    tiny_mimi.fused_encode, tiny_mimi._fused_enc = False, None
    fe = FusedMimiEncoder(tiny_mimi, blocks=4, check=False)
    frames = RING // fe.NTOK + 9
    audio = speech_like(frames * 0.08 + 0.1, seed=1)
    for n in (3, frames):                     # a young stream (keys < 0 present), then a wrapped one
        st = tiny_mimi.make_state(1)
        for i in range(n):
            tiny_mimi.encode_step(mx.array(audio[i * 1920:(i + 1) * 1920].reshape(1, 1, -1)), st)
        flat = st.enc_flat
        fs = fe.state_from_flat(flat, n)
        back = fe.state_to_flat(fs)
        assert len(back) == len(flat)
        for a, b in zip(flat, back):
            assert a.shape == b.shape
            assert np.array_equal(np.array(a), np.array(b))
        assert int(np.array(fs.buf[:1].view(mx.int32))[0]) == n * fe.NTOK
        assert float(fs.buf[1]) == 0.0
    # A fresh state: first-frame flag set, offset 0.
    fresh = fe.init_state()
    assert float(fresh.buf[1]) == 1.0 and int(np.array(fresh.buf[:1].view(mx.int32))[0]) == 0


def test_mimi_state_reads_back_a_fused_state(tiny_mimi):
    """`MimiState.enc_flat` converts a fused state back (and drops it), so the MLX step can go on."""
    fe = FusedMimiEncoder(tiny_mimi, blocks=4, check=False)
    st = tiny_mimi.make_state(1)
    x = mx.array(speech_like(0.2, seed=2)[:1920].reshape(1, 1, -1))
    tiny_mimi.encode_step(x, st)
    want = [np.array(a) for a in st.enc_flat]
    st.enc_fused = fe.state_from_flat(st.enc_flat, 1)
    assert st.arrays()[0] is st.enc_fused.buf
    got = st.enc_flat
    assert st.enc_fused is None
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(want, got))


def test_encode_step_routes_to_the_fused_encoder_only_where_allowed(tiny_mimi, monkeypatch):
    """Where the fused encoder exists, batch-1 "compiled" states use it, unless made with
    fused=False or in another mode."""
    calls = []

    class Fake:
        def init_state(self):
            calls.append("init")
            return type("S", (), {"buf": mx.zeros((4,)), "frames": 0})()

        def step(self, x, st):
            calls.append("step")
            return mx.zeros((8,), mx.int32), mx.zeros((tiny_mimi.config.dimension,)), None

    monkeypatch.setattr(tiny_mimi, "_fused_encoder", lambda: Fake())
    x = mx.array(speech_like(0.1, seed=3)[:1920].reshape(1, 1, -1))
    for kw, used in (({}, True), ({"fused": False}, False), ({"mode": "fixed"}, False), ({"mode": "eager"}, False)):
        calls.clear()
        st = tiny_mimi.make_state(1, **kw)
        codes = tiny_mimi.encode_step(x, st)
        assert codes.shape == (1, 8, 1)
        assert (calls == ["init", "step"]) == used, (kw, calls)
        assert (st.mode != "eager" and st.enc_fused is not None) == used


def test_bad_fused_encode_value_is_a_clear_error(tiny_mimi):
    from engine.errors import ConfigError
    tiny_mimi.fused_encode, tiny_mimi._fused_enc = "yes", None
    try:
        with pytest.raises(ConfigError, match="fused_encode"):
            tiny_mimi._fused_encoder()
    finally:
        tiny_mimi.fused_encode, tiny_mimi._fused_enc = "auto", None
