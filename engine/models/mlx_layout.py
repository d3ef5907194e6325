"""Reader of the converted MLX checkpoints of the Swift PersonaPlex demo.

`aufklarer/PersonaPlex-7B-MLX-4bit` and `-8bit` hold the 7B LM split into three safetensors files,
MLX affine-quantized (group size 64, fp16 scales and biases, bias = the group's minimum), plus
`mimi.safetensors` (the released codec, copied verbatim), the SentencePiece model, `config.json`
and `voices/<NAME>.safetensors`:

  temporal.safetensors    `transformer.*` keys without the `transformer.` prefix, and `out_norm.alpha`.
                          Quantized: every layer's `self_attn.in_proj_weight` (its companions are
                          `self_attn.in_proj_scales` / `_biases`), `self_attn.out_proj.weight`,
                          `gating.linear_in.weight`, `gating.linear_out.weight` (companions
                          `.scales` / `.biases`). Norm `alpha`s [1, 1, D] stay float.
  depformer.safetensors   `depformer.*` keys without the `depformer.` prefix (stacked attention
                          projections, per-step `gating.{s}.linear_in/out`) and `depformer_in.{s}`,
                          quantized like the temporal matrices; norms float.
  embeddings.safetensors  `text_emb`, `emb.{q}`, `text_linear`, `linears.{s}`, `depformer_emb.{s}`,
                          `depformer_text_emb`: float (the converter casts bf16 to fp16).

Packing (MLX's affine format): for b bits, each uint32 holds 32/b consecutive values of a row, the
first in the lowest bits; a value q of group g dequantizes to `scales[g] * q + biases[g]`.

The reader puts the `transformer.` / `depformer.` prefixes back, so the keys are the reference
checkpoint's again, and `engine.models.lm.sanitize` does the rest (renames, the per-step stacking,
norms), carrying the quantized matrices' scales and biases along. The quantization is read from
the files (which matrices have scales, the packed widths) and checked against `config.json`; the
packed weights are used as they are (`LM.from_quantized`), never re-quantized. Float arrays are cast
to the model's dtype.

`config.json` (dims, delays, quantization, voice names) maps onto `LmConfig` with
`lm_config_dict`; this module imports MLX only inside the functions that load weights, so
`engine.hub` can use it to check a model directory.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import ConfigError, CorruptCheckpoint
from ..filenames import MLX_CONFIG_FILE, MLX_DEPFORMER_FILE, MLX_EMBEDDINGS_FILE, MLX_TEMPORAL_FILE

__all__ = ["PARTS", "read_config", "lm_config_dict", "voice_names", "load_lm", "read_weights"]

#: The three LM files, by part name.
PARTS = {"temporal": MLX_TEMPORAL_FILE, "depformer": MLX_DEPFORMER_FILE, "embeddings": MLX_EMBEDDINGS_FILE}

# File -> (prefix removed by the converter, the reference key prefixes the file holds).
_FILE_KEYS = {
    "temporal": ("transformer.", ("transformer.", "out_norm.")),
    "depformer": ("depformer.", ("depformer.", "depformer_in.")),
    "embeddings": ("", ("text_emb.", "emb.", "text_linear.", "linears.", "depformer_emb.", "depformer_text_emb.")),
}


_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


# ----------------------------------------------------------------------------- config.json
def read_config(path: str | os.PathLike) -> dict:
    """The parsed `config.json` of a converted directory (CorruptCheckpoint if unreadable)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path} is not valid JSON ({exc}); download it again") from None
    if not isinstance(raw, dict):
        raise CorruptCheckpoint(f"{path} must hold a JSON object (the converter's model config)")
    return raw


def _section(raw: dict, name: str) -> dict:
    sec = raw.get(name, {})
    if not isinstance(sec, dict):
        raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: {name!r} must be an object, got {sec!r}")
    return sec


def lm_config_dict(raw: dict) -> dict:
    """`LmConfig` fields from the converter's `config.json` (missing fields: the 7B defaults).

    temporal {dim, num_layers, num_heads, hidden_scale, card, text_card, context, max_period,
    n_q (codebooks per audio side)}, depformer {dim, num_layers, num_heads, dim_feedforward (the
    gating's hidden width), num_steps, weights_per_step, multi_linear, context (unused: the
    depformer attends to all its steps)}, delays (one per stream). Pure Python (no MLX)."""
    t, d = _section(raw, "temporal"), _section(raw, "depformer")
    out = {}
    for src, dst in (("dim", "dim"), ("num_layers", "num_layers"), ("num_heads", "num_heads"),
                     ("hidden_scale", "hidden_scale"), ("card", "card"), ("text_card", "text_card"),
                     ("context", "context"), ("max_period", "max_period")):
        if src in t:
            out[dst] = t[src]
    for src, dst in (("dim", "depformer_dim"), ("num_layers", "depformer_num_layers"),
                     ("num_heads", "depformer_num_heads"), ("num_steps", "dep_q"),
                     ("weights_per_step", "depformer_weights_per_step"),
                     ("multi_linear", "depformer_multi_linear")):
        if src in d:
            out[dst] = d[src]
    if "max_period" in out and isinstance(out["max_period"], int) and not isinstance(out["max_period"], bool):
        out["max_period"] = float(out["max_period"])
    for key in ("card", "text_card"):
        if key in d and key in t and d[key] != t[key]:
            raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: depformer.{key}={d[key]!r} differs from "
                                    f"temporal.{key}={t[key]!r}")
    if "dim_feedforward" in d:
        hidden = d["dim_feedforward"]
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
            raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: depformer.dim_feedforward={hidden!r} must be a positive int")
        # Ours is the reference's dim_feedforward, whose gating hidden width is 2 * dff // 3.
        dff = (3 * hidden + 1) // 2
        dim = out.get("depformer_dim", 1024)
        if not isinstance(dim, int) or (2 * dff) // 3 != hidden or dff == 4 * dim:
            raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: depformer.dim_feedforward={hidden} (the gating's "
                                    f"hidden width) has no reference dim_feedforward for dim {dim}")
        out["depformer_dim_feedforward"] = dff
    if "delays" in raw:
        delays = raw["delays"]
        if not isinstance(delays, list) or len(delays) < 2:
            raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: delays={delays!r} must list one delay per stream")
        out["delays"] = delays
        out["n_q"] = len(delays) - 1
        side = t.get("n_q")
        if side is not None and 2 * side != out["n_q"]:
            raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: temporal.n_q={side!r} codebooks per side does not "
                                    f"match {len(delays)} delays (1 text + 2 x n_q audio streams)")
    elif "n_q" in t:
        out["n_q"] = 2 * t["n_q"]
    return out


def voice_names(raw: dict) -> list[str] | None:
    """The voice names `config.json` lists (None when it lists none)."""
    names = raw.get("voices")
    if not isinstance(names, list) or not names:
        return None
    bad = [n for n in names if not (isinstance(n, str) and _VOICE_NAME.fullmatch(n))]
    if bad:
        raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: voices lists unusable names {bad[:4]}")
    return list(names)


def _quantization(raw: dict | None) -> tuple[int | None, int | None, set | None]:
    q = (raw or {}).get("quantization")
    if q is None:
        return None, None, None
    if not isinstance(q, dict):
        raise CorruptCheckpoint(f"{MLX_CONFIG_FILE}: quantization must be an object, got {q!r}")
    comps = q.get("quantized_components")
    return q.get("bits"), q.get("group_size"), set(comps) if isinstance(comps, list) else None


# ----------------------------------------------------------------------------- weights
def _layout_key(ref_key: str) -> str:
    """A reference key as the layout stores it: 'temporal.safetensors: layers.0.norm1.alpha'."""
    for part, (strip, prefixes) in _FILE_KEYS.items():
        if ref_key.startswith(prefixes):
            key = ref_key[len(strip):] if strip and ref_key.startswith(strip) else ref_key
            return f"{PARTS[part]}: {key!r}"
    return repr(ref_key)


def read_weights(paths: dict) -> dict:
    """{"temporal": path, "depformer": path, "embeddings": path} -> one dict in the reference key
    names (quantized matrices with their scales/biases companions), arrays as stored."""
    import mlx.core as mx

    out: dict = {}
    for part, path in paths.items():
        strip, prefixes = _FILE_KEYS[part]
        try:
            arrays = mx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
            raise CorruptCheckpoint(f"cannot read {path}: {exc}. Delete it and download it again.") from None
        for k, v in arrays.items():
            if strip and k.startswith("layers."):
                k = strip + k
            if not k.startswith(prefixes):
                raise CorruptCheckpoint(f"{path} holds {k!r}, which does not belong in {PARTS[part]} "
                                        "(is the file from another model?)")
            if k in out:
                raise CorruptCheckpoint(f"{path}: {k!r} also appears in another file of the model")
            out[k] = v
    return out


def _plan(lm, sanitized: dict, config_raw: dict | None):
    """The QuantPlan the files carry: per part, all of its matrices quantized alike, or none."""
    import mlx.core as mx

    from . import quant

    bits_cfg, group_cfg, comps = _quantization(config_raw)
    group = group_cfg if group_cfg is not None else 64   # the converter's only group size
    mismatch = f"the weight files do not match {MLX_CONFIG_FILE}"
    bits_of = {}
    for part, mods in quant.part_modules(lm).items():
        found = []
        for path, m in mods:
            w, s, b = (sanitized.get(f"{path}.{a}") for a in ("weight", "scales", "biases"))
            if s is None:
                continue
            rows, in_dim = m.weight.shape
            if w.ndim != 2 or w.shape[0] != rows or s.shape != b.shape or s.shape != (rows, in_dim // group) \
                    or in_dim % group:
                raise CorruptCheckpoint(f"{path}: quantized weight {tuple(w.shape)} with scales {tuple(s.shape)} "
                                        f"does not fit the config's {rows} x {in_dim} matrix in groups of "
                                        f"{group}: {mismatch}")
            bits = 32 * w.shape[-1] / in_dim
            if bits not in (4, 8) or w.dtype != mx.uint32:
                raise CorruptCheckpoint(f"{path}: packed weight {w.dtype} {tuple(w.shape)} is not a 4- or 8-bit "
                                        f"packing of {in_dim} columns: {mismatch}")
            found.append((path, int(bits)))
        if not found:
            continue
        if len(found) != len(mods) or len({b for _, b in found}) != 1:
            floats = [p for p, _ in mods if p not in {f for f, _ in found}]
            raise CorruptCheckpoint(f"the {part} part mixes quantizations ({sorted({b for _, b in found})} bits, "
                                    f"float: {floats[:3]}); one bit width per part is supported")
        bits_of[part] = found[0][1]
    if not bits_of:
        return None
    for part, b in bits_of.items():
        if bits_cfg is not None and b != bits_cfg:
            raise CorruptCheckpoint(f"{MLX_CONFIG_FILE} says {bits_cfg}-bit, but the {part} weights are "
                                    f"{b}-bit: the files come from different conversions; download them again")
    if comps is not None and not set(bits_of) <= comps:
        raise CorruptCheckpoint(f"{MLX_CONFIG_FILE} lists quantized components {sorted(comps)}, but "
                                f"{sorted(set(bits_of) - comps)} are quantized too")
    try:
        return quant.QuantPlan(group_size=group, **bits_of)
    except ConfigError as exc:
        raise CorruptCheckpoint(f"unsupported quantization in the weight files: {exc}") from None


def load_lm(paths: dict, config=None, dtype=None, quantize=None, config_raw: dict | None = None):
    """Load the LM of a converted directory.

    paths: {"temporal", "depformer", "embeddings"} -> file; config: the `LmConfig`
    (`lm_config_dict` of config.json); config_raw: the parsed config.json (its quantization
    section is checked against the files). quantize: None uses the files as they are; a plan equal
    to theirs is accepted; a float conversion is quantized by it like a reference checkpoint; asking
    quantized files for another plan is a ConfigError (no re-quantization).
    """
    import mlx.core as mx

    from . import quant
    from .lm import LM, LmConfig, sanitize

    config = config or LmConfig.personaplex()
    dtype = dtype or mx.bfloat16
    where = Path(next(iter(paths.values()))).parent
    sanitized = sanitize(read_weights(paths), config, describe=_layout_key)
    plan = _plan(LM(config, dtype), sanitized, config_raw)
    wanted = quant.QuantPlan.parse(quantize)
    if plan is not None and wanted is not None and wanted != plan:
        raise ConfigError(f"the model in {where} is already quantized ({plan.name}, group size "
                          f"{plan.group_size}); it cannot be re-quantized to {wanted.name}. Drop the "
                          "quantize option (or pass the model's own bits), or use the bf16 model "
                          "nvidia/personaplex-7b-v1 for another plan.")
    try:
        lm = LM.from_quantized(sanitized, config, dtype, plan)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{where}: {exc}. The weight files do not match {MLX_CONFIG_FILE}, or "
                                "come from another model; download them again.") from None
    if plan is None and wanted is not None:
        quant.apply(lm, wanted)
    return lm
