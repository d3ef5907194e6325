"""The Swift demo's converted MLX checkpoints (aufklarer/PersonaPlex-7B-MLX-4bit / -8bit).

Every layout here is written by tests/swift_layout_writer.py (from the format's description, not
from the engine's reader) out of a random tiny checkpoint in the reference layout, then read by
the engine (engine/hub.py + engine/models/mlx_layout.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from safetensors.numpy import load_file, save_file

from engine import hub, persona
from engine.errors import ConfigError, CorruptCheckpoint, ModelNotFound
from engine.models import mlx_layout
from engine.models.gen import LmGen, SamplingParams
from engine.models.lm import LM, LmConfig, random_state_dict
from engine.models.quant import QuantPlan
from tests import swift_layout_writer as W

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello.wav"
CFG = LmConfig.tiny()
GREEDY = SamplingParams(greedy=True)
QUANTIZED = ("in_proj_weight", "out_proj.weight", "linear_in.weight", "linear_out.weight")


def _quantized_key(k: str) -> bool:
    return (k.startswith(("transformer.", "depformer.")) and k.endswith(QUANTIZED)) or k.startswith("depformer_in.")


def random_checkpoint(seed: int = 3) -> dict:
    """Random tiny weights whose float values survive the converter's bf16 -> fp16 storage."""
    sd = random_state_dict(CFG, seed=seed)
    return {k: W.bf16_round(np.where(np.abs(v) < 1e-3, 0, v)) for k, v in sd.items()}


def grid_checkpoint(bits: int, seed: int = 4) -> dict:
    """Random tiny weights whose quantized matrices lie on a grid both quantizers reproduce exactly:
    per group of 64, values s * (k - m) with s a power of two, k in [0, 2^bits - 1] (both ends
    present) and m just above the middle (so |min| > |max|, and 0 is on the grid)."""
    sd = random_checkpoint(seed)
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    for k, v in sd.items():
        if not _quantized_key(k):
            continue
        rows, cols = v.shape
        g = cols // 64
        e = np.round(np.log2(4 / np.sqrt(cols) / top)) + rng.integers(-1, 2, size=(rows, g))
        s = (2.0 ** e).astype(np.float32)
        m = rng.integers(top // 2 + 1, top // 2 + 3, size=(rows, g))
        q = rng.integers(0, top + 1, size=(rows, g, 64))
        q[..., 0], q[..., 1] = 0, top
        sd[k] = (s[..., None] * (q - m[..., None])).astype(np.float32).reshape(rows, cols)
    return sd


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """bits -> (reference source dir, converted dir, float checkpoint) for random weights."""
    out = {}
    base = tmp_path_factory.mktemp("mlx_layout")
    sd = random_checkpoint()
    src = W.reference_dir(base / "src", sd)
    for bits in (8, 4, None):
        out[bits] = (src, W.convert(src, base / f"mlx{bits}", bits), sd)
    return out


def load(directory, dtype=mx.float32, quantize=None) -> tuple:
    files = hub.resolve_model(directory, check_resources=False)
    return files, mlx_layout.load_lm(files.lm_files, files.lm_config(), dtype, quantize, files.mlx_config)


# ---------------------------------------------------------------------------------------------
# the layout's facts

@pytest.mark.parametrize("bits", [8, 4])
def test_packed_weights_are_used_as_written(layouts, bits):
    _, d, sd = layouts[bits]
    files, lm = load(d)
    assert files.layout == "mlx" and files.lm_config() == CFG
    assert lm.quant_plan == QuantPlan(temporal=bits, depformer=bits, group_size=64)
    temporal = load_file(str(d / "temporal.safetensors"))
    depformer = load_file(str(d / "depformer.safetensors"))
    emb = load_file(str(d / "embeddings.safetensors"))
    # packed temporal QKV of layer 1: the very words on disk, scales/biases the fp16 values
    qkv = lm.transformer.layers[1].self_attn.in_proj
    assert qkv.bits == bits and qkv.group_size == 64
    np.testing.assert_array_equal(np.array(qkv.weight), temporal["layers.1.self_attn.in_proj_weight"])
    np.testing.assert_array_equal(np.array(qkv.scales), temporal["layers.1.self_attn.in_proj_scales"].astype(np.float32))
    np.testing.assert_array_equal(np.array(qkv.biases), temporal["layers.1.self_attn.in_proj_biases"].astype(np.float32))
    # per-step depformer gating: the 16 steps' files concatenated in step order
    g = lm.depformer.layers[1].gating.linear_in
    for part in ("weight", "scales", "biases"):
        want = np.concatenate([depformer[f"layers.1.gating.{s}.linear_in.{part}"] for s in range(CFG.dep_q)])
        np.testing.assert_array_equal(np.array(getattr(g, part)), want.astype(np.array(getattr(g, part)).dtype))
    # the packing means what the format says: MLX's dequantization = the writer's own inverse,
    # and within half a step of the float checkpoint (+ the fp16 rounding of scale and bias)
    for mod, key, src_key, store in (
            (qkv, "layers.1.self_attn.in_proj", "transformer.layers.1.self_attn.in_proj_weight", temporal),
            (lm.transformer.layers[0].gating.linear_out, "layers.0.gating.linear_out",
             "transformer.layers.0.gating.linear_out.weight", temporal)):
        sep = "_" if key.endswith("in_proj") else "."
        ref = W.dequantize(store[f"{key}{sep}weight"], store[f"{key}{sep}scales"], store[f"{key}{sep}biases"], bits)
        got = np.array(mx.dequantize(mod.weight, mod.scales, mod.biases, 64, bits))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
        step = np.repeat(store[f"{key}{sep}scales"].astype(np.float32), 64, axis=1)
        assert np.all(np.abs(got - sd[src_key]) <= 0.7 * step)
    # floats: fp16 on disk, loaded as stored; norms [1,1,D] -> [D]; per-codebook tables stacked
    np.testing.assert_array_equal(np.array(lm.out_norm.weight), temporal["out_norm.alpha"].reshape(-1).astype(np.float32))
    np.testing.assert_array_equal(np.array(lm.emb.weight)[(CFG.card + 1) * 3:(CFG.card + 1) * 4],
                                  emb["emb.3.weight"].astype(np.float32))
    np.testing.assert_array_equal(np.array(lm.linears.weight), np.concatenate(
        [emb[f"linears.{s}.weight"] for s in range(CFG.dep_q)]).astype(np.float32))
    assert lm.text_linear.bits is None and lm.emb.bits is None and lm.depformer_in.bits == bits


def test_float_conversion_and_requantization_rules(layouts):
    _, d, sd = layouts[None]
    files, lm = load(d)
    assert lm.quant_plan is None and "quantization" not in files.mlx_config
    ref = LM.from_weights({k: mx.array(v) for k, v in sd.items()}, CFG, mx.float32)
    for (k, a), (_, b) in zip(sorted(dict(_flat(lm)).items()), sorted(dict(_flat(ref)).items())):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)   # bf16-exact values
    _, q = load(d, quantize=8)   # a float conversion can be quantized like the reference checkpoint
    assert q.quant_plan == QuantPlan.parse(8)
    _, same = load(layouts[8][1], quantize=8)      # asking for the files' own plan is fine
    assert same.quant_plan == QuantPlan.parse(8)
    with pytest.raises(ConfigError, match=r"already quantized \(t8d8.*cannot be re-quantized to t4d4"):
        load(layouts[8][1], quantize=4)


def _flat(lm):
    from mlx.utils import tree_flatten
    return tree_flatten(lm.parameters())


def test_voices_load_from_safetensors(layouts):
    src, d, _ = layouts[8]
    files = hub.resolve_model(d, check_resources=False)
    assert files.voice_names() == sorted(persona.VOICES)
    ref = hub.resolve_model(src, check_resources=False)
    for name in persona.VOICES:
        v = persona.load_voice(name, files)
        r = persona.load_voice(name, ref)
        np.testing.assert_array_equal(v.cache, r.cache)
        assert v.cache.dtype == np.int64
        np.testing.assert_array_equal(v.embeddings, r.embeddings)   # bf16 -> fp16 is exact for these values
    # a converted voice file given by path, with or without the preset's name
    p = d / "voices" / "VARM3.safetensors"
    np.testing.assert_array_equal(persona.load_voice(p).cache, persona.load_voice("VARM3", ref).cache)


def test_config_json_maps_to_the_7b_config():
    """config.json as the converter writes it for nvidia/personaplex-7b-v1."""
    raw = {"model_type": "personaplex",
           "temporal": {"dim": 4096, "num_layers": 32, "num_heads": 32, "hidden_scale": 4.125, "n_q": 8,
                        "card": 2048, "text_card": 32000, "context": 3000, "max_period": 10000},
           "depformer": {"dim": 1024, "num_layers": 6, "num_heads": 16, "dim_feedforward": 2816,
                         "num_steps": 16, "card": 2048, "text_card": 32000, "context": 8,
                         "weights_per_step": True, "multi_linear": True},
           "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
           "quantization": {"bits": 8, "group_size": 64, "quantized_components": ["temporal", "depformer"]},
           "voices": list(persona.VOICES)}
    cfg = LmConfig.from_dict(mlx_layout.lm_config_dict(raw))
    assert cfg == LmConfig.personaplex()
    assert cfg.hidden == 11264 and cfg.depformer_hidden == 2816
    assert mlx_layout.voice_names(raw) == list(persona.VOICES)
    with pytest.raises(CorruptCheckpoint, match="temporal.n_q=4"):
        mlx_layout.lm_config_dict(dict(raw, temporal=dict(raw["temporal"], n_q=4)))
    with pytest.raises(CorruptCheckpoint, match="voices lists unusable names"):
        mlx_layout.voice_names(dict(raw, voices=["NATF0", "../x"]))


# ---------------------------------------------------------------------------------------------
# same tokens as our own quantization of the same weights

def _golden_style_run(lm, voice, text_tokens, user) -> np.ndarray:
    """Voice prompt + text prompt (batched prefill), then live frames fed with `user`: the
    undelayed outputs (text + agent + user codes) of every call, greedy."""
    gen = LmGen(lm, GREEDY)
    state = gen.new_state(1, seed=0)
    gen.run_prompts(state, voice, text_tokens)
    out = []
    for i in range(user.shape[1]):
        o = gen.step(state, user_codes=user[:, i])
        out.append(np.concatenate([np.array(o.text)[:, None], np.array(o.agent_codes), np.array(o.user_codes)], 1))
    return np.stack(out)


@pytest.mark.parametrize("bits", [8, 4])
def test_same_tokens_as_our_quantization(tmp_path, bits):
    sd = grid_checkpoint(bits)
    d = W.convert(W.reference_dir(tmp_path / "src", sd), tmp_path / "mlx", bits)
    files, lm = load(d)
    ours = LM.from_weights({k: mx.array(v) for k, v in sd.items()}, CFG, mx.float32, quantize=bits)
    assert lm.quant_plan == ours.quant_plan
    a, b = dict(_flat(lm)), dict(_flat(ours))
    assert sorted(a) == sorted(b)
    for k in a:   # the converter's words, scales and biases are exactly ours on such weights
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    sp = persona.load_tokenizer(files.tokenizer)
    text = persona.encode_system_prompt(persona.PROMPTS["assistant+focused"], sp)
    voice = persona.load_voice("NATF2", files)
    user = np.random.default_rng(7).integers(0, CFG.card, size=(1, 40, 8)).astype(np.int32)
    got = _golden_style_run(lm, voice, text, user)
    want = _golden_style_run(ours, voice, text, user)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got[:, 0, 1:9], axis=0)) > 5   # not a constant run


def test_library_and_cli(tmp_path):
    """PersonaPlex.load on a converted directory answers exactly like the same weights loaded from
    the reference layout and quantized by our own path; the CLI takes the directory too."""
    sd = grid_checkpoint(8)
    src = W.reference_dir(tmp_path / "src", sd)
    d = W.convert(src, tmp_path / "mlx", 8)
    a = engine.PersonaPlex.load(d, dtype="float32", progress=False)
    b = engine.PersonaPlex.load(src, quantize=8, dtype="float32", progress=False)
    try:
        assert a.files.layout == "mlx" and a.lm.quant_plan == b.lm.quant_plan == QuantPlan.parse(8)
        assert a.quantize == "t8d8"   # what the profile reports
        assert a.list_voices() == b.list_voices() == list(persona.VOICES)
        ra = a.respond(HELLO, voice="VARF1", max_steps=50, seed=5)
        rb = b.respond(HELLO, voice="VARF1", max_steps=50, seed=5)
        assert ra.text_tokens == rb.text_tokens and len(set(ra.text_tokens)) > 3
        np.testing.assert_array_equal(ra.audio, rb.audio)
    finally:
        a.close()
        b.close()
    out = tmp_path / "out.wav"
    cli = [sys.executable, "-m", "engine.respond", str(HELLO), "-o", str(out), "--model", str(d),
           "--voice", "NATF2", "--max-steps", "50"]
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 50 * 1920 * 2
    r = subprocess.run(cli + ["--quantize", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already quantized (t8d8" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# malformed layouts

@pytest.fixture
def broken(layouts, tmp_path):
    """A fresh copy of the 8-bit layout to damage."""
    d = tmp_path / "broken"
    shutil.copytree(layouts[8][1], d)
    return d


def _edit_config(d: Path, fn) -> None:
    raw = json.loads((d / "config.json").read_text())
    fn(raw)
    (d / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("name", ["depformer.safetensors", "embeddings.safetensors", "config.json",
                                  "mimi.safetensors", "tokenizer_spm_32k_3.model"])
def test_missing_file_is_named(broken, name):
    (broken / name).unlink()
    with pytest.raises(ModelNotFound, match=rf"converted MLX model.*lacks {name}"):
        hub.resolve_model(broken, check_resources=False)


def test_truncated_file_is_caught_before_loading(broken):
    p = broken / "temporal.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpoint, match="temporal.safetensors is truncated"):
        hub.resolve_model(broken, check_resources=False)


@pytest.mark.parametrize("edit,msg", [
    (lambda r: r["temporal"].update(num_layers=3), r"temporal\.safetensors: 'layers\.2\.self_attn\.in_proj_weight'"),
    (lambda r: r["temporal"].update(dim=256), r"transformer\.layers\.0\.self_attn\.in_proj: quantized weight \(384, 32\).*config's 768 x 256 matrix"),
    (lambda r: r["depformer"].update(num_steps=8, dim_feedforward=192), r"depformer\.layers\.0\.self_attn\.in_proj: quantized weight \(3072, 16\).*1536 x 64 matrix"),
    (lambda r: r["depformer"].update(dim_feedforward=128), r"gating\.linear_in: .*does not fit the config's 4096 x 64 matrix.*do not match config\.json"),
    (lambda r: r["quantization"].update(bits=4), r"config\.json says 4-bit, but the temporal weights are 8-bit"),
])
def test_config_that_does_not_match_the_files(broken, edit, msg):
    _edit_config(broken, edit)
    with pytest.raises(CorruptCheckpoint, match=msg):
        load(broken)


def test_quantization_mixed_within_a_part(broken):
    p = broken / "depformer.safetensors"
    t = load_file(str(p))
    for s in ("scales", "biases"):
        del t[f"layers.0.gating.3.linear_out.{s}"]
    t["layers.0.gating.3.linear_out.weight"] = np.zeros((CFG.depformer_dim, CFG.depformer_hidden), np.float16)
    save_file(t, str(p))
    with pytest.raises(CorruptCheckpoint, match=r"mixes quantized and float matrices in depformer\.layers\.0\.gating\.linear_out"):
        load(broken)


def test_orphan_scales_and_foreign_keys(broken):
    p = broken / "temporal.safetensors"
    t = load_file(str(p))
    del t["layers.0.gating.linear_in.biases"]
    save_file(t, str(p))
    with pytest.raises(CorruptCheckpoint, match=r"temporal\.safetensors: 'layers\.0\.gating\.linear_in\.weight'.*not both"):
        load(broken)
    t["layers.0.gating.linear_in.biases"] = t["layers.0.gating.linear_in.scales"]
    t["text_emb.weight"] = np.zeros((3, 3), np.float16)
    save_file(t, str(p))
    with pytest.raises(CorruptCheckpoint, match=r"temporal\.safetensors holds 'text_emb\.weight'"):
        load(broken)


def test_voice_without_cache(broken):
    p = broken / "voices" / "NATF1.safetensors"
    v = load_file(str(p))
    save_file({"embeddings": v["embeddings"]}, str(p))
    files = hub.resolve_model(broken, check_resources=False)
    with pytest.raises(CorruptCheckpoint, match=r"NATF1\.safetensors: a voice prompt holds 'embeddings' and 'cache', found \['embeddings'\]"):
        persona.load_voice("NATF1", files)
    save_file({"embeddings": v["embeddings"], "cache": v["cache"] + 0.5}, str(p))
    with pytest.raises(CorruptCheckpoint, match="whole token ids"):
        persona.load_voice("NATF1", files)
    (broken / "voices" / "NATM2.safetensors").unlink()
    with pytest.raises(engine.UnknownVoice, match=r"NATM2\.safetensors is missing: re-download voices/"):
        persona.load_voice("NATM2", files)
