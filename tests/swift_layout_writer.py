"""Test-side writer of the Swift PersonaPlex demo's converted MLX layout.

Turns a model directory in the reference layout (`model.safetensors`, the Mimi file, the
SentencePiece model, `voices/<NAME>.pt`, optional `engine_config.json`) into the layout of
`aufklarer/PersonaPlex-7B-MLX-4bit` / `-8bit`, following the converter's facts (the Swift
repository's scripts/convert_personaplex.py, as summarised in the project's spec, section 8). It is
written from that description alone and imports nothing of the engine's model code, so a test that
loads its output checks the engine's reader against an independent account of the format:

- keys: `transformer.*` and `out_norm.*` go to temporal.safetensors with `transformer.` removed;
  `depformer.*`, `depformer_in.*` to depformer.safetensors with `depformer.` removed; `text_emb`,
  `emb`, `text_linear`, `linears`, `depformer_emb`, `depformer_text_emb` to embeddings.safetensors.
- quantized (2-D, input width a multiple of 64): temporal and depformer `in_proj` / `out_proj` /
  `linear_in` / `linear_out`, and `depformer_in.{s}`. A packed `X_weight` gets `X_scales` /
  `X_biases`; a `X.weight` gets `X.scales` / `X.biases`.
- the quantizer: per group of 64 inputs, scale = (max - min) / (2^bits - 1) (at least 1e-10),
  bias = min, q = round((w - min) / scale) clipped to [0, 2^bits - 1], computed in float32;
  32/bits values per uint32, value i of a word at bits [bits*i, bits*(i+1)); scales and biases fp16.
- float tensors: float32 is first rounded to bf16, then every bf16 tensor is stored as fp16.
- mimi.safetensors and the SentencePiece model are copied verbatim; each voice `.pt` becomes
  voices/<NAME>.safetensors with `embeddings` (bf16 -> fp16) and `cache` (as float32).
- config.json: model_type, temporal / depformer / mimi / sampling sections, delays,
  quantization {bits, group_size, quantized_components}, voices.

For a model whose codec is not the released one (the tiny model), the source's `engine_config.json`
"mimi" section is written next to the files (the engine's own optional config file).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

TEMPORAL_PREFIXES = ("transformer.", "out_norm.")
DEPFORMER_PREFIXES = ("depformer.", "depformer_in.", "depformer_norms.")
EMBEDDING_PREFIXES = ("text_emb.", "emb.", "text_linear.", "linears.", "depformer_emb.", "depformer_text_emb.")
QUANTIZED_NAMES = {"in_proj", "out_proj", "linear_in", "linear_out"}

MIMI_SOURCE = "tokenizer-e351c8d8-checkpoint125.safetensors"
SPM = "tokenizer_spm_32k_3.model"

# The reference LMModel values of nvidia/personaplex-7b-v1 (spec section 3).
DEFAULT_DIMS = {"dim": 4096, "num_layers": 32, "num_heads": 32, "hidden_scale": 4.125, "card": 2048,
                "text_card": 32000, "context": 3000, "max_period": 10000, "n_q": 16, "dep_q": 16,
                "depformer_dim": 1024, "depformer_num_layers": 6, "depformer_num_heads": 16,
                "depformer_weights_per_step": True, "depformer_multi_linear": True,
                "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]}


def quantize(w: np.ndarray, bits: int, group_size: int = 64):
    """The converter's min/max quantizer -> (packed uint32, scales fp16, biases fp16)."""
    rows, cols = w.shape
    top = (1 << bits) - 1
    g = w.astype(np.float32).reshape(rows, cols // group_size, group_size)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    scales = np.maximum((hi - lo) / np.float32(top), np.float32(1e-10))
    q = np.clip(np.round((g - lo[..., None]) / scales[..., None]), 0, top).astype(np.uint32).reshape(rows, cols)
    per = 32 // bits
    packed = np.zeros((rows, cols // per), np.uint32)
    for i in range(per):
        packed |= q[:, i::per] << np.uint32(bits * i)
    return packed, scales.astype(np.float16), lo.astype(np.float16)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of the packing, for tests: float32 (rows, cols)."""
    per = 32 // bits
    rows = packed.shape[0]
    q = np.stack([(packed >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1) for i in range(per)], axis=-1)
    q = q.reshape(rows, -1).astype(np.float32)
    group = q.shape[1] // scales.shape[1]
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    b = np.repeat(biases.astype(np.float32), group, axis=1)
    return s * q + b


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def _stored_float(a: np.ndarray) -> np.ndarray:
    return bf16_round(a).astype(np.float16)


def _should_quantize(key: str, a: np.ndarray, group_size: int, depformer: bool) -> bool:
    if a.ndim != 2 or a.shape[1] % group_size:
        return False
    if depformer and key.startswith("depformer_in.") and key.endswith(".weight"):
        return True
    if key.endswith(".weight") and key.rsplit(".", 2)[-2] in QUANTIZED_NAMES:
        return True
    return key.endswith("_weight") and key.rsplit(".", 1)[-1][: -len("_weight")] in QUANTIZED_NAMES


def _convert_part(sd: dict, strip: str, quantized: bool, bits: int, group_size: int, depformer: bool) -> dict:
    out = {}
    for key in sorted(sd):
        a = sd[key]
        new = key[len(strip):] if key.startswith(strip) else key
        if quantized and _should_quantize(new, a, group_size, depformer):
            packed, scales, biases = quantize(a, bits, group_size)
            base, sep = (new[: -len("_weight")], "_") if new.endswith("_weight") else (new[: -len(".weight")], ".")
            out[new] = packed
            out[f"{base}{sep}scales"] = scales
            out[f"{base}{sep}biases"] = biases
        else:
            out[new] = _stored_float(a)
    return out


def _read_voice(path: Path) -> dict:
    from engine import _torchpt   # the .pt (pickle) reader: reads the source format only

    data = _torchpt.load(path, bf16="bits")
    out = {}
    for k, v in data.items():
        if v.dtype == np.uint16:                # bf16 bits -> fp16
            out[k] = (v.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
        else:
            out[k] = v.astype(np.float32)
    return out


def convert(src: str | Path, out: str | Path, bits: int | None = 8, group_size: int = 64) -> Path:
    """Write the converted layout of the reference-layout directory `src` into `out`.
    bits None: the converter's --no-quantize (every tensor float)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    temporal = {k: v for k, v in sd.items() if k.startswith(TEMPORAL_PREFIXES)}
    depformer = {k: v for k, v in sd.items() if k.startswith(DEPFORMER_PREFIXES) and k not in temporal}
    emb = {k: v for k, v in sd.items() if k.startswith(EMBEDDING_PREFIXES) and k not in temporal and k not in depformer}
    q = bits is not None
    save_file(_convert_part(temporal, "transformer.", q, bits, group_size, False), str(out / "temporal.safetensors"))
    save_file(_convert_part(depformer, "depformer.", q, bits, group_size, True), str(out / "depformer.safetensors"))
    save_file({k: _stored_float(v) for k, v in sorted(emb.items())}, str(out / "embeddings.safetensors"))
    shutil.copyfile(src / MIMI_SOURCE, out / "mimi.safetensors")
    shutil.copyfile(src / SPM, out / SPM)
    voices = []
    (out / "voices").mkdir(exist_ok=True)
    for pt in sorted((src / "voices").glob("*.pt")):
        save_file(_read_voice(pt), str(out / "voices" / f"{pt.stem}.safetensors"))
        voices.append(pt.stem)

    engine_cfg = {}
    if (src / "engine_config.json").is_file():
        engine_cfg = json.loads((src / "engine_config.json").read_text())
    dims = dict(DEFAULT_DIMS, **engine_cfg.get("lm", {}))
    hidden = sd["depformer.layers.0.gating.0.linear_out.weight"].shape[1]
    config = {
        "model_type": "personaplex",
        "version": "personaplex-7b-v1",
        "base_model": "kyutai/moshiko-pytorch-bf16",
        "temporal": {"dim": dims["dim"], "num_layers": dims["num_layers"], "num_heads": dims["num_heads"],
                     "hidden_scale": dims["hidden_scale"], "n_q": dims["n_q"] // 2, "card": dims["card"],
                     "text_card": dims["text_card"], "context": dims["context"], "max_period": int(dims["max_period"])},
        "depformer": {"dim": dims["depformer_dim"], "num_layers": dims["depformer_num_layers"],
                      "num_heads": dims["depformer_num_heads"], "dim_feedforward": hidden,
                      "num_steps": dims["dep_q"], "card": dims["card"], "text_card": dims["text_card"],
                      "context": 8, "weights_per_step": dims["depformer_weights_per_step"],
                      "multi_linear": dims["depformer_multi_linear"]},
        "mimi": {"sample_rate": 24000, "frame_rate": 12.5, "num_codebooks": 16, "codebook_size": 2048,
                 "codebook_dim": 256, "dimension": 512, "seanet_ratios": [8, 6, 5, 4], "transformer_layers": 8},
        "sampling": {"audio_temp": 0.8, "audio_top_k": 250, "text_temp": 0.7, "text_top_k": 25},
        "delays": list(dims["delays"]),
        "voices": voices,
    }
    if q:
        config["quantization"] = {"bits": bits, "group_size": group_size,
                                  "quantized_components": ["temporal", "depformer"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if "mimi" in engine_cfg:
        (out / "engine_config.json").write_text(json.dumps({"mimi": engine_cfg["mimi"]}))
    return out


def reference_dir(dst: str | Path, lm_state: dict | None = None) -> Path:
    """A reference-layout source directory for `convert`: the embedded tiny model's codec,
    SentencePiece model, voices and engine_config.json, with `lm_state` (reference key names, tiny
    shapes) as model.safetensors (default: the tiny model's own)."""
    from engine.hub import ensure_tiny_model

    tiny, dst = ensure_tiny_model(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MIMI_SOURCE, SPM, "engine_config.json") + (() if lm_state is not None else ("model.safetensors",)):
        shutil.copyfile(tiny / name, dst / name)
    if lm_state is not None:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in lm_state.items()}, str(dst / "model.safetensors"))
    shutil.copytree(tiny / "voices", dst / "voices", dirs_exist_ok=True)
    return dst
