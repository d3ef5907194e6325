"""LM network: config, loader, cache semantics, quantization, and parity with PyPI moshi 0.2.13."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from engine.errors import ConfigError, CorruptCheckpoint, ModelNotFound
from engine.models import quant
from engine.models.lm import LM, LmConfig, random_state_dict, sanitize

from bench.quant_damage import measure_damage
from tests.models import lm_oracle

TINY = LmConfig.tiny()
oracle = pytest.mark.skipif(not lm_oracle.have_moshi(), reason="moshi==0.2.13 + torch not installed")


def _mx(sd):
    return {k: mx.array(v) for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny_sd():
    return random_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_lm(tiny_sd):
    return LM.from_weights(_mx(tiny_sd), TINY, mx.float32)


def _inputs(config, B, T, seed):
    rng = np.random.default_rng(seed)
    tok = np.concatenate([rng.integers(0, config.text_card + 1, (B, 1, T)),
                          rng.integers(0, config.card + 1, (B, config.n_q, T))], 1)
    tok[0, 3, T // 2] = -1  # zero-embedding token
    dep = rng.integers(0, config.card, (B, config.dep_q, T))
    dep[:, 0] = rng.integers(0, config.text_card, (B, T))
    return tok, dep


def _our_logits(lm, tok, dep, chunk=1):
    B, _, T = tok.shape
    cache = lm.make_cache(B)
    text, audio = [], []
    for t0 in range(0, T, chunk):
        h, tl = lm.temporal(lm.embed(mx.array(tok[:, :, t0:t0 + chunk])), cache)
        text.append(np.array(tl))
        for i in range(h.shape[1]):
            dc = lm.make_depformer_cache()
            audio.append(np.stack([np.array(lm.depformer_step(s, h[:, i], mx.array(dep[:, s, t0 + i]), dc))
                                   for s in range(lm.config.dep_q)], 1))
    return np.concatenate(text, 1), np.stack(audio, 2)


# ----------------------------------------------------------------------------- parity (oracle)
@oracle
@pytest.mark.oracle
@pytest.mark.parametrize("seed,dep_q,context", [(0, 16, 3000), (1, 16, 3000), (2, 8, 3000), (3, 16, 8)])
def test_parity_with_reference(tmp_path, seed, dep_q, context):
    """Teacher-forced logits (text + every depformer codebook) vs moshi.models.lm.LMModel, fp32,
    24 steps, batch 2, loaded from a reference-layout safetensors. context=8 makes the ring wrap."""
    cfg = dataclasses.replace(TINY, dep_q=dep_q, context=context)
    sd = random_state_dict(cfg, seed=seed)
    path = tmp_path / "model.safetensors"
    lm_oracle.save_safetensors(sd, path)
    ref = lm_oracle.build_reference(cfg, sd)
    tok, dep = _inputs(cfg, 2, 24, seed)
    ref_text, ref_audio = lm_oracle.reference_logits(ref, tok, dep)
    lm = LM.from_file(path, cfg, dtype=mx.float32)
    text, audio = _our_logits(lm, tok, dep)
    assert text.shape == ref_text.shape and audio.shape == ref_audio.shape
    assert np.abs(text - ref_text).max() <= 1e-3
    assert np.abs(audio - ref_audio).max() <= 1e-3
    assert np.abs(ref_audio).max() > 1.0  # logits are not trivially small


@oracle
@pytest.mark.oracle
def test_config_from_reference_loader_kwargs():
    from moshi.models import loaders
    cfg = LmConfig.from_dict(loaders._lm_kwargs)
    # The PersonaPlex loader overrides dep_q to 16; everything else is the published 7B config.
    assert dataclasses.replace(cfg, dep_q=16) == LmConfig.personaplex()


# ----------------------------------------------------------------------------- config
def test_config_roundtrip_and_derived_sizes():
    p = LmConfig.personaplex()
    assert LmConfig.from_dict(p.to_dict()) == p
    assert (p.hidden, p.depformer_hidden, p.head_dim, p.num_codebooks) == (11264, 2816, 128, 17)
    t = LmConfig.tiny()
    assert (t.n_q, t.dep_q, t.card, t.context, t.delays) == (16, 16, 2048, 3000, p.delays)
    assert t.text_card == 1000


@pytest.mark.parametrize("bad", [{"dim": 0}, {"norm": "layer_norm"}, {"delays": [0] * 5},
                                 {"layer_scale": 0.1}, {"no_such_key": 1}, {"dep_q": 17},
                                 {"conditioners": {"x": 1}}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        LmConfig.from_dict({**LmConfig.tiny().to_dict(), **bad})


# ----------------------------------------------------------------------------- loader
def test_missing_and_misshaped_keys_are_named(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    del sd["transformer.layers.1.norm2.alpha"]
    with pytest.raises(CorruptCheckpoint, match="transformer.layers.1.norm2.alpha"):
        LM.from_weights(_mx(sd), TINY, mx.float32)
    sd = dict(tiny_sd)
    sd["text_linear.weight"] = sd["text_linear.weight"][:, :64]
    with pytest.raises(CorruptCheckpoint, match="text_linear.weight"):
        LM.from_weights(_mx(sd), TINY, mx.float32)
    sd = dict(tiny_sd, **{"bogus.weight": np.zeros(3, np.float32)})
    with pytest.raises(CorruptCheckpoint, match="bogus.weight"):
        LM.from_weights(_mx(sd), TINY, mx.float32)
    with pytest.raises(ModelNotFound):
        LM.from_file(tmp_path / "nope.safetensors", TINY)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptCheckpoint):
        LM.from_file(tmp_path / "junk.safetensors", TINY)


def test_eight_step_checkpoint_is_expanded_to_sixteen():
    """PersonaPlex loader fix-up: an 8-codebook depformer checkpoint fills slots 8-15 from 0-7."""
    sd8 = random_state_dict(dataclasses.replace(TINY, dep_q=8), seed=5)
    w = sanitize(_mx(sd8), TINY)
    Dd = TINY.depformer_dim
    a = np.array(w["depformer.layers.0.self_attn.in_proj.weight"]).reshape(16, 3 * Dd, Dd)
    assert np.array_equal(a[8:], a[:8]) and not np.array_equal(a[1], a[0])
    g = np.array(w["depformer.layers.1.gating.linear_out.weight"]).reshape(16, Dd, -1)
    assert np.array_equal(g[8:], g[:8])
    lin = np.array(w["linears.weight"]).reshape(16, TINY.card, Dd)
    assert np.array_equal(lin[11], np.array(sd8["linears.3.weight"]))
    emb = np.array(w["depformer_emb.weight"]).reshape(15, TINY.card + 1, Dd)
    assert np.array_equal(emb[8], sd8["depformer_emb.0.weight"])
    LM(TINY, mx.float32).load_sanitized(w)  # shapes fit the 16-step model


# ----------------------------------------------------------------------------- cache / batching
def test_embed_minus_one_is_zero(tiny_lm):
    tok = np.full((1, 17, 1), -1)
    assert float(mx.abs(tiny_lm.embed(mx.array(tok))).max()) == 0.0
    tok[0, 0, 0] = 7
    ref = np.array(tiny_lm.text_emb.weight[7])
    assert np.allclose(np.array(tiny_lm.embed(mx.array(tok)))[0, 0], ref)


def test_cache_memory_is_bounded_and_positions_absolute():
    cfg = dataclasses.replace(TINY, context=8)
    lm = LM.from_weights(_mx(random_state_dict(cfg, 1)), cfg, mx.float32)
    cache = lm.make_cache(1)
    size = cache.nbytes
    tok, _ = _inputs(cfg, 1, 20, 0)
    for t in range(20):
        lm.temporal(lm.embed(mx.array(tok[:, :, t:t + 1])), cache)
    assert cache.nbytes == size and cache.step == 20 and np.array(cache.offset).tolist() == [20]
    assert sorted(np.array(cache.pos)[0].tolist()) == list(range(12, 20))


def test_batch_rows_are_independent(tiny_lm):
    tok, dep = _inputs(TINY, 2, 6, 3)
    both_t, both_a = _our_logits(tiny_lm, tok, dep)
    one_t, one_a = _our_logits(tiny_lm, tok[1:], dep[1:])
    assert np.abs(both_t[1:] - one_t).max() < 1e-4 and np.abs(both_a[1:] - one_a).max() < 1e-4


def test_prefill_chunk_equals_single_steps(tiny_lm):
    tok, dep = _inputs(TINY, 1, 8, 4)
    t1, a1 = _our_logits(tiny_lm, tok, dep, chunk=1)
    t4, a4 = _our_logits(tiny_lm, tok, dep, chunk=4)
    assert np.abs(t1 - t4).max() < 1e-4 and np.abs(a1 - a4).max() < 1e-4


def test_compiled_matches_eager(tiny_sd):
    lm = LM.from_weights(_mx(tiny_sd), TINY, mx.float32)
    tok, dep = _inputs(TINY, 1, 2, 6)
    t_e, a_e = _our_logits(lm, tok, dep)
    lm.compile()
    t_c, a_c = _our_logits(lm, tok, dep)
    assert np.abs(t_e - t_c).max() < 1e-4 and np.abs(a_e - a_c).max() < 1e-4


def test_depformer_steps_must_run_in_order(tiny_lm):
    cache = tiny_lm.make_cache(1)
    h, _ = tiny_lm.temporal(tiny_lm.embed(mx.zeros((1, 17, 1), mx.int32)), cache)
    with pytest.raises(ConfigError):
        tiny_lm.depformer_step(1, h[:, 0], mx.zeros((1,), mx.int32), tiny_lm.make_depformer_cache())
    with pytest.raises(ConfigError):
        tiny_lm.temporal(mx.zeros((1, 1, 3)), cache)


# ----------------------------------------------------------------------------- quantization
def test_quant_plan_parsing():
    assert quant.QuantPlan.parse(8) == quant.QuantPlan(temporal=8, depformer=8)
    assert quant.QuantPlan.parse("t8d4") == quant.QuantPlan(temporal=8, depformer=4)
    assert quant.QuantPlan.parse("bf16") is None
    for bad in (3, "t3", "x8", True, 1.5):
        with pytest.raises(ConfigError):
            quant.QuantPlan.parse(bad)


def test_quantized_save_load_roundtrip(tiny_sd, tmp_path):
    lm = LM.from_weights(_mx(tiny_sd), TINY, mx.float32, quantize="t8d4e8h8")
    assert lm.text_linear.bits == 8 and lm.depformer.layers[0].gating.linear_in.bits == 4
    quant.save(lm, tmp_path / "q")
    lm2 = LM.from_cache(tmp_path / "q")
    assert lm2.quant_plan == lm.quant_plan and lm2.nbytes == lm.nbytes
    tok, dep = _inputs(TINY, 1, 3, 7)
    t1, a1 = _our_logits(lm, tok, dep)
    t2, a2 = _our_logits(lm2, tok, dep)
    assert np.array_equal(t1, t2) and np.array_equal(a1, a2)


def test_cached_load_reuses_the_cache(tiny_sd, tmp_path):
    src = tmp_path / "model.safetensors"
    lm_oracle.save_safetensors(tiny_sd, src)
    cache_dir = tmp_path / "cache"
    a = LM.cached(src, cache_dir, TINY, mx.float32, 8)
    stamp = (cache_dir / "model.safetensors").stat().st_mtime_ns
    b = LM.cached(src, cache_dir, TINY, mx.float32, 8)
    assert (cache_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    assert b.quant_plan == a.quant_plan == quant.QuantPlan(temporal=8, depformer=8)
    LM.cached(src, cache_dir, TINY, mx.float32, 4)  # other plan: rebuilt
    assert LM.from_cache(cache_dir).quant_plan.temporal == 4


def test_quantization_damage_ordering(tiny_lm, tiny_sd):
    """8-bit must stay closer to fp32 than 4-bit (teacher-forced KL and top-1), per part."""
    res = {}
    for spec in ("t8", "t4", "d8", "d4"):
        q = LM.from_weights(_mx(tiny_sd), TINY, mx.float32, quantize=spec)
        res[spec] = measure_damage(tiny_lm, q, steps=12, batch=1)
    for part in ("t", "d"):
        r8, r4 = res[part + "8"], res[part + "4"]
        assert r8["kl_audio"] + r8["kl_text"] < r4["kl_audio"] + r4["kl_text"]
        assert r8["tf_top1_audio"] >= r4["tf_top1_audio"]
    assert res["t8"]["tf_top1_text"] >= 0.9 and res["d8"]["tf_top1_audio"] >= 0.9


def test_temporal_graph_variants_agree():
    """The static variants of one temporal call (temporal_flags) compute the same thing: scatter vs
    slice-update key writes for a chunk."""
    cfg = dataclasses.replace(TINY, context=8)
    lm = LM.from_weights(_mx(random_state_dict(cfg, 2)), cfg, mx.float32)
    tok, _ = _inputs(cfg, 1, 12, 8)
    x = lm.embed(mx.array(tok))
    assert lm.temporal_flags(3, 6)[0] == "scatter" and lm.temporal_flags(1, 7)[0] == "slice"
    assert lm.temporal_flags(3, 2)[0] == "slice" and lm.temporal_flags(1, 6)[0] == "slice"
    cache = lm.make_cache(1)
    lm.temporal(x[:, :2], cache)
    outs = [lm._temporal(x[:, 2:5], *cache.arrays(), flags=(f, False, None, None, False, "mlx")) for f in ("slice", "scatter")]
    for a, b in zip(outs[0], outs[1]):
        assert np.array_equal(np.array(a), np.array(b))


def test_dense_prefill_of_quantized_model(tiny_sd):
    """dense_prefill_rows: quantized matmuls of a chunk as dequantize + matmul (the GPU prefill
    path) give the same logits as quantized_matmul up to float rounding."""
    lm = LM.from_weights(_mx(tiny_sd), TINY, mx.float32, quantize=4)
    tok, dep = _inputs(TINY, 1, 8, 9)
    lm.dense_prefill_rows = None
    t_q, _ = _our_logits(lm, tok, dep, chunk=8)
    lm.dense_prefill_rows = 2
    assert lm.temporal_flags(8, 0)[1] and not lm.temporal_flags(1, 0)[1]
    t_d, _ = _our_logits(lm, tok, dep, chunk=8)
    assert np.abs(t_q - t_d).max() < 1e-3 and np.abs(t_q).max() > 1.0


def _fp8_rounded_writes(monkeypatch):
    """Make every KV write of a model-dtype cache round its values through fp8 e4m3 (the numbers an
    fp8 ring holds, stored wide): the reference an fp8 ring must equal exactly."""
    import engine.models.lm as lm_mod
    real = lm_mod.to_cache

    def rounded(x, dtype):
        return real(x, dtype) if dtype == mx.uint8 else mx.from_fp8(mx.to_fp8(x), dtype=dtype)

    monkeypatch.setattr(lm_mod, "to_cache", rounded)


def test_fp8_kv_cache_holds_e4m3_and_attends_over_its_values(monkeypatch):
    """make_cache(kv_dtype="fp8") stores keys and values as e4m3 bytes (a quarter of float32) and
    attends over their decoded values: prefill chunks (slice writes), a chunk that wraps the ring
    (scatter writes) and single steps give exactly the outputs of a model-dtype cache whose writes
    round through fp8, and its bytes decode to that cache's values. Unrounded, the values differ."""
    cfg = dataclasses.replace(TINY, context=8)
    lm = LM.from_weights(_mx(random_state_dict(cfg, 3)), cfg, mx.float32)
    tok, _ = _inputs(cfg, 2, 14, 9)
    x = lm.embed(mx.array(tok))
    chunks = [(0, 3), (3, 6), (6, 9), (9, 10), (10, 11), (11, 14)]     # (6, 9) and (11, 14) wrap

    def run(kv_dtype):
        cache = lm.make_cache(2, kv_dtype)
        outs = [lm.temporal(x[:, a:b], cache) for a, b in chunks]
        return outs, cache

    with pytest.raises(ConfigError, match="fp8"):
        lm.make_cache(1, "fp4")
    plain_outs, plain = run("model")
    outs, cache = run("fp8")
    assert cache.keys[0].dtype == mx.uint8 and cache.nbytes < plain.nbytes / 3
    _fp8_rounded_writes(monkeypatch)
    ref_outs, ref = run("model")
    for (h, tl), (rh, rtl) in zip(outs, ref_outs):
        np.testing.assert_array_equal(np.array(h), np.array(rh))
        np.testing.assert_array_equal(np.array(tl), np.array(rtl))
    for a, b, p in zip(cache.keys + cache.values, ref.keys + ref.values, plain.keys + plain.values):
        np.testing.assert_array_equal(np.array(mx.from_fp8(a, dtype=mx.float32)), np.array(b))
        assert not np.array_equal(np.array(b), np.array(p))
    assert np.abs(np.array(outs[-1][1]) - np.array(plain_outs[-1][1])).max() > 0
