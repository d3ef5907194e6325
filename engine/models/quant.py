"""Quantization plans for the LM (MLX affine, group size 64) and the quantized cache directory.

A plan gives a bit width (None = keep the float dtype) per part of the network:

  temporal    the 32 temporal layers' attention and SiLU-gating matrices (~79 % of the weights)
  depformer   the depformer layers' matrices and the per-step `depformer_in` projections
  embeddings  text/audio embedding tables of the temporal model and the depformer
  heads       `text_linear` and the per-codebook `linears`

`QuantPlan.parse(8)` / `parse(4)` quantize temporal + depformer and keep embeddings and heads in
high precision (like the published MLX conversions); strings like "t8d4" or "t8d8e8h8" and dicts
give mixed plans. The damage each plan does on the tiny model is in docs/benchmarks.md
(Quantization damage); without `--quantize` the CLIs load the weights unquantized.

Loading the 7B bf16 checkpoint and quantizing it takes minutes; `save` stores the quantized model
in a local directory (`model.safetensors` in our module layout + `quant.json`), and
`LM.from_cache` / `LM.cached` (engine.models.lm) reload it from there in seconds. This module
does not import the model: `apply` and `save` work on the `LM` they are given.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import ConfigError, CorruptCheckpoint, ModelNotFound

PARTS = ("temporal", "depformer", "embeddings", "heads")
_LETTER = {"t": "temporal", "d": "depformer", "e": "embeddings", "h": "heads"}
CACHE_FORMAT = 1


@dataclass(frozen=True)
class QuantPlan:
    temporal: int | None = None
    depformer: int | None = None
    embeddings: int | None = None
    heads: int | None = None
    group_size: int = 64

    def __post_init__(self):
        for p in PARTS:
            b = getattr(self, p)
            if b is not None and b not in (4, 8):
                raise ConfigError(f"quantization bits for {p}={b!r}: use 4, 8 or None")
        if self.group_size not in (32, 64, 128):
            raise ConfigError(f"quantization group_size={self.group_size!r}: use 32, 64 or 128")

    @classmethod
    def parse(cls, spec) -> "QuantPlan | None":
        """None / 4 / 8 / "4" / "8" / "bf16" / "t8d4e8h8" / dict of part -> bits / QuantPlan."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            unknown = set(spec) - set(PARTS) - {"group_size"}
            if unknown:
                raise ConfigError(f"unknown quantization parts {sorted(unknown)}; parts: {PARTS}")
            return cls(**spec)
        if isinstance(spec, bool):
            raise ConfigError(f"quantize={spec!r}: use None, 4, 8 or a plan such as 't8d4'")
        if isinstance(spec, int):
            return cls(temporal=spec, depformer=spec)
        if isinstance(spec, str):
            s = spec.strip().lower()
            if s in ("", "none", "bf16", "fp16", "fp32", "float"):
                return None
            if s.isdigit():
                return cls.parse(int(s))
            if re.fullmatch(r"([tdeh](4|8))+", s):
                return cls(**{_LETTER[m[0]]: int(m[1]) for m in re.findall(r"([tdeh])(4|8)", s)})
        raise ConfigError(f"quantize={spec!r}: use None, 4, 8, a string like 't8d4' "
                          f"(t=temporal d=depformer e=embeddings h=heads) or a QuantPlan")

    @property
    def name(self) -> str:
        s = "".join(f"{p[0]}{getattr(self, p)}" for p in PARTS if getattr(self, p))
        return s or "float"

    def to_dict(self) -> dict:
        return asdict(self)


def part_modules(lm) -> dict:
    """part name -> list of (path, module) that the part quantizes."""
    t, d = [], [("depformer_in", lm.depformer_in)]
    for i, layer in enumerate(lm.transformer.layers):
        p = f"transformer.layers.{i}"
        t += [(f"{p}.self_attn.in_proj", layer.self_attn.in_proj), (f"{p}.self_attn.out_proj", layer.self_attn.out_proj),
              (f"{p}.gating.linear_in", layer.gating.linear_in), (f"{p}.gating.linear_out", layer.gating.linear_out)]
    for j, layer in enumerate(lm.depformer.layers):
        p = f"depformer.layers.{j}"
        d += [(f"{p}.self_attn.in_proj", layer.self_attn.in_proj), (f"{p}.self_attn.out_proj", layer.self_attn.out_proj),
              (f"{p}.gating.linear_in", layer.gating.linear_in), (f"{p}.gating.linear_out", layer.gating.linear_out)]
    e = [("text_emb", lm.text_emb), ("emb", lm.emb), ("depformer_text_emb", lm.depformer_text_emb),
         ("depformer_emb", lm.depformer_emb)]
    h = [("text_linear", lm.text_linear), ("linears", lm.linears)]
    return {"temporal": t, "depformer": d, "embeddings": e, "heads": h}


def apply(lm, plan: QuantPlan | None, evaluate: bool = True):
    """Quantize `lm` in place according to `plan` (None: nothing). Returns lm."""
    plan = QuantPlan.parse(plan)
    if plan is None:
        return lm
    if lm.quant_plan is not None:
        raise ConfigError(f"model is already quantized ({lm.quant_plan.name})")
    for part, mods in part_modules(lm).items():
        bits = getattr(plan, part)
        if bits is None:
            continue
        for path, m in mods:
            if m.weight.shape[-1] % plan.group_size:
                raise ConfigError(f"cannot quantize {path}: input width {m.weight.shape[-1]} is not a "
                                  f"multiple of group_size={plan.group_size}; keep part {part!r} in float")
            m.quantize(bits, plan.group_size)
            if evaluate:
                mx.eval(m.parameters())  # quantize layer by layer: peak memory stays ~ one float layer
    lm.quant_plan = plan
    if lm._compiled is not None:
        lm.compile()  # retrace against the quantized weights
    return lm


# ----------------------------------------------------------------------------- cache directory
def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _dtype(name: str):
    try:
        return getattr(mx, name)
    except AttributeError:
        raise CorruptCheckpoint(f"quantized cache names an unknown dtype {name!r}") from None


def _source_id(path) -> dict:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save(lm, directory, source=None) -> Path:
    """Write `lm` (quantized or not) to `directory/model.safetensors` + `quant.json`."""
    from mlx.utils import tree_flatten

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": CACHE_FORMAT, "config": lm.config.to_dict(), "dtype": _dtype_name(lm.dtype),
            "plan": lm.quant_plan.to_dict() if lm.quant_plan else None,
            "source": _source_id(source) if source else None}
    tmp = directory / "model.safetensors.tmp.safetensors"
    mx.save_safetensors(str(tmp), dict(tree_flatten(lm.parameters())), {"engine": "personaplex-lm"})
    os.replace(tmp, directory / "model.safetensors")
    # quant.json last: its presence marks a complete cache.
    (directory / "quant.json").write_text(json.dumps(meta, indent=1))
    return directory


def read_cache(directory) -> tuple[dict, "mx.Dtype", QuantPlan | None, Path]:
    """The checked metadata of a directory written by `save`: (LM config dict, dtype, plan, path
    of the weights). `engine.models.lm.LM.from_cache` builds the model from it."""
    directory = Path(directory)
    meta_path, weights_path = directory / "quant.json", directory / "model.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise ModelNotFound(f"no quantized LM cache in {str(directory)!r} (quant.json + model.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise CorruptCheckpoint(f"{str(meta_path)!r} is not valid JSON: {e}") from None
    if meta.get("format") != CACHE_FORMAT:
        raise CorruptCheckpoint(f"{str(meta_path)!r} has format {meta.get('format')!r}, expected {CACHE_FORMAT}")
    plan = QuantPlan(**meta["plan"]) if meta["plan"] else None
    return meta["config"], _dtype(meta["dtype"]), plan, weights_path


def cache_matches(directory, source, config, dtype, plan) -> bool:
    meta_path = Path(directory) / "quant.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return False
    plan = QuantPlan.parse(plan)
    return (meta.get("format") == CACHE_FORMAT and meta.get("config") == config.to_dict()
            and meta.get("dtype") == _dtype_name(dtype)
            and meta.get("plan") == (plan.to_dict() if plan else None)
            and meta.get("source") == _source_id(source))
