"""The websocket server on the tiny model: protocol, batching parity, real-time clients, limits."""
from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import engine  # noqa: F401  (loads OpenBLAS before mlx)
from engine.errors import EngineError
from engine.models.gen import LmGen, SamplingParams
from engine.server import protocol as P
from engine.server.client import run_client, speechlike
from engine.server.loop import host_counters

aiohttp = pytest.importorskip("aiohttp", reason="pip install 'personaplex-engine[test]'")
# sphn (the reference server's Opus package) plays the reference-compatible client here
sphn = pytest.importorskip("sphn", reason="pip install 'personaplex-engine[test]'")

FRAME = 1920
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# protocol
# ----------------------------------------------------------------------------------------------
def test_protocol_roundtrip_and_bad_messages():
    assert P.encode(P.TEXT, "héllo") == b"\x02" + "héllo".encode()
    assert P.decode(b"\x01abc") == (P.AUDIO, b"abc")
    for bad in (b"", b"\x00", b"\x02hi", b"\x09", "text frame"):
        with pytest.raises(P.ProtocolError):
            P.decode(bad)
    assert issubclass(P.ProtocolError, EngineError)


def test_query_validation_and_clamping():
    voices = ["NATF0", "NATM1"]
    r = P.parse_query({"voice_prompt": "natm1.pt", "text_prompt": "Be brief.", "seed": "42",
                       "text_temperature": "9", "text_topk": "0", "audio_temperature": "-1",
                       "audio_topk": "100000", "pad_mult": "0"}, voices)
    assert (r.voice, r.text_prompt, r.seed, r.seed_given) == ("NATM1", "Be brief.", 42, True)
    s = r.sampling
    assert (s.temp_text, s.top_k_text, s.temp_audio, s.top_k_audio) == (2.0, 1, 0.0, 500)
    d = P.parse_query({}, voices)
    assert d.voice == "NATF0" and d.sampling == SamplingParams() and not d.seed_given
    assert P.parse_query({"seed": "-1"}, voices).seed_given is False
    assert P.parse_query({"text_seed": "9", "audio_seed": "4"}, voices).seed == 9
    for q in ({"voice_prompt": "NOPE.pt"}, {"voice_prompt": "../x.pt"}, {"seed": "abc"},
              {"text_temperature": "nan"}, {"audio_topk": "many"}, {"text_prompt": "x" * 5000}):
        with pytest.raises(P.ProtocolError):
            P.parse_query(q, voices)


# ----------------------------------------------------------------------------------------------
# batching parity: N sessions in one batch == each alone (B=1)
# ----------------------------------------------------------------------------------------------
def _solo(model, voice, prompt, seed, sampling, audio):
    gen = LmGen(model.lm, sampling, depformer_mode=model.gen.depformer_mode)
    st = model.prompts.state(voice, prompt, seed)
    ms = model.mimi.make_state(1)
    toks, pcm = [], []
    for frame in audio:
        codes = model.mimi.encode_step(frame.reshape(1, 1, -1), ms)
        out = gen.step(st, user_codes=codes[:, :8, 0])
        pcm.append(np.array(model.mimi.decode_step(out.agent_codes[:, :, None], ms)).reshape(-1))
        toks.append(int(np.array(out.text)[0]))
    return toks, np.stack(pcm)


def _batched_and_solo(model, plan, greedy, compiled, min_rows, T, seed):
    """Each planned session (voice, prompt, seed, join step, leave step) run alone (B=1) and in one
    BatchEngine, joining and leaving between steps -> (solo, batched, steps): per session (text
    tokens, pcm frames); steps: [(session, position)] of the rows before each batched step."""
    from engine.server.batch import BatchEngine, SlotParams

    rng = np.random.default_rng(seed)
    sampling = [SamplingParams(greedy=True) if greedy else
                SamplingParams(temp_text=0.9, top_k_text=k, temp_audio=0.8, top_k_audio=50 * k)
                for k in range(1, 2 * len(plan), 2)]
    audio = [(0.2 * rng.standard_normal((T, FRAME))).astype(np.float32) for _ in plan]
    solo = [_solo(model, v, p, s, sampling[i], audio[i][:e - j]) for i, (v, p, s, j, e) in enumerate(plan)]
    be = BatchEngine(model, compiled=compiled)
    be.min_rows = min_rows              # 8: the GPU's zero-padded linears (rows past B ignored)
    if compiled and min_rows == 8:
        be.width_step = None            # and, as compiled on a GPU, attention over the whole ring
    got, steps = [([], []) for _ in plan], []
    for t in range(T):
        for i, (v, p, s, j, e) in enumerate(plan):
            if t == e:
                be.leave(i)
            if t == j:
                be.join(i, model.prompts.state(v, p, s), SlotParams(sampling[i], s))
        steps.append(list(zip(be.slots, be.cache.steps.tolist())))
        pcm, text = be.step(np.stack([audio[i][t - plan[i][3]] for i in be.slots]))
        for r, i in enumerate(be.slots):
            got[i][0].append(int(text[r]))
            got[i][1].append(pcm[r])
    return solo, got, steps


def _assert_batched_equals_solo(solo, got):
    for i in range(len(solo)):
        assert len(set(solo[i][0])) > 3, "degenerate tiny model: text tokens do not vary"
        assert got[i][0] == solo[i][0], f"session {i}: batched text tokens differ from B=1"
        np.testing.assert_allclose(np.stack(got[i][1]), solo[i][1], atol=1e-4)
        assert np.abs(solo[i][1]).max() > 1e-3


@pytest.mark.parametrize("greedy,compiled,min_rows", [(True, False, 1), (False, False, 1), (True, True, 1),
                                                      (False, False, 8), (True, True, 8)],
                         ids=["greedy", "seeded-sampling", "greedy-compiled", "seeded-padded-rows",
                              "greedy-compiled-gpu-layout"])
def test_batched_equals_solo(tiny_model, greedy, compiled, min_rows):
    # The last session joins after the first left: it gets the freed last row, whose ring still
    # holds the moved session's keys (a join copies only the slots its prompt wrote).
    T = 24
    plan = [("NATF0", "assistant+focused", 3, 0, 14), ("NATM1", "Be brief.", 5, 3, T),
            ("NATF2", "Talk about trains.", 7, 7, T), ("NATF0", "Be brief.", 11, 7, T),
            ("NATM1", "Talk about trains.", 13, 15, T)]
    solo, got, steps = tiny_model.worker.call(_batched_and_solo, tiny_model, plan, greedy, compiled, min_rows, T, 1)
    sizes = [len(s) for s in steps]
    assert max(sizes) == 4 and sizes[0] == 1
    _assert_batched_equals_solo(solo, got)


@pytest.mark.parametrize("greedy,compiled,min_rows", [(True, False, 1), (False, True, 8)],
                         ids=["greedy", "seeded-compiled-gpu-layout"])
def test_batched_equals_solo_when_rings_wrap(tiny_model, greedy, compiled, min_rows):
    """The tiny model with a 40-position KV ring: every row's ring wraps (during its prompt or live),
    rows sit at different positions and ring slots in one forward, sessions join and leave between
    ticks, and each row still gets exactly what the same conversation gets alone (B=1)."""
    import dataclasses

    from mlx.utils import tree_flatten

    from engine.api import PersonaPlex
    from engine.models.lm import LM

    base = tiny_model
    T = 56
    plan = [(None, "Be brief.", 3, 0, 30), ("NATM1", "", 5, 2, T), (None, "Talk about trains.", 7, 9, T),
            (None, "", 11, 18, T)]

    def run():
        lm = LM(dataclasses.replace(base.lm.config, context=40), base.lm.dtype)
        lm.load_weights(tree_flatten(base.lm.parameters()), strict=True)
        gen = LmGen(lm, base.gen.sampling, depformer_mode=base.gen.depformer_mode)
        model = PersonaPlex(base.files, base.mimi, lm, gen, base.sp, base.worker)
        return _batched_and_solo(model, plan, greedy, compiled, min_rows, T, 4)

    solo, got, steps = base.worker.call(run)
    last = dict(row for step in steps for row in step)
    assert min(last.values()) > 40, f"every row's ring wraps: last positions {last}"
    positions = [[p for _, p in step] for step in steps]
    assert any(len(set(p)) == len(p) > 2 for p in positions), "rows at different positions in one step"
    assert any(len({x % 40 for x in p}) == len(p) > 2 for p in positions), "and at different ring slots"
    _assert_batched_equals_solo(solo, got)


def test_full_ring_attention_is_mask_free_and_exact(tiny_model):
    """Once every row's ring holds `context` positions the step attends without a mask (the fused
    kernel on CUDA); it must give what the masked step gives on the same state. Also: rows padded
    for the GPU's tiled matmul change nothing, and an engine is freed as soon as it is dropped."""
    import gc
    import weakref

    import mlx.core as mx

    from engine.server.batch import BatchEngine, SlotParams

    def run():
        be = BatchEngine(tiny_model, capacity=3)
        for i in range(3):
            be.join(i, tiny_model.prompts.state("NATF0", None, i), SlotParams())
        C = tiny_model.lm.config.context
        o = 2 * C + np.arange(3) * 5                        # long sessions: every slot in use
        j = np.arange(C)
        pos = mx.array((o[:, None] - 1 - ((o[:, None] - 1 - j[None, :]) % C)).astype(np.int32))
        off = mx.array(o.astype(np.int32))
        rng = np.random.default_rng(0)
        kv = [mx.array(rng.standard_normal(a.shape).astype(np.float32)) for a in be.cache.keys + be.cache.values]
        x = mx.array(rng.standard_normal((3, tiny_model.lm.config.dim)).astype(np.float32))
        lm = tiny_model.lm
        outs = [lm._temporal(x[:, None], *kv, pos, off, flags=lm.row_flags(C, rows, full))
                for rows, full in ((3, False), (3, True), (8, True))]
        mx.eval(outs)
        ref = outs[0]
        for out in outs[1:]:
            np.testing.assert_allclose(np.array(out[1]), np.array(ref[1]), atol=1e-4)      # logits
            np.testing.assert_allclose(np.array(out[0][:3]), np.array(ref[0]), atol=1e-4)  # h
            for a, b in zip(out[2:], ref[2:]):                                # caches, pos, offset
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
        assert outs[2][0].shape[0] == 8 and outs[2][1].shape[0] == 3
        be.step(np.zeros((3, FRAME), np.float32))
        ref_be = weakref.ref(be)
        gc.disable()
        try:
            del be
            return ref_be() is None
        finally:
            gc.enable()

    assert tiny_model.worker.call(run), "BatchEngine not freed when dropped (reference cycle)"


def test_compiled_reserve_prewarms_every_size(tiny_model):
    """A compiled engine with a capacity traces its step graphs for every batch size at reserve()
    and can rehearse real steps with dummy sessions; joins then add no new graph, and neither the
    dummy pre-runs nor the rehearsal leave a trace in the sessions' output."""
    from engine.server.batch import BatchEngine, SlotParams

    mimi = tiny_model.mimi
    traces = []             # (enc / dec, rows): each is one trace of the compiled Mimi step

    def counted(fn, tag):
        def step(x, st):
            traces.append((tag, x.shape[0]))
            return fn(x, st)
        return step

    def run():
        mimi._clear_compiled()                 # trace the codec's steps afresh, through the counters
        mimi._enc_fn, mimi._dec_fn = counted(mimi._enc_fn, "enc"), counted(mimi._dec_fn, "dec")
        try:
            return runs()
        finally:
            del mimi._enc_fn, mimi._dec_fn
            mimi._clear_compiled()

    def runs():
        out = []
        for warm in (True, False):
            be = BatchEngine(tiny_model, compiled=True, capacity=3)
            if warm:
                be.reserve()
                assert sorted(traces) == sorted((t, b) for t in ("enc", "dec") for b in (1, 2, 3))
                fns = (set(be._temporal_fns), set(be._dep_fns), len(traces))
                # fresh and full ring, and on the CPU every narrower attention width (width_step)
                C, step = tiny_model.lm.config.context, be.width_step
                widths = len(range(step, C, step)) if step else 0
                assert len(fns[0]) == (2 + widths) * len({be._rows(b) for b in (1, 2, 3)})
                assert len(fns[1]) == 3 * tiny_model.lm.config.dep_q
                # Rehearsal: real steps of 1..3 dummy sessions, gone afterwards.
                n = be.rehearse(lambda: tiny_model.prompts.state("NATF0", None, 0))
                assert n == 9 and be.size == 0 and be.enc is None and be.dec is None
            texts = []
            for t in range(6):
                if t < 3:
                    be.join(t, tiny_model.prompts.state("NATF0", None, t), SlotParams(SamplingParams(greedy=True)))
                pcm, text = be.step(np.full((be.size, FRAME), 0.01 * t, np.float32))
                texts.append((text.tolist(), pcm))
            if warm:
                assert (set(be._temporal_fns), set(be._dep_fns), len(traces)) == fns
                # Long sessions: crossing the ring-fill point (masked -> mask-free) adds no graph.
                C = tiny_model.lm.config.context
                be.set_offsets(np.array([C - 3, C - 2, C + 40]))
                assert be.cache.pos.tolist()[2].count(-1) == 0 and be.cache.pos.tolist()[0].count(-1) == 3
                for _ in range(4):
                    be.step(np.zeros((be.size, FRAME), np.float32))
                assert be.cache.steps.min() > C and (set(be._temporal_fns), set(be._dep_fns), len(traces)) == fns
            out.append(texts)
        return out

    warm, cold = tiny_model.worker.call(run)
    for (tw, pw), (tc, pc) in zip(warm, cold):
        assert tw == tc
        np.testing.assert_allclose(pw, pc, atol=1e-5)


def test_batch_errors(tiny_model):
    from engine.server.batch import BatchEngine, SlotParams

    def run():
        be = BatchEngine(tiny_model)
        with pytest.raises(EngineError):
            be.step(np.zeros((1, FRAME), np.float32))
        st = tiny_model.prompts.state("NATF0", None, 1)
        be.join("a", st, SlotParams())
        with pytest.raises(EngineError):
            be.join("a", st, SlotParams())
        with pytest.raises(EngineError):
            be.join("b", tiny_model.gen.new_state(1, seed=0), SlotParams())
        with pytest.raises(EngineError):
            be.step(np.zeros((2, FRAME), np.float32))
        pcm, text = be.step(np.zeros((1, FRAME), np.float32))
        be.leave("a")
        full = BatchEngine(tiny_model, capacity=1)
        full.join("x", st, SlotParams())
        with pytest.raises(EngineError, match="full"):
            full.join("y", st, SlotParams())
        return pcm.shape, text.shape, be.size

    assert tiny_model.worker.call(run) == ((1, FRAME), (1,), 0)


class _RowsContract:
    """What FusedLM.depformer_rows computes (cuda/depformer_rows.cu), written with MLX ops: the
    CPU stand-in that checks BatchEngine's side of the call (keys -> Gumbel noise, forced
    codebooks, greedy rows) against the MLX path. tests/test_fused_rows.py checks the kernel itself
    against the MLX path on a GPU."""

    def __init__(self, lm):
        self.lm = lm
        self.calls = 0

    def depformer_rows(self, h, ttok, forced, temp, top_k, noise, n):
        import mlx.core as mx
        self.calls += 1
        card = self.lm.config.card
        t, k = np.array(temp), np.array(top_k)
        prev, kv, out = ttok, [], []
        for s in range(n):
            logits, *kv = self.lm._depformer(s, h.astype(self.lm.dtype), prev, *kv)
            x = logits.astype(mx.float32) / mx.array(np.where(t <= 0, 1, t).astype(np.float32))[:, None]
            kk = np.where((k > 0) & (k < card), k, card)
            kth = mx.take_along_axis(mx.sort(x, axis=-1), mx.array(card - kk)[:, None], axis=-1)
            x = mx.where(x >= kth, x, -mx.inf)
            tok = mx.argmax(x + (noise[:, s] if noise is not None else 0), axis=-1).astype(mx.int32)
            tok = mx.where(mx.array(t <= 0), mx.argmax(logits, axis=-1).astype(mx.int32), tok)
            prev = mx.where(forced[:, s] >= 0, forced[:, s], tok)
            out.append(prev)
        return mx.stack(out, axis=1), None


def _contract_run(tiny_model, parts, limit=None, leaves=(2,), ring=False, kv_dtype="model"):
    """8 steps of 7 rows with different sampling (greedy, top-k) joining over the first 4, `leaves`
    leaving before step 5, random agent codebooks forced, and from step 6 full rings that wrap;
    `parts`: the kernels, as their MLX stand-in (`_RowsContract`), with the engine's
    `dep_kernel_max_rows` = limit; `ring`: the ring attention path. Worker thread. Returns per step (slots, text, token ring), engine."""
    from engine.server.batch import BatchEngine, SlotParams
    from engine.models.gen import SamplingParams

    def sampling(i):
        return (SamplingParams(greedy=True) if i % 4 == 0 else
                SamplingParams(temp_text=0.9, top_k_text=5, temp_audio=0.6 + 0.1 * i, top_k_audio=30 * i))

    be = BatchEngine(tiny_model, kv_dtype=kv_dtype)
    if parts:
        be.fused = _RowsContract(tiny_model.lm)
        be.dep_kernel_max_rows = limit
    be.ring_attn = ring            # ring: the attention kernels' path (the caller stands in for them)
    rng, frng = np.random.default_rng(5), np.random.default_rng(7)
    out = []
    for t in range(8):
        for i in range(7):
            if t == i // 2:
                be.join(i, tiny_model.prompts.state("NATF0", None, 100 + i), SlotParams(sampling(i), 100 + i))
        if t == 5:
            for slot in leaves:
                be.leave(slot)
        if t == 6:                   # long sessions: every ring full, the newest slot wraps around
            be.set_offsets(2 * be.lm.config.context - 3 + np.arange(be.size))
        col = be.state.offset % be.ct
        be.state.provided[:, 1:1 + be.n_cb, col] |= frng.random((be.size, be.n_cb)) < 0.3
        pcm, text = be.step((0.2 * rng.standard_normal((be.size, FRAME))).astype(np.float32))
        out.append((list(be.slots), text.tolist(), np.array(be.state.tokens)))
    return out, be


def _same_tokens(ref, got, what):
    for t, (a, b) in enumerate(zip(ref, got)):
        assert a[0] == b[0] and a[1] == b[1], f"{what} step {t}: text differs"
        np.testing.assert_array_equal(a[2], b[2], err_msg=f"{what} step {t}: token rings differ")


def test_ring_attention_path_gives_the_mlx_paths_tokens(tiny_model, monkeypatch):
    """The server's step with the ring attention kernels (engine/models/ring_attn.py, CUDA only; here
    an MLX stand-in of their contract: attend to the slots whose position is stored) gives the MLX
    path's tokens: rows joining fresh (their only stored slot is this step's, so the kernels must get
    the positions after this step's write), a leave, forced codebooks, full rings that wrap. One
    graph serves fresh and full rings (no width buckets, no full-ring variant). On the CPU the
    kernels are unavailable: asking for them says so, and "auto" runs MLX's attention."""
    import mlx.core as mx
    import engine.models.lm as lm_mod
    from engine.errors import EngineError
    from engine.server.batch import BatchEngine
    calls = []

    def stand_in(q, k, v, pos, scale):
        calls.append(q.shape[0])
        B = q.shape[0]
        return mx.fast.scaled_dot_product_attention(q, k[:B], v[:B], scale=scale, mask=(pos >= 0)[:, None, None, :])

    monkeypatch.setattr(lm_mod, "ring_attention", stand_in)

    def runs():
        with pytest.raises(EngineError, match="CUDA"):
            BatchEngine(tiny_model, fused=True, fused_parts=("attention",))
        assert not BatchEngine(tiny_model, fused="auto").ring_attn
        return _contract_run(tiny_model, ()), _contract_run(tiny_model, (), ring=True)

    (ref, be_ref), (got, be) = tiny_model.worker.call(runs)
    _same_tokens(ref, got, "ring attention")
    assert len(calls) == 8 * tiny_model.lm.config.num_layers
    assert {k[0] for k in be._temporal_fns} == {tiny_model.lm.config.context}     # one width
    assert {k[2] for k in be._temporal_fns} == {False}                            # no full-ring variant
    assert len({k[0] for k in be_ref._temporal_fns}) > 1 or len({k[2] for k in be_ref._temporal_fns}) > 1


def test_fp8_kv_rows_step_on_their_decoded_values(tiny_model, monkeypatch):
    """BatchEngine(kv_dtype="fp8") keeps the rows' KV rings as e4m3 bytes and attends over their
    decoded values, on MLX's attention and on the ring kernels' path (their MLX stand-in, which
    decodes): through joins (the prompted state's keys converted), a leave, forced codebooks and
    full rings that wrap, its tokens and decoded rings equal those of the model-dtype engine whose
    every KV write rounds through fp8. A bad kv_dtype names the choices."""
    import mlx.core as mx
    import engine.models.lm as lm_mod
    import engine.server.batch as batch_mod
    from engine.errors import EngineError
    from engine.server.batch import BatchEngine
    real = lm_mod.to_cache

    def stand_in(q, k, v, pos, scale):
        B = q.shape[0]
        k, v = lm_mod.from_cache(k[:B], q.dtype), lm_mod.from_cache(v[:B], q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=(pos >= 0)[:, None, None, :])

    def rounded(x, dtype):
        return real(x, dtype) if dtype == mx.uint8 else mx.from_fp8(mx.to_fp8(x), dtype=dtype)

    monkeypatch.setattr(lm_mod, "ring_attention", stand_in)

    def runs():
        with pytest.raises(EngineError, match="fp8"):
            BatchEngine(tiny_model, kv_dtype="int4")
        got = [_contract_run(tiny_model, (), kv_dtype="fp8"),
               _contract_run(tiny_model, (), ring=True, kv_dtype="fp8")]
        monkeypatch.setattr(lm_mod, "to_cache", rounded)
        monkeypatch.setattr(batch_mod, "to_cache", rounded)
        return got, _contract_run(tiny_model, ())

    got, (ref, be_ref) = tiny_model.worker.call(runs)
    B = be_ref.size
    for what, (out, be) in zip(("fp8, MLX attention", "fp8, ring attention"), got):
        _same_tokens(ref, out, what)
        assert be.cache.keys[0].dtype == mx.uint8
        for a, b in zip(be.cache.keys + be.cache.values, be_ref.cache.keys + be_ref.cache.values):
            np.testing.assert_array_equal(np.array(mx.from_fp8(a[:B], dtype=b.dtype)), np.array(b[:B]))


def test_fused_kernel_calls_give_the_mlx_paths_tokens(tiny_model):
    """BatchEngine with the batched depformer kernel (here its contract in MLX) gives the tokens of
    the MLX path: 7 rows with different sampling (greedy, top-k), joins, a leave,
    random agent codebooks forced, and full rings that wrap. On the CPU the real kernels are
    unavailable: fused=True says so."""
    from engine.errors import EngineError
    from engine.server.batch import BatchEngine

    def all_runs():
        with pytest.raises(EngineError, match="CUDA"):
            BatchEngine(tiny_model, fused=True)
        with pytest.raises(EngineError, match="fused="):
            BatchEngine(tiny_model, fused="yes")
        with pytest.raises(EngineError, match="fused_parts"):
            BatchEngine(tiny_model, fused="auto", fused_parts=("mimi",))
        assert BatchEngine(tiny_model, fused="auto").fused is None       # CPU: the MLX path
        return _contract_run(tiny_model, ()), _contract_run(tiny_model, ("depformer",))

    (ref, _), (got, be) = tiny_model.worker.call(all_runs)
    assert be.fused.calls == 8
    assert len({tuple(t[2][:, 1:9, 0].reshape(-1)) for t in got}) > 4      # the codes vary
    _same_tokens(ref, got, "depformer")


def test_auto_fused_switches_the_depformer_path_by_row_count(tiny_model):
    """fused="auto" runs the depformer kernel on steps of up to `dep_kernel_max_rows` rows and MLX's
    depformer above. Rows 2, 4, 6, 7, 7, then 4 leave: 3, 3, 3, so with the line at 4 the steps
    cross it both ways. Every step of at most 4 rows calls the kernel (its stand-in here) and no
    other does, and the tokens
    are the MLX-only engine's."""
    from engine.server.batch import AUTO_DEP_KERNEL_MAX_ROWS, BatchEngine
    leaves = (0, 1, 2, 3)

    def runs():
        auto = BatchEngine(tiny_model, fused="auto")
        assert auto.dep_kernel_max_rows == AUTO_DEP_KERNEL_MAX_ROWS == 16
        assert BatchEngine(tiny_model, fused=False).dep_kernel_max_rows is None   # as fused=True
        return (_contract_run(tiny_model, (), leaves=leaves),
                _contract_run(tiny_model, ("depformer",), limit=4, leaves=leaves))

    (ref, _), (got, be) = tiny_model.worker.call(runs)
    sizes = [len(slots) for slots, *_ in got]
    assert sizes == [2, 4, 6, 7, 7, 3, 3, 3]
    assert be.fused.calls == sum(n <= 4 for n in sizes) == 5
    assert [be.dep_kernel(n) for n in (1, 4, 5, 64)] == [True, True, False, False]
    be.dep_kernel_max_rows = None                                     # explicit fused=True: every size
    assert be.dep_kernel(64)
    _same_tokens(ref, got, "auto")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_join_step_and_leave_update_the_kv_in_place(tiny_model, compiled):
    """The batch's KV cache is the server's largest state (16 sessions of the 7B model: ~25 GB on a
    GPU). A join, a step and a leave must write into it in place: MLX reuses a buffer only when
    nothing else references it, and one stray reference makes every layer a full copy (peak memory
    doubles, and the copy costs milliseconds on the GPU). Peak memory above the live arrays during
    each call stays under one session's KV row (the leave copies one row on purpose)."""
    import mlx.core as mx
    from engine.server.batch import BatchEngine, SlotParams

    def run():
        be = BatchEngine(tiny_model, compiled=compiled, capacity=4)
        be.reserve()
        kv = sum(a.nbytes for a in be.cache.keys + be.cache.values)
        row = kv / be.cap
        over = {}

        def peak_over(name, fn):
            mx.eval(be.cache.keys, be.cache.values)
            mx.reset_peak_memory()
            a0 = mx.get_active_memory()
            fn()
            over[name] = max(over.get(name, 0), mx.get_peak_memory() - a0)

        st = tiny_model.prompts.state("NATF0", None, 0)
        mx.eval(st.tokens, st.cache.keys, st.cache.values)
        for i in range(3):
            peak_over("join", lambda: be.join(i, st, SlotParams()))
            peak_over("step", lambda: be.step(np.zeros((be.size, FRAME), np.float32)))
        peak_over("leave", lambda: be.leave(0))
        return kv, row, over

    kv, row, over = tiny_model.worker.call(run)
    assert row > 2**20                         # the bound below is well above allocation noise
    for name, extra in over.items():
        assert extra < 1.1 * row, f"{name}: {extra / 2**20:.1f} MB above the live arrays (one KV row: {row / 2**20:.1f} MB)"


# ----------------------------------------------------------------------------------------------
# the server, real-time clients
# ----------------------------------------------------------------------------------------------
async def _client(port, seconds, seed=0, query=None):
    """A reference-style client (sphn's Ogg/Opus, as the reference server's own tooling) sending
    `seconds` of audio in real time: engine.server.client.run_client's result dict."""
    return await run_client(f"ws://127.0.0.1:{port}", speechlike(seconds, seed),
                            query or {"voice_prompt": "NATF0.pt", "text_prompt": "Hello"}, codec="sphn")


def _run_server(model, coro_fn, **cfg):
    from engine.server.app import ServerConfig, start

    async def main():
        runner, server, port = await start(model, "127.0.0.1", 0, ServerConfig(**cfg))
        try:
            return await coro_fn(port, server)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


async def _get(port, path):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, await r.text()


def _realtime_scenario(model, n_clients, seconds):
    """n clients stream `seconds` of audio at once on one batched loop; one more is refused.
    Returns the loop's metrics: the caller judges the misses."""

    async def scenario(port, server):
        clients = [asyncio.create_task(_client(port, seconds, seed=i)) for i in range(n_clients)]
        while server.loop.batch is None or server.loop.batch.size < n_clients:
            await asyncio.sleep(0.05)
        t_refuse = time.monotonic()
        refused = await _client(port, 1.0, seed=99)
        t_refuse = time.monotonic() - t_refuse
        status, health = await _get(port, "/healthz")
        results = await asyncio.gather(*clients)
        _, metrics = await _get(port, "/metrics")
        return results, refused, t_refuse, status, health, metrics, server.metrics

    results, refused, t_refuse, status, health, metrics, m = _run_server(
        model, scenario, max_sessions=n_clients)
    assert status == 200 and f'"sessions": {n_clients}' in health
    assert refused["handshake_s"] is None and "server full" in refused["error"] and t_refuse < 5
    assert max(m.batch_sizes) == n_clients          # one batched step served every client
    for r in results:
        assert r["error"] is None and r["handshake_s"] is not None
        # continuous audio: one 80 ms frame back per frame sent (allow the tail in flight)
        assert r["samples"] >= (r["frames_sent"] - 8) * FRAME, (r["samples"], r["frames_sent"])
        assert r["max_gap_s"] < 0.5, f"audio stalled for {r['max_gap_s']:.2f} s"
    assert sum(len(r["text"]) for r in results) > 0
    assert m.steps >= seconds / 0.08 * 0.9
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values["personaplex_step_misses_total"] <= m.misses and "personaplex_step_ms_p99" in values
    assert values["personaplex_steps_total"] >= seconds / 0.08 * 0.9
    assert values["personaplex_sessions_refused_total"] == 1
    return m


def _bare_step_ms(model, n: int, q: float = 99) -> float:
    """Percentile q of the batched step alone (no server, no clients) for n rows, compiled, in ms:
    how fast this machine runs the step right now."""
    from engine.server.batch import BatchEngine, SlotParams
    from engine.server.loop import blas_threads

    def run():
        with blas_threads(1):          # as the loop runs it
            return bare()

    def bare():
        be = BatchEngine(model, compiled=True, capacity=n)          # as the server runs it
        be.reserve()
        for i in range(n):
            be.join(i, model.prompts.state("NATF0", None, i), SlotParams())
        frames, ts = np.zeros((n, FRAME), np.float32), []
        for _ in range(15):
            t0 = time.perf_counter()
            be.step(frames)
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(np.percentile(ts[3:], q))

    return model.worker.call(run)


@pytest.mark.quiet
def test_clients_realtime_and_refusal(tiny_model):
    """Default run (sized for 2 shared cores): 3 clients x 8 s; at most 15 % misses
    (SERVE_TEST_MAX_MISS_RATE). The miss check is skipped, with a warning, when the machine is so
    loaded that the bare batched step (no server, no clients), measured before and after, takes
    > 40 ms at p99; the strict 8 x 20 s zero-miss version is the next test."""
    n = 3
    before = _bare_step_ms(tiny_model, n)
    m = _realtime_scenario(tiny_model, n, 8.0)
    after = _bare_step_ms(tiny_model, n)
    rate = float(os.environ.get("SERVE_TEST_MAX_MISS_RATE", "0.15"))
    msg = (f"{m.misses} misses in {m.steps} steps (p50 {m.percentile(50):.1f} p99 {m.percentile(99):.1f} ms); "
           f"bare step p99 before/after {before:.0f}/{after:.0f} ms")
    if max(before, after) > 40:
        warnings.warn(f"machine overloaded, miss-rate check skipped: {msg}")
    else:
        assert m.misses <= rate * m.steps, msg


class CpuCanary:
    """Threads that time a fixed piece of pure-Python work (~1 ms) in their own CPU time every
    `period` s, one pinned to each CPU this process may use (where the OS allows pinning). The work
    never changes, so its CPU time per run only grows when that CPU itself runs slower (a busy SMT
    sibling or neighbour on the VM's host, frequency drops), which neither steal nor throttling
    counters show; pinned, a slow CPU is seen even while the step's threads keep it busy.
    `slowdown(t0, t1)`: for each CPU, the median run near [t0, t1] over its median run of the whole
    time (single runs vary up to ~2x on a quiet machine; the median of the runs around a step does
    not); the largest of them."""

    def __init__(self, period: float = 0.08, work: int = 15000):
        import threading

        self.period, self.work = period, work
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
        self.samples = {c: [] for c in cpus}           # cpu -> [(perf_counter at the end, cpu s of the work)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(c,), name=f"cpu-canary-{c}", daemon=True)
                         for c in cpus]

    def _run(self, cpu):
        if cpu is not None:
            try:
                os.sched_setaffinity(0, {cpu})         # 0: the calling thread, on Linux
            except OSError:
                pass
        out = self.samples[cpu]
        while not self._stop.wait(self.period):
            c0 = time.thread_time()
            x = 0
            for i in range(self.work):
                x += i * i
            out.append((time.perf_counter(), time.thread_time() - c0))

    def __enter__(self):
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for th in self._threads:
            th.join()

    def slowdown(self, t0: float, t1: float, margin: float = 0.25) -> float:
        worst = 1.0
        for samples in self.samples.values():
            med = float(np.median([c for _, c in samples])) if samples else 0.0
            near = [c for t, c in samples if t0 - margin <= t <= t1 + margin]
            if near and med > 0:
                worst = max(worst, float(np.median(near)) / med)
        return worst


@pytest.mark.quiet
def test_eight_clients_twenty_seconds_no_misses(tiny_model, tmp_path):
    """The issue's CI test: 8 concurrent clients x 20 s get continuous audio and text, the step loop
    misses no deadline, a 9th client is refused while they run. The clients run in their own
    process (`python -m engine.server.client`), as real clients do: their 8 Opus encoders and event
    loop do not share the server's interpreter. The server runs as `engine.serve` does by default
    (compiled steps, libopus at complexity 5) with the clients' prompt warmed. Real clients run on
    other machines; here they share the server's 2 cores, so their process runs at a lower priority
    (nice +10) and takes only the CPU the server leaves idle, as it would on its own machine.
    Marked `quiet`: it runs after the rest of the suite, once the CPUs are idle. Zero misses are
    required whenever the machine gives the step 2x headroom: the bare 8-row step (no server, no
    clients), measured just before and just after the run, has a p50 <= 40 ms (~30 ms on this
    2-core VM when quiet; the same VM measured 50 ms in its slow phases). Misses are also the
    machine's when it lost speed during the run itself: CPU time taken by the VM's host (steal) or
    the cgroup's quota (throttling), or a CPU canary (fixed work, timed in its own CPU time on each
    CPU) taking >= 1.8x its usual CPU time around the missed step. Those are reported as a warning
    naming the evidence, not as a failure; any other miss fails."""
    import sys

    n, seconds = 8, float(os.environ.get("SERVE_TEST_SECONDS", "20"))
    out = tmp_path / "clients.json"

    async def scenario(port, server):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.server.client", "--url", f"ws://127.0.0.1:{port}",
            "--clients", str(n), "--seconds", str(seconds), "--json", str(out),
            "--nice", "10", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT))
        t_wait = time.monotonic()
        while (server.loop.batch is None or server.loop.batch.size < n) and time.monotonic() - t_wait < 60:
            await asyncio.sleep(0.05)
        refused = await _client(port, 1.0, seed=99)
        text, _ = await proc.communicate()
        _, metrics = await _get(port, "/metrics")
        return proc.returncode, text.decode(), refused, metrics, server.metrics

    bare = [_bare_step_ms(tiny_model, n, 50)]
    host0 = host_counters()
    with CpuCanary() as canary:
        rc, text, refused, metrics, m = _run_server(tiny_model, scenario, max_sessions=n, compiled=True)
    host1 = host_counters()
    bare.append(_bare_step_ms(tiny_model, n, 50))
    assert rc == 0, text
    results = json.loads(out.read_text())
    assert len(results) == n and f"{n}/{n} clients got continuous audio" in text
    for r in results:
        assert r["error"] is None and r["frames_sent"] >= seconds / 0.08 - 1
        assert r["samples"] >= (r["frames_sent"] - 8) * FRAME and r["max_gap_s"] < 0.5, r
    assert sum(len(r["text"]) for r in results) > 0
    assert refused["handshake_s"] is None and "server full" in refused["error"]
    assert max(m.batch_sizes) == n and m.steps >= seconds / 0.08 * 0.9
    ms, cpu, sizes = list(m.step_ms), list(m.step_cpu_ms), list(m.batch_sizes)
    slow = [(i, round(ms[i]), round(cpu[i]), sizes[i]) for i in sorted(range(len(ms)), key=ms.__getitem__)[-4:]]
    host = {k: round(host1[k] - host0[k], 3) for k in host0 if k in host1}
    msg = (f"{m.misses} misses in {m.steps} steps at {list(m.miss_steps)}, p50 {m.percentile(50):.1f} "
           f"p99 {m.percentile(99):.1f} ms, slowest (step, ms, loop thread cpu ms, batch) {slow}, "
           f"joins {[round(j, 1) for j in m.join_ms]} ms, host {host}, load {os.getloadavg()[0]:.1f}")
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values["personaplex_sessions_refused_total"] == 1
    assert values["personaplex_step_misses_total"] == m.misses
    slowdowns = [round(canary.slowdown(a, b), 1) for a, b in m.miss_spans]
    msg += f", canary slowdown at the misses {slowdowns}, bare step p50 before/after {bare[0]:.0f}/{bare[1]:.0f} ms"
    host_took_cpu = host.get("steal_s", 0) >= 0.2 or host.get("nr_throttled", 0) > 0
    if m.misses and (max(bare) > 40 or host_took_cpu or min(slowdowns) >= 1.8):
        warnings.warn(f"the machine lost CPU speed during the run, misses not counted: {msg}")
    else:
        assert m.misses == 0, msg


def test_malformed_idle_and_oversized_clients_are_closed(tiny_model):
    async def bad(port, payload=None, send_nothing=False, query="voice_prompt=NATF0.pt"):
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"http://127.0.0.1:{port}/api/chat?{query}",
                                    max_msg_size=0) as ws:
                msg = await ws.receive(timeout=30)
                if msg.data[:1] != b"\x00":
                    return "refused", msg.data[1:].decode()
                if not send_nothing:
                    for part in payload if isinstance(payload, list) else [payload]:
                        await ws.send_bytes(part)
                t0 = time.monotonic()
                err = None
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x05":
                        err = msg.data[1:].decode()
                return ws.close_code, err, time.monotonic() - t0

    from engine.audio.opus import OggOpusWriter, ogg_page

    # Opus bombs: 2-byte packets of 120 ms each (six empty 20 ms frames)
    w = OggOpusWriter()
    head = w.headers()
    bomb = b"\x01" + head + b"".join(ogg_page(b"\xfb\x06", 0, w.serial, 2 + i) for i in range(20))
    pages = [b"".join(ogg_page(b"\xfb\x06", 0, w.serial, 2 + 8 * k + i) for i in range(8)) for k in range(12)]
    flood = [b"\x01" + head + pages[0]] + [b"\x01" + p for p in pages[1:]]   # 0.96 s a message, at once

    async def scenario(port, server):
        good = [asyncio.create_task(_client(port, 5.0, seed=i)) for i in range(2)]
        await asyncio.sleep(0.5)
        outs = await asyncio.gather(
            bad(port, b"\x09nonsense"),                       # unknown kind
            bad(port, b"\x01" + b"not an ogg stream" * 4),   # broken Opus
            bad(port, b"\x01" + bytes(200_000)),             # oversized
            bad(port, send_nothing=True),                    # idle
            bad(port, query="voice_prompt=NOBODY.pt"),       # bad query
            bad(port, bomb),                                 # 2.4 s of audio in 700 bytes
            bad(port, flood),                                # 11.5 s of audio at once
        )
        return outs, await asyncio.gather(*good), server.metrics

    outs, good, m = _run_server(tiny_model, scenario, max_sessions=8, idle_timeout=1.5)
    kind, opus, big, idle, query, bombed, flooded = outs
    assert bombed[0] == 1003 and "more than 1 s of audio" in bombed[1]
    assert flooded[0] == 1003 and "faster than real time" in flooded[1]
    assert kind[0] == 1003 and "0x09" in kind[1]
    assert opus[0] == 1003 and "Ogg/Opus" in opus[1]
    assert big[0] in (1009, 1003)
    assert idle[0] == 1000 and "idle" in idle[1] and 1.0 < idle[2] < 5.0
    assert query[0] == "refused" and "unknown voice_prompt" in query[1]
    for r in good:  # the well-behaved sessions kept streaming (loose bounds: shared, loaded CPU)
        assert r["error"] is None and r["samples"] >= 0.8 * r["frames_sent"] * FRAME, r["samples"]
        assert r["max_gap_s"] < 1.0
    assert m.closed_error >= 5 and m.closed_idle == 1 and m.refused == 1


def test_static_page_and_voices(tiny_model):
    async def scenario(port, server):
        return (await _get(port, "/"), await _get(port, "/static/app.js"),
                await _get(port, "/api/voices"))

    index, js, voices = _run_server(tiny_model, scenario)
    assert index[0] == 200 and "<html" in index[1].lower() and "app.js" in index[1]
    assert js[0] == 200 and "getUserMedia" in js[1] and "echoCancellation" in js[1]
    assert voices[0] == 200 and "NATF0.pt" in voices[1]


def test_inbox_and_outbox_are_bounded(tiny_model):
    """A client sending too fast loses its oldest input frames; a client reading too slowly loses
    output frames (before Opus encoding, so its Ogg stream stays valid); both are counted and
    nothing ever waits."""
    from engine.server.app import ChatServer, ServerConfig, _Conn
    from engine.server.loop import Inbox, Metrics

    m = Metrics()
    ib = Inbox(4, m)
    ib.push(np.arange(10 * FRAME, dtype=np.float32))              # 10 frames into room for 4
    assert (ib.frames, ib.dropped_frames, m.in_dropped_frames) == (4, 6, 6)
    out = np.empty(FRAME, np.float32)
    assert ib.take(out) and out[0] == 6 * FRAME                    # the newest 4 frames remain
    for _ in range(3):
        assert ib.take(out)
    assert not ib.take(out) and not out.any() and m.in_underrun_frames == 1

    async def slow_client():
        server = ChatServer(tiny_model, ServerConfig(outbox_messages=8))
        conn = _Conn(server, None, P.parse_query({}, server.voices))
        t0 = time.perf_counter()
        for i in range(50):                                        # nobody drains the outbox
            conn._deliver(np.zeros(FRAME, np.float32), 3)
        return conn, server, time.perf_counter() - t0

    conn, server, dt = asyncio.run(slow_client())
    assert conn.outbox.qsize() <= 8 and conn.out_dropped >= 42
    assert server.metrics.out_dropped_frames == conn.out_dropped and dt < 1.0
    # what was queued is a valid Ogg/Opus stream
    reader = sphn.OpusStreamReader(24000)
    n = 0
    while not conn.outbox.empty():
        msg = conn.outbox.get_nowait()
        assert msg[0] == P.AUDIO
        pcm = reader.append_bytes(msg[1:])
        n += 0 if pcm is None else len(pcm)
    assert n >= 5 * FRAME


def test_cli_starts_serves_health_and_rejects_bad_args(tmp_path, capsys):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    bad = subprocess.run([sys.executable, "-m", "engine.serve", "--model", "tiny", "--max-sessions", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--max-sessions=0" in bad.stderr
    cpu = subprocess.run([sys.executable, "-m", "engine.serve", "--model", "tiny", "--fused", "depformer"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert cpu.returncode == 2 and "--fused depformer needs MLX's CUDA backend" in cpu.stderr, cpu.stderr
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--model", "tiny", "--port", "0",
                             "--max-sessions", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = ""
        t0 = time.monotonic()
        while "serving on" not in line and time.monotonic() - t0 < 120:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "serving on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        status, body = asyncio.run(_get(port, "/healthz"))
        assert status == 200 and '"max_sessions": 2' in body
        # the realtime client CLI against it: a session with continuous audio back, exit 0
        client = [sys.executable, "-m", "engine.server.client", "--url", f"http://127.0.0.1:{port}"]
        from engine.audio.wav import write_wav
        wav = tmp_path / "me.wav"
        write_wav(wav, speechlike(0.5, 1)[::3], 8000)        # 8 kHz, shorter than --seconds: resampled, looped
        ok = subprocess.run(client + ["--seconds", "1.5", "--wav", str(wav)], capture_output=True, text=True,
                            env=env, timeout=120)
        assert ok.returncode == 0 and "1/1 clients got continuous audio" in ok.stdout, ok.stdout + ok.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    gone = subprocess.run(client + ["--seconds", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert gone.returncode == 1 and "cannot reach" in gone.stderr
    bad = subprocess.run(client + ["--clients", "0"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--clients" in bad.stderr
    from engine.server.client import main as client_main
    assert client_main(["--nice", "20"]) == 2 and "--nice 20: use 0" in capsys.readouterr().err


def test_static_dir_option_serves_another_client(tiny_model, tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text("<html><script src='/assets/main.js'></script></html>")
    (tmp_path / "assets" / "main.js").write_text("console.log('reference client')")

    async def scenario(port, server):
        return await _get(port, "/"), await _get(port, "/assets/main.js"), await _get(port, "/healthz")

    index, asset, health = _run_server(tiny_model, scenario, static_dir=tmp_path)
    assert index == (200, "<html><script src='/assets/main.js'></script></html>")
    assert asset[0] == 200 and "reference client" in asset[1] and health[0] == 200


def test_fused_choice_maps_the_cli_names():
    from engine.errors import EngineError
    from engine.server.batch import DEFAULT_FUSED_PARTS, FUSED_CHOICES, FUSED_PARTS, fused_choice
    from engine.server.loop import StepLoop
    assert fused_choice("auto") == ("auto", DEFAULT_FUSED_PARTS) == (StepLoop.fused, StepLoop.fused_parts)
    assert fused_choice("off")[0] is False
    assert fused_choice("all") == (True, FUSED_PARTS)
    assert fused_choice("attention") == (True, ("attention",))
    with pytest.raises(EngineError, match="choose one of"):
        fused_choice("temporal")                  # the batched temporal kernel was removed
    assert set(FUSED_CHOICES) == {"auto", "off", "all", *FUSED_PARTS}
    from engine.serve import build_parser
    fused_opt = next(a for a in build_parser()._actions if a.dest == "fused")
    assert tuple(fused_opt.choices) == FUSED_CHOICES and fused_opt.default == "auto"
    with pytest.raises(EngineError, match="choose one of auto"):
        fused_choice("mimi")


def test_loop_failure_at_startup_is_reported(tiny_model):
    """A loop that cannot start (here: the CUDA-only batched kernels asked for on the CPU) ends
    at once with `failure` set and `running` false (what /healthz reports), not silently."""
    from engine.models.fused import FusedUnavailable
    from engine.server.loop import Metrics, StepLoop

    loop = StepLoop(tiny_model, Metrics(), capacity=2)
    assert loop.failure is None
    loop.fused = True
    loop.start()
    t0 = time.monotonic()
    while loop.running and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    assert not loop.running and isinstance(loop.failure, FusedUnavailable)
    assert "CUDA" in str(loop.failure)
    with pytest.raises(FusedUnavailable):
        loop.stop(timeout=5)


def test_loop_collects_garbage_between_steps_only(tiny_model):
    """While the step loop runs, automatic garbage collection is off (no pause inside a step);
    the loop collects after each step itself, and restores the collector when it stops."""
    import gc
    import threading

    from engine.models.gen import SamplingParams as SP
    from engine.server.batch import SlotParams
    from engine.server.loop import Inbox, Metrics, Slot, StepLoop

    metrics = Metrics()
    loop = StepLoop(tiny_model, metrics, capacity=1)
    inbox = Inbox(8, metrics)
    joined, during, errors = threading.Event(), [], []
    slot = Slot("NATF0", None, SlotParams(SP(), 1), inbox, lambda err: (errors.append(err), joined.set()),
                lambda pcm, text: during.append(gc.isenabled()))
    assert gc.isenabled()
    loop.join(slot)
    loop.start()
    assert joined.wait(60) and errors == [None]
    for _ in range(6):
        inbox.push(np.zeros(FRAME, np.float32))
    t0 = time.monotonic()
    while len(during) < 5 and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    loop.stop(timeout=30)
    assert len(during) >= 5 and not any(during)
    assert len(metrics.gc_ms) >= 5 and gc.isenabled()
    assert "personaplex_gc_ms_max" in metrics.prometheus(1)


@pytest.mark.quiet
def test_new_prompt_is_prepared_in_the_slack_between_steps(tiny_model):
    """A session whose (voice, prompt) is not cached is prepared in prefill chunks after the steps
    (no step misses its deadline meanwhile), then joins; its state equals the one-shot prompt
    phases. A session leaving while prepared is dropped; a bad voice is that session's error.
    Marked `quiet`: the preparation fills most of each tick's slack, so a machine busy with other
    work (a unit of preparation taking several times its estimate) could delay a step."""
    import threading

    import mlx.core as mx

    from engine import persona
    from engine.models.gen import SamplingParams as SP
    from engine.server.batch import SlotParams
    from engine.server.loop import Inbox, Metrics, Slot, StepLoop

    metrics = Metrics()
    loop = StepLoop(tiny_model, metrics, compiled=True, capacity=4, warm=[("NATF0", None)])
    loop.prep_max_chunk = 2                      # many small units, so they spread over ticks
    events: dict = {}

    def make(name, voice, prompt):
        ev = threading.Event()
        events[name] = (ev, [])
        return Slot(voice, prompt, SlotParams(SP(), 1), Inbox(8, metrics),
                    lambda err: (events[name][1].append(err), ev.set()), lambda pcm, text: None)

    # ~500 text tokens: ~260 units of prefill, ~0.4 s of work on the 2-core CI machine, so it cannot
    # fit in one tick's slack (< 80 ms) on any machine within 5x of it; a short prompt (~50 ms of
    # work) fitted in one tick's slack whenever the machine was quick and made this test flaky.
    prompt = ("You are a patient tutor. Explain trains, slowly, to a curious child. " * 12
              + tiny_model.__class__.__name__)
    assert not tiny_model.prompts.ready("NATF1", prompt)
    a, b = make("a", "NATF0", None), make("b", "NATF0", None)
    for s in (a, b):
        loop.join(s)
    loop.start()
    try:
        assert events["a"][0].wait(60) and events["b"][0].wait(60)
        steps0 = metrics.steps
        new, gone, bad = make("new", "NATF1", prompt), make("gone", "NATF2", "Another new one"), make("bad", "NOBODY", None)
        loop.join(new)
        loop.join(gone)
        loop.leave(gone)
        loop.join(bad)
        assert events["new"][0].wait(60) and events["new"][1] == [None]
        assert events["bad"][0].wait(30) and "NOBODY" in str(events["bad"][1][0])
        t0 = time.monotonic()
        while metrics.steps < steps0 + 30 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
    finally:
        loop.stop(timeout=30)
    assert not events["gone"][0].is_set() and not loop._preparing
    assert metrics.prompts_prepared == 1
    spread = list(metrics.prep_ms)
    assert sum(spread) > 2 * 80, spread                # the work needed more than two ticks' slack...
    assert len(spread) >= 3, spread                    # ...and took the slack of several ticks
    assert metrics.misses == 0, (metrics.misses, max(metrics.step_ms), spread)
    assert max(metrics.batch_sizes) == 3

    # the state prepared chunk by chunk == the prompt phases run in one go
    def reference():
        st = tiny_model.gen.new_state(1, seed=0)
        text = persona.resolve_prompt(prompt)
        tiny_model.gen.run_prompts(st, voice=tiny_model._voice("NATF1"),
                                   text_tokens=persona.encode_system_prompt(text, tiny_model.sp))
        assert tiny_model.prompts.ready("NATF1", prompt)                    # prepared by the loop
        got = tiny_model.prompts.state("NATF1", prompt, 0, warm=False)     # a copy of that state
        mx.eval(st.tokens, got.tokens)
        return (np.array(st.tokens), np.array(got.tokens), st.offset, got.offset,
                [np.array(x) for x in st.cache.arrays()], [np.array(x) for x in got.cache.arrays()])

    want_t, got_t, want_o, got_o, want_kv, got_kv = tiny_model.worker.call(reference)
    assert got_o == want_o and np.array_equal(got_t, want_t)
    for w, g in zip(want_kv, got_kv):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_joins_are_spread_over_ticks(tiny_model):
    """Five sessions connecting at once join at most `max_joins_per_step` (2) per tick: two before
    the first step, then at most two between steps (in the slack, so on a slow machine a join may
    wait a tick or more: the sizes are 2, 4, 5 or 2, 4, 4, 5 ...)."""
    import threading

    from engine.models.gen import SamplingParams as SP
    from engine.server.batch import SlotParams
    from engine.server.loop import Inbox, Metrics, Slot, StepLoop

    metrics = Metrics()
    loop = StepLoop(tiny_model, metrics, capacity=5, warm=[("NATF0", None)])
    done = threading.Semaphore(0)
    slots = [Slot("NATF0", None, SlotParams(SP(), i), Inbox(8, metrics), lambda err: done.release(),
                  lambda pcm, text: None) for i in range(5)]
    for s in slots:
        loop.join(s)
    loop.start()
    try:
        for _ in slots:
            assert done.acquire(timeout=60)
        t0 = time.monotonic()
        while 5 not in list(metrics.batch_sizes) and time.monotonic() - t0 < 30:
            time.sleep(0.02)
    finally:
        loop.stop(timeout=30)
    sizes = list(metrics.batch_sizes)
    assert sizes[0] == 2 and 5 in sizes and len(metrics.join_ms) == 5, sizes
    assert all(0 <= b - a <= 2 for a, b in zip(sizes, sizes[1:])), sizes


def test_a_waiting_join_keeps_its_prompted_state(tiny_model):
    """A session whose prompt is cached waits for slack to join; meanwhile the prompt cache drops
    that prompt (it keeps a few: others arrived). The session still joins with no prefill in the
    tick: it took its prompted state when it was admitted."""
    from engine.server.batch import BatchEngine, SlotParams
    from engine.server.loop import Inbox, Metrics, Slot, StepLoop

    metrics = Metrics()
    loop = StepLoop(tiny_model, metrics, capacity=2, warm=[("NATF0", None)])
    joined, prefills = [], []
    slot = Slot("NATF0", "Be brief.", SlotParams(SamplingParams(), 1), Inbox(8, metrics), joined.append,
                lambda pcm, text: None)

    def run():
        prompts, gen = tiny_model.prompts, tiny_model.gen
        prompts.state("NATF0", "Be brief.", 0)
        be, active = BatchEngine(tiny_model, capacity=2), {}
        loop.join(slot)
        loop._join_unit_s = 0.050                             # a join takes longer than the slack
        loop._admit(be, active, time.perf_counter() + 0.010)
        waiting = be.size
        kept = dict(prompts._states)
        prompts._states.clear()                               # the cache dropped the prompt meanwhile
        real = gen.prompt_steps
        gen.prompt_steps = lambda *a, **k: (prefills.append(a), real(*a, **k))[1]
        try:
            loop._admit(be, active, None)
        finally:
            del gen.prompt_steps
            prompts._states.update(kept)
        return waiting, be.size

    waiting, size = tiny_model.worker.call(run)
    assert waiting == 0 and size == 1 and joined == [None] and prefills == []


def test_joins_wait_for_slack_but_not_forever(tiny_model):
    """With live sessions, a join is made only when it is expected to end before the next tick
    starts; after `join_max_wait_ticks` ticks without such slack it is made anyway (one per tick)."""
    from engine.models.gen import SamplingParams as SP
    from engine.server.batch import BatchEngine, SlotParams
    from engine.server.loop import Inbox, Metrics, Slot, StepLoop

    metrics = Metrics()
    loop = StepLoop(tiny_model, metrics, capacity=4, warm=[("NATF0", None)])
    joined = []
    slots = [Slot("NATF0", None, SlotParams(SP(), i), Inbox(8, metrics), joined.append,
                  lambda pcm, text: None) for i in range(3)]

    def run():
        tiny_model.prompts.state("NATF0", None, 0)          # the prompt cache: no prompt job
        be, active = BatchEngine(tiny_model, capacity=4), {}
        for s in slots:
            loop.join(s)
        loop._admit(be, active, None)                         # nobody live: no deadline, 2 per tick
        sizes = [be.size]
        loop._join_unit_s = 0.050                             # joins are slow here ...
        for _ in range(loop.join_max_wait_ticks):             # ... and the next tick is 10 ms away
            loop._admit(be, active, time.perf_counter() + 0.010)
            sizes.append(be.size)
        loop._admit(be, active, time.perf_counter() + 0.010)  # waited long enough: joins anyway
        sizes.append(be.size)
        return sizes, loop._join_wait

    sizes, wait = tiny_model.worker.call(run)
    assert sizes == [2] * (loop.join_max_wait_ticks + 1) + [3] and wait == 0
    assert joined == [None, None, None]
