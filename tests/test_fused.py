"""The fused CUDA LM step (engine/models/fused.py) against the MLX step it replaces.

GPU only (MLX CUDA backend): run on the device, `python -m pytest -m gpu tests/test_fused.py`, or
`python tests/test_fused.py` where pytest is missing. In float32 the two paths must agree to
rounding (logits, hidden state, K/V rows, and every sampled token over many steps, including a
KV ring that wraps); in bfloat16 / 4-bit they must agree on almost every token.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from engine.models import fused as fz  # noqa: E402
from engine.models.gen import LmGen, SamplingParams, SINE_TOKENS  # noqa: E402
from engine.models.lm import LM, LmConfig  # noqa: E402

from tests.gpu_script import gpu_marks  # noqa: E402

pytestmark = gpu_marks(fz.cuda_backend())


def _config(**kw):
    base = dict(dim=256, num_heads=4, num_layers=3, hidden_scale=4.125, text_card=1000, context=24,
                depformer_dim=128, depformer_num_heads=4, depformer_num_layers=2,
                depformer_dim_feedforward=576)
    base.update(kw)
    return LmConfig(**base)


def _model(dtype, quant=None, seed=0, **kw):
    lm = LM.random(_config(**kw), dtype=dtype, seed=seed)
    if quant is not None:
        from engine.models import quant as q
        q.apply(lm, quant)
    return lm.compile()


def _user(rng, n):
    return rng.integers(0, 2048, size=(1, n)).astype(np.int32)


def _run(lm, fused, steps, sampling, seed=3):
    gen = LmGen(lm, sampling, fused=fused)
    st = gen.new_state(1, seed=seed)
    rng = np.random.default_rng(seed)
    outs = []
    for _ in range(steps):
        o = gen.step(st, user_codes=_user(rng, gen.n_cb))
        if o is not None:
            outs.append(np.concatenate([np.array(o.text)[:, None], np.array(o.agent_codes)], axis=1)[0])
    return np.array(outs), gen, st


def test_temporal_kernel_matches_mlx_float32():
    lm = _model(mx.float32)
    gen = LmGen(lm, fused=True)
    f = gen.fused_engine()
    cache = lm.make_cache(1)
    fc = fz.FusedCache.from_lm_cache(cache)
    rng = np.random.default_rng(0)
    for step in range(30):   # context 24: the ring wraps
        x = mx.array(rng.standard_normal((1, 1, lm.config.dim)).astype(np.float32))
        h_ref, lg_ref = lm.temporal(x, cache)
        h, lg, scr = f.temporal(x.reshape(-1), fc)
        fc = f.advance(fc, scr)
        assert not f.barrier_error(scr)
        np.testing.assert_allclose(np.array(h), np.array(h_ref[0, 0]), rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(np.array(lg), np.array(lg_ref[0, 0]), rtol=2e-4, atol=2e-3)
        L = lm.config.num_layers
        slot = step % lm.config.context
        for i in range(L):
            np.testing.assert_allclose(np.array(fc.kv[i, 0, :, slot]), np.array(cache.keys[i][0, :, slot]),
                                       rtol=2e-4, atol=2e-4)
            np.testing.assert_allclose(np.array(fc.kv[i, 1, :, slot]), np.array(cache.values[i][0, :, slot]),
                                       rtol=2e-4, atol=2e-4)


def test_depformer_kernel_greedy_matches_mlx_float32():
    lm = _model(mx.float32, seed=1)
    gen = LmGen(lm, fused=True)
    f = gen.fused_engine()
    rng = np.random.default_rng(1)
    n = 8
    for _ in range(5):
        h = mx.array(rng.standard_normal((lm.config.dim,)).astype(np.float32))
        text = int(rng.integers(0, 1000))
        toks, scr = f.depformer(h, mx.array([text], mx.int32), None, n, SamplingParams(greedy=True))
        assert not f.barrier_error(scr)
        # MLX reference: the same walk, greedy.
        dc = lm.make_depformer_cache()
        prev = mx.array([text], mx.int32)
        ref = []
        for s in range(n):
            logits = lm.depformer_step(s, h[None], prev, dc)
            prev = mx.argmax(logits, axis=-1).astype(mx.int32)
            ref.append(int(prev.item()))
        assert np.array(toks).tolist() == ref


def test_live_steps_match_mlx_float32_sampling():
    lm = _model(mx.float32, seed=2)
    sp = SamplingParams()          # temperature + top-k with the reference defaults
    ref, _, _ = _run(lm, False, 40, sp)
    got, gen, st = _run(lm, True, 40, sp)
    assert gen._fused, "the fused path did not run"
    assert isinstance(st.cache, fz.FusedCache)
    assert ref.shape == got.shape and len(ref) >= 30
    assert len(np.unique(ref[:, 1])) > 5, "vacuous: the sampled codebook 0 barely varies"
    np.testing.assert_array_equal(got, ref)


def _kernel_errors(dtype, quant):
    """Max relative error of h / text logits over 6 temporal steps, and step-0 greedy depformer
    token agreement over 20 random inputs, fused kernels vs the MLX path (no feedback between
    steps: bf16 rounding differences would otherwise snowball through the sampled tokens)."""
    lm = _model(dtype, quant=quant, seed=4)
    f = LmGen(lm, fused=True).fused_engine()
    cache = lm.make_cache(1)
    fc = fz.FusedCache.from_lm_cache(cache)
    rng = np.random.default_rng(0)
    err = 0.0
    for _ in range(6):
        x = mx.array(rng.standard_normal((1, 1, lm.config.dim)).astype(np.float32)).astype(dtype)
        h_ref, lg_ref = lm.temporal(x, cache)
        h, lg, scr = f.temporal(x.reshape(-1), fc)
        fc = f.advance(fc, scr)
        for a, b in ((h, h_ref), (lg, lg_ref)):
            a, b = np.array(a), np.array(b[0, 0].astype(mx.float32))
            err = max(err, float(np.abs(a - b).max() / np.abs(b).max()))
    agree = 0
    for _ in range(20):
        h = mx.array(rng.standard_normal((lm.config.dim,)).astype(np.float32)).astype(dtype).astype(mx.float32)
        text = int(rng.integers(0, 1000))
        toks, _ = f.depformer(h, mx.array([text], mx.int32), None, 1, SamplingParams(greedy=True))
        logits = lm.depformer_step(0, h[None].astype(dtype), mx.array([text], mx.int32), lm.make_depformer_cache())
        agree += int(np.array(toks)[0] == int(mx.argmax(logits, axis=-1).item()))
    return err, agree


def test_quantized_float32_matches_mlx():
    for quant in (8, 4):
        err, agree = _kernel_errors(mx.float32, quant)
        assert err < 1e-4 and agree == 20, (quant, err, agree)


def test_bf16_within_rounding_of_mlx():
    for quant in (None, 8, 4):
        err, agree = _kernel_errors(mx.bfloat16, quant)
        assert err < 4e-2 and agree >= 18, (quant, err, agree)


def test_cache_round_trip_and_fallback():
    lm = _model(mx.float32, seed=5)
    gen = LmGen(lm, SamplingParams(greedy=True), fused=True)
    st = gen.new_state(1, seed=0)
    user = np.array(SINE_TOKENS, np.int32)[None]
    for _ in range(5):
        gen.step(st, user_codes=user)
    assert isinstance(st.cache, fz.FusedCache)
    # A forced agent stream takes the MLX path: the cache converts back, the step still runs.
    gen.step(st, user_codes=user, agent_codes=user)
    assert not isinstance(st.cache, fz.FusedCache)
    gen.step(st, user_codes=user)          # the forced agent codebooks 1..7 land in this target column
    assert not isinstance(st.cache, fz.FusedCache)
    gen.step(st, user_codes=user)
    assert isinstance(st.cache, fz.FusedCache)


if __name__ == "__main__":
    from tests.gpu_script import run_tests
    run_tests(globals())
