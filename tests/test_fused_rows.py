"""The batched server's fused kernels (FusedLM.depformer_rows, cuda/depformer_rows.cu; the ring
attention kernels, engine/models/ring_attn.py) against the MLX depformer loop and attention they
replace in engine.server.batch.BatchEngine.

GPU only (MLX CUDA backend): `python -m pytest -m gpu tests/test_fused_rows.py`, or
`python3 tests/test_fused_rows.py` on the device where pytest is missing. In float32 both paths
must give the same tokens (same keys, same Gumbel draws) for rows with different sampling
parameters, greedy rows, rows with forced codebooks, joins and leaves, and more rows than one
kernel chunk (NB).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# MLX runs float32 matmuls of 2+ rows as TF32 on CUDA by default (~1e-3 relative): the float32
# references here must be full precision, or they differ from the kernels by more than the kernels err.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
import mlx.core as mx  # noqa: E402

from engine.models import fused as fz  # noqa: E402
from engine.models.gen import SamplingParams  # noqa: E402

from tests.gpu_script import gpu_marks, run_tests  # noqa: E402

pytestmark = gpu_marks(fz.cuda_backend())
FRAME = 1920


def _model(dtype=None, quantize=None):
    from bench.serve import BenchModel
    return BenchModel("tiny", dtype or mx.float32, quantize, 20, None)


def _sampling(k):
    if k == 0:
        return SamplingParams(greedy=True)
    return SamplingParams(temp_text=0.9, top_k_text=k, temp_audio=0.6 + 0.1 * k, top_k_audio=40 * k)


def _run(model, fused, T=16, n=11, force_seed=None, parts=("depformer",), dep_max_rows=None,
         leaves=None):
    """n sessions with different sampling (one greedy), joining over the first steps and one leaving
    midway (`leaves`: {step: [slots]} instead); returns per-step (slots, text, agent codes, pcm) and
    the engine. dep_max_rows: the engine's `dep_kernel_max_rows` (fused="auto" only)."""
    from engine.server.batch import BatchEngine, SlotParams
    be = BatchEngine(model, compiled=False, fused=fused, fused_parts=parts)
    if fused == "auto":
        be.dep_kernel_max_rows = dep_max_rows
    rng = np.random.default_rng(5)
    frng = np.random.default_rng(force_seed) if force_seed is not None else None
    out = []
    for t in range(T):
        for i in range(n):
            if t == i // 3:
                be.join(i, model.prompts.state(None, None, 100 + i, warm=False), SlotParams(_sampling(i % 6), 100 + i))
        for slot in (leaves or {T // 2: [4]}).get(t, []):
            be.leave(slot)
        if frng is not None:    # force random agent codebooks of random rows (both engines alike)
            col = be.state.offset % be.ct
            mask = frng.random((be.size, be.n_cb)) < 0.3
            be.state.provided[:, 1:1 + be.n_cb, col] |= mask
        frames = (0.2 * rng.standard_normal((be.size, FRAME))).astype(np.float32)
        pcm, text = be.step(frames)
        out.append((list(be.slots), text.tolist(), np.array(be.state.tokens), pcm))
    return out, be


def _compare(a, b, exact=True):
    for t, ((sa, ta, ka, pa), (sb, tb, kb, pb)) in enumerate(zip(a, b)):
        assert sa == sb
        assert ta == tb, f"step {t}: text tokens differ"
        np.testing.assert_array_equal(ka, kb, err_msg=f"step {t}: token rings differ")
        np.testing.assert_allclose(pa, pb, atol=1e-5)


def test_rows_kernel_matches_mlx_depformer_float32():
    model = _model()
    ref, be_ref = _run(model, False)
    got, be = _run(model, True, parts=("depformer",))
    assert be_ref.fused is None and be.fused is not None and not be.ring_attn
    assert max(len(s) for s, *_ in got) > 8          # more rows than one chunk of NB = 8
    # the outputs vary (not a degenerate model) and the greedy rows differ from the sampled ones
    assert len({tuple(k[:, 1:9].reshape(-1)) for *_, k, _ in got}) > 5
    _compare(ref, got)


def test_auto_switches_depformer_path_by_row_count_float32():
    """fused="auto" runs the depformer kernel on steps of up to `dep_kernel_max_rows` rows and MLX's
    depformer above. Rows: 3, 6, 9, then 11; one leaves at step 8 and eight at step 10 (2 rows
    left), so with the line at 5 the steps cross it both ways. Exactly the steps of at most 5 rows call
    the kernel, and the tokens stay those of the MLX-only engine."""
    model = _model()
    leaves = {8: [4], 10: [0, 1, 2, 3, 5, 6, 7, 8]}
    ref, _ = _run(model, False, leaves=leaves)
    from engine.models.fused import FusedLM
    calls = {"n": 0}
    orig = FusedLM.depformer_rows

    def counted(self, *a, **kw):
        calls["n"] += 1
        return orig(self, *a, **kw)

    FusedLM.depformer_rows = counted
    try:
        got, be = _run(model, "auto", parts=("depformer",), dep_max_rows=5, leaves=leaves)
    finally:
        FusedLM.depformer_rows = orig
    assert be.fused_dep and be.dep_kernel(5) and not be.dep_kernel(6)
    sizes = [len(s) for s, *_ in got]
    small = [n <= 5 for n in sizes]
    assert small[0] and not all(small) and small[-1]         # kernel, then MLX, then the kernel again
    assert calls["n"] == sum(small)
    _compare(ref, got)


def test_rows_kernel_forced_codebooks_float32():
    model = _model()
    ref, _ = _run(model, False, T=10, force_seed=7)
    got, _ = _run(model, True, T=10, force_seed=7)
    _compare(ref, got)


def _rows_vs_single(model, B=11, n=8):
    """The rows kernel against the batch-1 kernel (tests/test_fused.py checks that one against the
    MLX step) row by row, on the same inputs: per-row sampling parameters, no forcing."""
    from engine.server.batch import BatchEngine
    be = BatchEngine(model, fused=True)
    f, c = be.fused, model.lm.config
    mx.random.seed(3)
    h = mx.random.normal((B, c.dim)) * 2
    ttok = mx.array(np.arange(B) * 37 % c.text_card, mx.int32)
    noise = mx.random.gumbel((B, n, c.card))
    params = [_sampling(0), SamplingParams(temp_audio=0.7, top_k_audio=250), SamplingParams(temp_audio=0.9, top_k_audio=50)]
    rows = [params[b % 3] for b in range(B)]
    temp = mx.array([0.0 if p.greedy else p.temp_audio for p in rows], mx.float32)
    topk = mx.array([p.top_k_audio for p in rows], mx.int32)
    got, scr = f.depformer_rows(h, ttok, mx.full((B, n), -1, mx.int32), temp, topk, noise, n)
    got = np.array(got)
    assert not fz.FusedLM.barrier_error(scr)
    for b in range(B):
        one, _ = f.depformer(h[b], ttok[b:b + 1], None if rows[b].greedy else noise[b], n, rows[b])
        np.testing.assert_array_equal(got[b], np.array(one), err_msg=f"row {b}")
    return got


def test_rows_kernel_equals_single_row_kernel():
    for quantize in (None, 4):
        got = _rows_vs_single(_model(quantize=quantize))
        assert len(set(got[:, 0].tolist())) > 3          # rows differ: not one row copied


def test_rows_kernel_4bit_float32_close():
    """4-bit: the MLX reference runs the batch through MLX's tiled quantized matmul (8+ rows),
    which sums in another order than the batch-1 kernels, so a near tie can flip a token. Compare
    one step from the same state."""
    model = _model(quantize=4)
    ref, _ = _run(model, False, T=1, n=3)
    got, _ = _run(model, True, T=1, n=3)
    a, b = ref[0][2], got[0][2]
    assert (a == b).mean() > 0.9, (a == b).mean()


def test_rows_kernel_bf16_close():
    """bf16 rounds differently in the two paths (MLX kernels vs ours), and the random model feeds
    its tokens back: compare one step from the same state, most tokens must agree."""
    model = _model(dtype=mx.bfloat16, quantize=4)
    ref, _ = _run(model, False, T=1, n=3)
    got, _ = _run(model, True, T=1, n=3)
    a, b = ref[0][2], got[0][2]
    assert (a == b).mean() > 0.9, (a == b).mean()


def test_rows_kernel_is_one_launch_and_has_no_barrier_error():
    """A batched depformer call of 3 rows invokes its `mx.fast.cuda_kernel` once (one launch,
    whatever the number of rows), and no grid barrier timed out."""
    model = _model()
    from engine.server.batch import BatchEngine, SlotParams
    be = BatchEngine(model, fused=True)
    for i in range(3):
        be.join(i, model.prompts.state(None, None, i, warm=False), SlotParams())
    c = model.lm.config
    sp = SamplingParams()
    be.fused.prepare_rows(8)
    launches = {"depformer": 0}

    def counted(name, kernel):
        def launch(**kw):
            launches[name] += 1
            return kernel(**kw)
        return launch

    be.fused._dkr = counted("depformer", be.fused._dkr)
    h = mx.random.normal((3, c.dim))
    toks, scr = be.fused.depformer_rows(h, mx.array([1, 2, 3], mx.int32), mx.full((3, 8), -1, mx.int32),
                                        mx.array([sp.temp_audio] * 3, mx.float32), mx.array([250] * 3, mx.int32),
                                        mx.random.gumbel((3, 8, c.card)), 8)
    mx.eval(toks)
    assert launches == {"depformer": 1}
    assert not fz.FusedLM.barrier_error(scr)
    t = np.array(toks)
    assert t.shape == (3, 8) and (t >= 0).all() and (t < c.card).all()


def test_ring_attention_kernels_match_mlx_attention_float32():
    """engine/models/ring_attn.py against MLX's attention masked to the stored slots: rows filled to
    different depths (1 slot, a chunk's edges, all but one, full), one ring with holes anywhere (a
    wrapped ring whose slots were written out of order), spare rows past B that must not be read;
    the tiny model's head_dim (32) and the 7B's (128), chunks of 64 and 256 slots; eager and inside
    mx.compile."""
    from engine.models.ring_attn import chunk_slots, ring_attention
    rng = np.random.default_rng(0)
    C = 3000
    for hd, H in ((32, 3), (128, 24)):          # chunks of 64 and of 256 slots
        fills = [1, 5, 63, 64, 65, 255, 256, 257, 1000, C - 1, C]
        B = len(fills)
        assert chunk_slots(B, H) == (64 if H == 3 else 256)
        k, v = (mx.array(rng.standard_normal((B + 2, H, C, hd)).astype(np.float32)) for _ in range(2))
        q = mx.array(rng.standard_normal((B, H, 1, hd)).astype(np.float32))
        pos = np.full((B, C), -1, np.int32)
        for b, n in enumerate(fills):
            pos[b, :n] = np.arange(n)
        pos[2] = -1
        pos[2, rng.choice(C, C // 3, replace=False)] = 9
        pos = mx.array(pos)
        scale = hd ** -0.5
        ref = mx.fast.scaled_dot_product_attention(q, k[:B], v[:B], scale=scale, mask=(pos >= 0)[:, None, None, :])
        got = ring_attention(q, k, v, pos, scale)
        comp = mx.compile(lambda *a: ring_attention(*a, scale))(q, k, v, pos)
        assert got.shape == ref.shape and got.dtype == mx.float32
        for out in (got, comp):
            np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)
        # a row attending to one slot returns that slot's value exactly
        np.testing.assert_allclose(np.array(got[0, :, 0]), np.array(v[0, :, 0]), rtol=1e-6, atol=1e-6)


def test_ring_attention_kernels_read_fp8_rings_float32():
    """The ring kernels over fp8 e4m3 rings (uint8, `lm.to_cache`) against MLX's masked attention
    over the decoded rings: every byte value the rings may hold (subnormals, the saturated +-448,
    zero; mx.to_fp8 never writes the two NaN codes), rows filled to different depths and one with
    holes, head_dim 32 and 128, eager and compiled; a float32 query gives a float32 result."""
    from engine.models.ring_attn import ring_attention
    rng = np.random.default_rng(1)
    C = 3000
    codes = np.setdiff1d(np.arange(256), [0x7F, 0xFF]).astype(np.uint8)
    values = np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32))
    small = codes[np.abs(values) <= 16]          # the softmax sums stay well inside float32 here
    for hd, H in ((32, 3), (128, 24)):
        fills = [1, 63, 64, 257, 1000, C]
        B = len(fills)
        k, v = (rng.choice(small, (B + 1, H, C, hd)) for _ in range(2))
        v[0, :, 0] = np.resize(codes, (H, hd))   # row 0 attends to its one slot: every code decoded
        k, v = mx.array(k), mx.array(v)
        q = mx.array(rng.standard_normal((B, H, 1, hd)).astype(np.float32) * 0.05)
        pos = np.full((B, C), -1, np.int32)
        for b, n in enumerate(fills):
            pos[b, :n] = np.arange(n)
        pos[1, rng.choice(C, 700, replace=False)] = 4
        pos = mx.array(pos)
        scale = hd ** -0.5
        kd, vd = mx.from_fp8(k[:B], dtype=mx.float32), mx.from_fp8(v[:B], dtype=mx.float32)
        ref = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=scale, mask=(pos >= 0)[:, None, None, :])
        got = ring_attention(q, k, v, pos, scale)
        comp = mx.compile(lambda *a: ring_attention(*a, scale))(q, k, v, pos)
        assert got.dtype == mx.float32
        for out in (got, comp):
            np.testing.assert_allclose(np.array(out[1:]), np.array(ref[1:]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.array(got[0, :, 0]), np.array(vd[0, :, 0]))


def test_ring_attention_engine_matches_mlx_float32():
    """The server's step with the ring attention kernels (fused_parts=("attention",)) against MLX's
    masked attention: the same tokens and PCM for 11 sessions joining and one leaving; then, from one
    state, rows whose rings wrap (positions near 2 x context): the same h and text logits."""
    import engine.models.lm as lm_mod
    model = _model()
    ref, _ = _run(model, False)
    calls = {"n": 0}
    orig = lm_mod.ring_attention

    def counted(*a):
        calls["n"] += 1
        return orig(*a)

    lm_mod.ring_attention = counted
    try:
        got, be = _run(model, True, parts=("attention",))
    finally:
        lm_mod.ring_attention = orig
    assert be.ring_attn and be.fused is None
    assert calls["n"] == len(got) * model.lm.config.num_layers      # every step, every layer
    _compare(ref, got)
    c = model.lm.config
    B = be.size
    be.set_offsets(2 * c.context - 3 + np.arange(B))
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = mx.array(rng.standard_normal((B, c.dim)).astype(np.float32))
        kv = [a[:B] * 1 for a in be.cache.keys + be.cache.values]
        h_ref, lg_ref, *_ = model.lm._temporal(x[:, None], *kv, be.cache.pos, be.cache.offset,
                                               flags=model.lm.row_flags())
        h, lg = be._temporal(x[:, None])
        np.testing.assert_allclose(np.array(h[:B]), np.array(h_ref[:B]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(lg), np.array(lg_ref), rtol=1e-4, atol=1e-3)

if __name__ == "__main__":
    mx.set_default_device(mx.gpu)
    run_tests(dict(globals()))
