"""Generator tests: PersonaPlex golden fixtures (tests/fixtures/make_gen_golden.py), prompt prefill,
depformer modes, batching, sampling, state snapshots, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from safetensors import safe_open

from engine.errors import ConfigError
from engine.models.gen import (SILENCE_TOKENS, SINE_TOKENS, GenState, LmGen, PromptCache, SamplingParams,
                               StepOutput, VoicePrompt)
from engine.models.lm import LM, LmConfig

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "gen"
GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def fixture():
    cfg = json.loads((FIX / "config.json").read_text())
    with safe_open(str(FIX / "weights.safetensors"), "np") as f:
        meta = f.metadata()
        weights = {k: mx.array(f.get_tensor(k).astype(np.float32) * np.float32(2.0 ** -int(meta[k])))
                   for k in f.keys()}
    golden = dict(np.load(FIX / "golden.npz"))
    return cfg, weights, golden


def make_lm(fixture, **overrides) -> LM:
    cfg, weights, _ = fixture
    return LM.from_weights(weights, LmConfig.from_dict(dict(cfg["lm_kwargs"], **overrides)), dtype=mx.float32)


@pytest.fixture(scope="module")
def lm(fixture):
    return make_lm(fixture)


def frame(o: StepOutput | None, batch: int) -> np.ndarray:
    if o is None:
        return np.full((batch, 17), -1, dtype=np.int32)
    return np.concatenate([np.array(o.text)[:, None], np.array(o.agent_codes), np.array(o.user_codes)], 1)


def run_live(gen: LmGen, state: GenState, user: np.ndarray) -> np.ndarray:
    """user (B, T, 8) -> frames (T, B, 17) with -1 where step returned None (the fixture layout)."""
    return np.stack([frame(gen.step(state, user_codes=user[:, i]), user.shape[0]) for i in range(user.shape[1])])


def first_diff(a, b):
    d = np.nonzero((a != b).reshape(len(a), -1).any(axis=1))[0]
    return None if len(d) == 0 else int(d[0])


# ---------------------------------------------------------------- golden fixtures (reference LMGen)
@pytest.mark.parametrize("mode", ["exact", "live"])
def test_golden_no_prompt_batch2(lm, fixture, mode):
    golden = fixture[2]
    gen = LmGen(lm, GREEDY, depformer_mode=mode)
    out = run_live(gen, gen.new_state(2, seed=0), golden["user_plain"])
    assert (out[:2] == -1).all() and (out[2:] >= 0).all()  # calls 0 and 1 return None
    assert first_diff(out, golden["out_plain"]) is None


@pytest.mark.parametrize("mode", ["exact", "live"])
@pytest.mark.parametrize("voice_form", ["codes", "embeddings"])
def test_golden_with_prompts(lm, fixture, mode, voice_form):
    cfg, _, golden = fixture
    gen = LmGen(lm, GREEDY, depformer_mode=mode)
    if voice_form == "codes":
        voice, expected = VoicePrompt.from_codes(golden["voice_codes"]), golden["out_audio"]
    else:
        voice, expected = VoicePrompt(golden["voice_embeddings"], golden["voice_ring"]), golden["out_embed"]
    state = gen.new_state(1, seed=0)
    gen.run_prompts(state, voice, cfg["text_prompt"], silence_frames=cfg["silence_frames"])
    out = run_live(gen, state, golden["user_prompt"])
    assert first_diff(out, expected) is None


def test_voice_prompt_from_codes_matches_reference_pt(lm, fixture):
    golden = fixture[2]
    vp = LmGen(lm).voice_prompt_from_codes(golden["voice_codes"])
    assert vp.embeddings.shape == golden["voice_embeddings"].shape  # N-1 embeddings for N frames
    np.testing.assert_allclose(vp.embeddings, golden["voice_embeddings"], atol=1e-6)
    np.testing.assert_array_equal(vp.cache, golden["voice_ring"])


def test_golden_kv_window(fixture):
    """60 steps through a KV ring of 11 slots. The PersonaPlex fork's RingKVCache masks the slot it is
    about to overwrite once full, so its context=12 attends to 11 positions: our context=11 reproduces it."""
    cfg, _, golden = fixture
    lm = make_lm(fixture, context=cfg["window_context"] - 1)
    gen = LmGen(lm, GREEDY)
    state = gen.new_state(1, seed=0)
    nbytes = state.cache.nbytes
    out = run_live(gen, state, golden["user_window"])
    assert golden["user_window"].shape[1] > 4 * lm.config.context
    assert state.cache.nbytes == nbytes  # memory bounded by the context, not the conversation
    assert first_diff(out, golden["out_window"]) is None


# ---------------------------------------------------------------- step semantics
def test_first_call_discards_its_inputs(lm, fixture):
    user = fixture[2]["user_plain"][:1, :12]
    gen = LmGen(lm, GREEDY)
    a, b = gen.new_state(1), gen.new_state(1)
    assert gen.step(a, user_codes=user[:, 0]) is None
    assert gen.step(b, user_codes=(user[:, 0] + 1) % 2048, agent_codes=user[:, 0], text_token=5) is None
    assert a.offset == b.offset == 1
    assert a.cache.step == b.cache.step == 0  # no model run on the first call
    assert gen.step(a, user_codes=user[:, 1]) is None and a.cache.step == 1
    assert gen.step(b, user_codes=user[:, 1]) is None
    # Delay-0 cells of call 0 were replaced by BOS at once, delay-1 cells by BOS in call 1.
    np.testing.assert_array_equal(np.array(a.tokens), np.array(b.tokens))
    rest = user[:, 2:]
    np.testing.assert_array_equal(run_live(gen, a, rest), run_live(gen, b, rest))
    assert (run_live(gen, gen.new_state(1), user)[2:] >= 0).all()


def test_user_codes_echo_undelayed(lm, fixture):
    user = fixture[2]["user_plain"][:1, :10]
    gen = LmGen(lm, GREEDY)
    out = run_live(gen, gen.new_state(1), user)
    # call o returns frame o-1: the user's codes of call o-1, all 8 codebooks aligned.
    np.testing.assert_array_equal(out[3:, 0, 9:], user[0, 2:9])


def test_teacher_forcing_agent_and_text(lm, fixture):
    """Forced agent codes / text come back verbatim in the output frame and steer the next step."""
    golden = fixture[2]
    user = golden["user_plain"][:1, :10]
    forced = golden["user_plain"][1:, :10]
    gen = LmGen(lm, GREEDY)
    state = gen.new_state(1)
    outs = [frame(gen.step(state, user_codes=user[:, i], agent_codes=forced[:, i], text_token=100 + i), 1)
            for i in range(10)]
    for o in range(3, 10):
        np.testing.assert_array_equal(outs[o][0, 1:9], forced[0, o - 1])
        assert outs[o][0, 0] == 100 + o - 1


def test_live_equals_exact_when_sampling(lm, fixture):
    user = fixture[2]["user_plain"][:1, :20]
    sp = SamplingParams(temp_text=1.0, temp_audio=1.0, top_k_text=50, top_k_audio=100)
    outs = [run_live(LmGen(lm, sp, depformer_mode=m), LmGen(lm, sp).new_state(1, seed=3), user)
            for m in ("live", "exact")]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_batch_of_two_equals_two_single_runs(lm, fixture):
    user = fixture[2]["user_plain"][:, :20]
    gen = LmGen(lm, GREEDY)
    both = run_live(gen, gen.new_state(2), user)
    for b in range(2):
        np.testing.assert_array_equal(both[:, b:b + 1], run_live(gen, gen.new_state(1), user[b:b + 1]))


def test_seeded_sampling_is_deterministic(lm, fixture):
    user = fixture[2]["user_plain"][:1, :15]
    gen = LmGen(lm)  # reference defaults: temp 0.7 / 0.8, top-k 25 / 250
    a = run_live(gen, gen.new_state(1, seed=11), user)
    b = run_live(gen, gen.new_state(1, seed=11), user)
    c = run_live(gen, gen.new_state(1, seed=12), user)
    np.testing.assert_array_equal(a, b)
    assert (a[2:, :, :9] != c[2:, :, :9]).any()
    greedy = run_live(LmGen(lm, GREEDY), gen.new_state(1), user)
    assert (a[2:, :, :9] != greedy[2:, :, :9]).any()


# ---------------------------------------------------------------- prompts
def _prompt_args(fixture):
    cfg, _, golden = fixture
    return VoicePrompt(golden["voice_embeddings"], golden["voice_ring"]), cfg["text_prompt"]


@pytest.mark.parametrize("voice_form", ["codes", "embeddings"])
def test_batched_prefill_equals_stepping(lm, fixture, voice_form):
    golden = fixture[2]
    voice, text = _prompt_args(fixture)
    if voice_form == "codes":
        voice = VoicePrompt.from_codes(golden["voice_codes"])
    gen = LmGen(lm)
    a, b = gen.new_state(2, seed=5), gen.new_state(2, seed=5)
    gen.run_prompts(a, voice, text, batched=True)
    gen.run_prompts(b, voice, text, batched=False)
    assert a.offset == b.offset == voice.num_frames + 2 * 6 + len(text) + (voice_form == "embeddings")
    np.testing.assert_array_equal(np.array(a.tokens), np.array(b.tokens))
    np.testing.assert_array_equal(a.provided, b.provided)
    np.testing.assert_array_equal(np.array(a.key), np.array(b.key))
    assert a.cache.step == b.cache.step
    for x, y in zip(a.cache.arrays(), b.cache.arrays()):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=2e-5)
    user = golden["user_plain"][:, :12]
    np.testing.assert_array_equal(run_live(gen, a, user), run_live(gen, b, user))  # sampling, same keys


def test_prefill_chunks_respect_small_context(fixture):
    """A prompt longer than the KV window: prefill must fall back to steps that keep the window exact."""
    lm = make_lm(fixture, context=20)
    golden = fixture[2]
    gen = LmGen(lm, GREEDY)
    voice = VoicePrompt.from_codes(golden["voice_codes"])
    text = fixture[0]["text_prompt"] * 2
    a, b = gen.new_state(1), gen.new_state(1)
    gen.run_prompts(a, voice, text, batched=True)
    gen.run_prompts(b, voice, text, batched=False)
    assert a.cache.step > lm.config.context
    for x, y in zip(a.cache.arrays(), b.cache.arrays()):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=2e-5)
    user = golden["user_plain"][:1, :8]
    np.testing.assert_array_equal(run_live(gen, a, user), run_live(gen, b, user))


def test_prompt_phases_force_reference_tokens(lm):
    """After the prompts the ring holds the silence tokens the first live frames are built from."""
    gen = LmGen(lm, GREEDY)
    state = gen.new_state(1)
    gen.run_prompts(state, None, [5, 6])
    assert state.offset == 6 + 2 + 6
    o = gen.step(state, user_codes=np.array([SINE_TOKENS]))
    # The first live frame is the last silence-prompt frame: forced PAD text and silence codes.
    assert int(o.text[0]) == 3
    np.testing.assert_array_equal(np.array(o.agent_codes[0]), SILENCE_TOKENS)
    np.testing.assert_array_equal(np.array(o.user_codes[0]), SINE_TOKENS)


def test_state_copy_reuses_prompt_state(lm, fixture):
    voice, text = _prompt_args(fixture)
    user = fixture[2]["user_plain"][:1, :10]
    gen = LmGen(lm)
    base = gen.new_state(1, seed=9)
    gen.run_prompts(base, voice, text)
    snap_tokens, snap_offset = np.array(base.tokens), base.offset
    first = run_live(gen, base.copy(), user)
    second = run_live(gen, base.copy(), user)
    np.testing.assert_array_equal(first, second)
    assert base.offset == snap_offset
    np.testing.assert_array_equal(np.array(base.tokens), snap_tokens)


def test_prompt_cache_builds_once_per_pair_and_copies(lm, fixture):
    """PromptCache: the resolver's inputs are read only on a miss; the state equals the prompt
    phases run directly; `job` yields between prefill chunks; copies get the seed's key; the
    warm-up runs once per pair; batch sizes are separate entries."""
    voice, text = _prompt_args(fixture)
    user = fixture[2]["user_plain"][:1, :8]
    gen = LmGen(lm)
    gen.prefill_guard = False                  # chunks of max_chunk from the start (no timed probe)
    loads = []

    def resolve(v, p):
        def inputs():
            loads.append((v, p))
            return (voice if v == "V" else None), (text if p else [])
        return (v, p), inputs

    cache = PromptCache(gen, resolve)
    assert not cache.ready("V", "T") and len(cache) == 0
    job = cache.job("V", "T", 3, warm=False, max_chunk=4)
    units = 0
    while True:
        try:
            next(job)
            units += 1
        except StopIteration as done:
            a = done.value
            break
    want = gen.new_state(1, seed=3)
    gen.run_prompts(want, voice, text)
    model_calls = want.offset - 1               # every voice step, both silences, the text
    assert units == -(-model_calls // 4) - 1 > 3 and cache.ready("V", "T") and loads == [("V", "T")]
    assert a.offset == want.offset
    np.testing.assert_array_equal(np.array(a.tokens), np.array(want.tokens))
    np.testing.assert_array_equal(np.array(a.key), np.array(mx.random.key(3)))
    for x, y in zip(a.cache.arrays(), want.cache.arrays()):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=2e-5)
    # cached: no new load, no model work (the job ends at once); same seed, same conversation
    job = cache.job("V", "T", 3, warm=False)
    with pytest.raises(StopIteration):
        next(job)
    b, c = cache.state("V", "T", 3), cache.state("V", "T", 4)
    assert loads == [("V", "T")] and len(cache._warmed) == 1
    np.testing.assert_array_equal(run_live(gen, a, user), run_live(gen, b, user))
    assert (run_live(gen, cache.state("V", "T", 3), user) != run_live(gen, c, user)).any()
    # another pair and another batch size are new entries
    d = cache.state(None, "", 0, batch_size=2, warm=False)
    assert d.batch_size == 2 and d.offset == 2 * 6 and len(cache) == 2
    assert loads == [("V", "T"), (None, "")] and cache.ready(None, "", 2) and not cache.ready(None, "")


def test_prompt_cache_keeps_at_most_max_states(lm):
    """Each cached state holds a whole KV ring, so the cache is bounded: past `max_states` the
    least recently used pair is dropped (counted) and rebuilt on demand, to the same state; a
    conversation's copy outlives its entry's eviction."""
    gen = LmGen(lm)
    loads = []

    def resolve(v, p):
        def inputs():
            loads.append(p)
            return None, [5 + p, 9, 11 + p]
        return ("prompt", p), inputs

    cache = PromptCache(gen, resolve, max_states=2)
    first = cache.state(None, 0, 1, warm=False)
    cache.state(None, 1, 1, warm=False)
    cache.state(None, 0, 1, warm=False)                # 0 is now the most recently used
    cache.state(None, 2, 1, warm=False)                # evicts 1, not 0
    assert loads == [0, 1, 2] and len(cache) == 2 and cache.evictions == 1
    assert cache.ready(None, 0) and not cache.ready(None, 1) and cache.ready(None, 2)
    again = cache.state(None, 1, 1, warm=False)         # rebuilt (evicts 0)
    assert loads == [0, 1, 2, 1] and cache.evictions == 2 and not cache.ready(None, 0)
    rebuilt = cache.state(None, 0, 1, warm=False)
    assert again.offset == first.offset
    assert not np.array_equal(np.array(again.cache.keys[0]), np.array(rebuilt.cache.keys[0]))
    user = np.random.default_rng(0).integers(0, lm.config.card, (1, 6, 8)).astype(np.int32)
    np.testing.assert_array_equal(run_live(gen, first, user), run_live(gen, rebuilt, user))
    with pytest.raises(ConfigError):
        PromptCache(gen, resolve, max_states=0)


def test_probe_sees_both_stages(lm):
    gen = LmGen(lm, GREEDY)
    state = gen.new_state(1)
    stages = []
    for _ in range(3):
        gen.step(state, user_codes=np.zeros((1, 8), np.int32), probe=stages.append)
    assert stages == ["temporal", "depformer"] * 2


# ---------------------------------------------------------------- errors
def test_bad_arguments_raise_config_error(lm):
    gen = LmGen(lm)
    state = gen.new_state(2)
    with pytest.raises(ConfigError, match="user_codes"):
        gen.step(state, user_codes=np.zeros((1, 8), np.int32))
    with pytest.raises(ConfigError, match="outside"):
        gen.step(state, user_codes=np.full((2, 8), 2048))
    with pytest.raises(ConfigError, match="text_token"):
        gen.step(state, text_token=5000)
    with pytest.raises(ConfigError, match="depformer_mode"):
        LmGen(lm, depformer_mode="fast")
    with pytest.raises(ConfigError, match="temp_audio"):
        SamplingParams(temp_audio=-1)
    with pytest.raises(ConfigError, match="top_k_text"):
        SamplingParams(top_k_text=2.5)
    with pytest.raises(ConfigError, match="batch_size"):
        gen.new_state(0)
    with pytest.raises(ConfigError, match="text prompt token"):
        gen.run_prompts(gen.new_state(1), None, [lm.config.text_card])
    with pytest.raises(ConfigError, match="width"):
        gen.run_prompts(gen.new_state(1), VoicePrompt(np.zeros((3, 7), np.float32), np.zeros((17, 4), np.int64)))
    with pytest.raises(ConfigError, match="codes or embeddings"):
        VoicePrompt(np.zeros((3, 7), np.float32), np.zeros((17, 4)), codes=np.zeros((8, 2), np.int64))
    with pytest.raises(ConfigError, match="voice codes"):
        gen.run_prompts(gen.new_state(1), VoicePrompt.from_codes(np.full((8, 3), 4096)))


# ---------------------------------------------------------------- PyPI moshi 0.2.13 LMGen (oracle)
@pytest.mark.oracle
def test_pypi_moshi_lmgen_dep_q8_greedy(fixture):
    """PyPI moshi's LMGen has no teacher forcing, no prompts, a 3-column ring and runs the model on its first
    call. With dep_q 8 (Moshiko layout: user streams never sampled) its semantics coincide with PersonaPlex's
    shifted by one call: our call o+1 returns exactly its call o (text + 8 agent codebooks), greedy.
    PersonaPlex's dep_q 16 generator has no PyPI counterpart; the golden fixtures cover it."""
    torch = pytest.importorskip("torch")
    pypi_lm = pytest.importorskip("moshi.models.lm")
    if "/.ref/" in pypi_lm.__file__:
        pytest.skip("the PersonaPlex fork shadows PyPI moshi in this process")
    kwargs = dict(fixture[0]["lm_kwargs"], dep_q=8)
    # PyPI's LMModel passes `causal` to the depformer itself and rejects depformer_causal.
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "depformer_causal"}
    torch.manual_seed(1)
    ref = pypi_lm.LMModel(device="cpu", dtype=torch.float32, **ref_kwargs).eval()
    weights = {k: mx.array(v.detach().numpy()) for k, v in ref.state_dict().items()}
    ours = LM.from_weights(weights, LmConfig.from_dict(kwargs), dtype=mx.float32)
    user = fixture[2]["user_plain"][:, :40]
    ref_gen = pypi_lm.LMGen(ref, use_sampling=False, check=True)
    ref_out = []
    with torch.no_grad(), ref_gen.streaming(2):
        for i in range(user.shape[1]):
            o = ref_gen.step(torch.from_numpy(user[:, i, :, None].astype(np.int64)))
            ref_out.append(None if o is None else o[:, :9, 0].numpy())
    gen = LmGen(ours, GREEDY, depformer_mode="exact")
    out = run_live(gen, gen.new_state(2), user)
    assert ref_out[0] is None and ref_out[1] is not None
    ref_frames = np.stack(ref_out[1:-1])                          # PyPI calls 1..T-2
    np.testing.assert_array_equal(out[2:, :, :9], ref_frames)     # our calls 2..T-1
    assert len(np.unique(ref_frames[:, :, 1])) > 5                # not a degenerate stream


# ---------------------------------------------------------------- whole-step compiled graph
@pytest.mark.parametrize("mode", ["live", "exact"])
def test_whole_step_compiled_equals_eager(fixture, mode):
    """With lm.compile() a step is one mx.compile'd graph; tokens (greedy and sampled, batch 2, after
    prompts, through a KV ring that fills up) must equal the eager path's."""
    cfg, _, golden = fixture
    eager_lm, comp_lm = make_lm(fixture, context=16), make_lm(fixture, context=16).compile()
    voice = VoicePrompt.from_codes(golden["voice_codes"])
    user = golden["user_plain"][:, :30]
    for sp in (GREEDY, SamplingParams(temp_text=1.0, temp_audio=1.0, top_k_text=50, top_k_audio=100)):
        outs = []
        for lm_ in (eager_lm, comp_lm):
            gen = LmGen(lm_, sp, depformer_mode=mode)
            state = gen.new_state(2, seed=4)
            gen.run_prompts(state, voice, cfg["text_prompt"][:3], batched=False)
            outs.append((run_live(gen, state, user), np.array(state.tokens), np.array(state.key)))
        assert ("gen" in comp_lm._compiled) and len(comp_lm._compiled["gen"]) >= 2
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
    assert (outs[0][0][2:, :, 1] != outs[0][0][2, :, 1]).any()  # tokens vary over time


def test_prefill_guard_falls_back_to_steps_when_chunks_are_slow(lm, fixture, monkeypatch):
    """The prefill guard times 2 single steps and the first chunk (fake clock here: chunks 'cost' 1 s
    per position, steps 1 ms); slow chunks switch the rest of the prefill, and later prefills, to
    T=1 steps. The result equals stepping either way."""
    import engine.models.gen as gen_mod
    golden = fixture[2]
    voice, text = VoicePrompt.from_codes(golden["voice_codes"]), fixture[0]["text_prompt"]
    clock = [0.0]
    monkeypatch.setattr(gen_mod, "time", type("T", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    sizes = []

    class SlowChunks:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def temporal(self, x, cache, **kw):
            sizes.append(x.shape[1])
            clock[0] += 1.0 * x.shape[1] if x.shape[1] > 1 else 1e-3
            return self.inner.temporal(x, cache, **kw)

    gen = LmGen(lm, GREEDY)
    gen.lm, gen.prefill_chunk = SlowChunks(lm), 8
    a, b = gen.new_state(1), gen.new_state(1)
    gen.run_prompts(a, voice, text, batched=True)
    assert gen.chunk_ok is False and sizes[:3] == [1, 1, 8] and set(sizes[3:]) == {1} and len(sizes) > 4
    sizes.clear()
    gen.run_prompts(b, voice, text, batched=True)
    assert set(sizes) == {1}                        # decision kept
    ref = LmGen(lm, GREEDY)
    c = ref.new_state(1)
    ref.run_prompts(c, voice, text, batched=False)
    for x, y in zip(a.cache.arrays(), c.cache.arrays()):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=2e-5)
    fast = LmGen(lm, GREEDY)
    fast.run_prompts(fast.new_state(1), voice, text, batched=True)
    assert fast.chunk_ok is True                     # real clock, tiny model: chunks win


def test_whole_step_traces_once_in_a_live_session(fixture):
    """Steady live stepping (user codes only) reuses one compiled graph, also when the KV ring fills
    up and wraps (context 16, 40 steps); per-call retracing would cost a GPU session dearly."""
    lm = make_lm(fixture, context=16).compile()
    gen = LmGen(lm, SamplingParams())
    state = gen.new_state(1, seed=1)
    user = fixture[2]["user_plain"][:1, :40]
    for i in range(6):
        gen.step(state, user_codes=user[:, i])
    traces = dict(lm._compiled["gen"])
    for i in range(6, 40):
        out = gen.step(state, user_codes=user[:, i])
    mx.eval(out.text)
    assert state.cache.step > 2 * lm.config.context
    assert lm._compiled["gen"] == traces and 1 <= len(traces) <= 3


def test_warmup_traces_without_touching_the_state(fixture):
    cfg, _, golden = fixture
    lm = make_lm(fixture).compile()
    gen = LmGen(lm, SamplingParams())
    state = gen.new_state(1, seed=2)
    gen.run_prompts(state, None, cfg["text_prompt"][:2])
    before = (np.array(state.tokens), state.provided.copy(), state.offset, np.array(state.key),
              [np.array(a) for a in state.cache.arrays()])
    gen.warmup(state)
    traces = dict(lm._compiled["gen"])
    assert traces
    np.testing.assert_array_equal(np.array(state.tokens), before[0])
    np.testing.assert_array_equal(state.provided, before[1])
    assert state.offset == before[2] and np.array_equal(np.array(state.key), before[3])
    for a, b in zip(state.cache.arrays(), before[4]):
        np.testing.assert_array_equal(np.array(a), b)
    user = golden["user_plain"][:1, :5]
    out = run_live(gen, state, user)
    assert lm._compiled["gen"] == traces  # the live steps reuse the warmed-up graph
    fresh = LmGen(make_lm(fixture), SamplingParams())
    ref = fresh.new_state(1, seed=2)
    fresh.run_prompts(ref, None, cfg["text_prompt"][:2])
    np.testing.assert_array_equal(out, run_live(fresh, ref, user))


def test_fused_step_off_the_gpu():
    """Without MLX's CUDA backend the generator keeps the MLX step ("auto"), and insisting on the
    fused CUDA step gives an error that says why."""
    import pytest as _pytest
    from engine.models import fused as fz
    from engine.models.gen import LmGen
    from engine.models.lm import LM, LmConfig
    if fz.cuda_backend():
        _pytest.skip("this machine has MLX's CUDA backend (tests/test_fused.py covers it)")
    lm = LM.random(LmConfig.tiny(), dtype=mx.float32, seed=0)
    assert LmGen(lm).fused_engine() is None
    with _pytest.raises(fz.FusedUnavailable, match="CUDA backend"):
        LmGen(lm, fused=True).fused_engine()
    with _pytest.raises(Exception, match="fused="):
        LmGen(lm, fused="yes")


@pytest.mark.parametrize("mode", ["exact", "live"])
def test_golden_through_the_servers_rows(lm, fixture, mode):
    """The golden fixtures through the server's batch (`BatchEngine`, whose LM part is this
    generator's own frame, `LmGen.step_rows`): the reference's two prompted sessions (voice as
    codes, voice as embeddings) as rows that join three frames apart, so they sit at different KV
    positions, ring slots and token-ring phases in every step; each row's text and agent codes
    equal the reference's, frame by frame (the Mimi codec is bypassed: the user codes go in as
    they are)."""
    from types import SimpleNamespace
    from engine.models.mimi import Mimi, MimiConfig, tiny_state_dict
    from engine.server.batch import BatchEngine, SlotParams
    cfg, _, golden = fixture
    gen = LmGen(lm, GREEDY, depformer_mode=mode)
    mcfg = MimiConfig.tiny()
    mimi = Mimi(mcfg, num_codebooks=8).load_reference_weights(tiny_state_dict(mcfg, seed=0))
    be = BatchEngine(SimpleNamespace(mimi=mimi, lm=lm, gen=gen))
    sessions = [(VoicePrompt.from_codes(golden["voice_codes"]), golden["out_audio"]),
                (VoicePrompt(golden["voice_embeddings"], golden["voice_ring"]), golden["out_embed"])]
    user = golden["user_prompt"][0]                                   # (T, 8)
    T, late = user.shape[0], 3
    done = [0, 0]
    for t in range(T + late):
        for r, (voice, _) in enumerate(sessions):
            if t == r * late:
                state = gen.new_state(1, seed=0)
                gen.run_prompts(state, voice, cfg["text_prompt"], silence_frames=cfg["silence_frames"])
                be.join(r, state, SlotParams(GREEDY))
        for r in [r for r in be.slots if done[r] == T]:
            be.leave(r)
        codes = np.stack([user[done[r]] for r in be.slots]).astype(np.int32)
        text, agent = be._lm_step(mx.array(codes))
        for i, r in enumerate(be.slots):
            expected = sessions[r][1][done[r], 0]
            got = np.concatenate([[int(np.array(text)[i])], np.array(agent)[i]])
            np.testing.assert_array_equal(got, expected[:9], err_msg=f"row {r} frame {done[r]}")
            done[r] += 1
    assert done == [T, T]


def test_golden_kv_window_through_the_servers_rows(fixture):
    """The reference's 60 frames through an 11-slot KV ring (see test_golden_kv_window) in the
    server's batch: the session steps alone for its first frames (a state must be past the first
    calls to join), then joins as a row, beside a second copy of it that joins 7 frames later; both
    rows wrap their rings at different frames and reproduce the reference."""
    from types import SimpleNamespace
    from engine.models.mimi import Mimi, MimiConfig, tiny_state_dict
    from engine.server.batch import BatchEngine, SlotParams
    cfg, _, golden = fixture
    lm = make_lm(fixture, context=cfg["window_context"] - 1)
    gen = LmGen(lm, GREEDY)
    mcfg = MimiConfig.tiny()
    mimi = Mimi(mcfg, num_codebooks=8).load_reference_weights(tiny_state_dict(mcfg, seed=0))
    be = BatchEngine(SimpleNamespace(mimi=mimi, lm=lm, gen=gen))
    user, expected = golden["user_window"][0], golden["out_window"]          # (T, 8), (T, 1, 17)
    T, solo, late = user.shape[0], 3, 7
    done = {}
    for t in range(T + late):
        for r in (0, 1):
            if t == r * late:                                   # the first frames alone, then a row
                state = gen.new_state(1, seed=0)
                for i in range(solo):
                    np.testing.assert_array_equal(frame(gen.step(state, user_codes=user[i:i + 1]), 1)[0],
                                                  expected[i, 0])
                be.join(r, state, SlotParams(GREEDY))
                done[r] = solo
        for r in [r for r in be.slots if done[r] == T]:
            be.leave(r)
        if not be.size:
            break
        text, agent = be._lm_step(mx.array(np.stack([user[done[r]] for r in be.slots]).astype(np.int32)))
        for i, r in enumerate(be.slots):
            got = np.concatenate([[int(np.array(text)[i])], np.array(agent)[i]])
            np.testing.assert_array_equal(got, expected[done[r], 0, :9], err_msg=f"row {r} frame {done[r]}")
            done[r] += 1
    assert done == {0: T, 1: T} and T > 4 * lm.config.context
