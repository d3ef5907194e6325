"""PersonaPlex / Moshi language model in MLX: temporal transformer + depformer.

One 12.5 Hz frame = `embed` (17 token streams summed) -> `temporal` (32 layers over time, ring KV
cache bounded by `config.context`) -> `depformer_step` s = 0..dep_q-1 (6 small layers over the
codebooks of this frame, one weight set per codebook). Sampling, delays and the token ring live in
`engine/models/gen.py`; this module only maps tokens to logits.

Layout choices (for a host-bound GPU backend): per-codebook weights are stored stacked and sliced
with a static index (no per-step modules, no gathers); audio embeddings are one flat table so the 16
audio lookups are a single `take`; nothing in a step reads values back to the host. All state
(`LmCache`, `DepformerCache`) is owned by the caller, so one loaded model serves many sessions.

Key names on disk are the reference's (`moshi.models.lm.LMModel` state dict, PersonaPlex layout);
`sanitize` converts them to this module tree.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError, CorruptCheckpoint, ModelNotFound
from . import quant
from .ring_attn import ring_attention

_PERSONAPLEX_DELAYS = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

# Reference LMModel / loader kwargs that do not change the inference network (or are overridden).
_IGNORED_KEYS = {
    "depformer_context", "depformer_max_period", "depformer_causal", "quantize", "device", "dtype",
    "gradient_checkpointing", "checkpointing", "conditioners", "fuser", "extra_heads_num_heads",
    "extra_heads_dim", "model_type", "moshi_name", "mimi_name", "tokenizer_name", "lm_gen_config",
    "lora", "lora_rank", "lora_scaling", "max_seq_len", "stack_size",
}
# Reference kwargs whose only supported value is the one given here.
_FIXED_KEYS = {
    "layer_scale": None, "depformer_layer_scale": None, "kv_repeat": 1, "depformer_kv_repeat": 1,
    "norm_emb": False, "bias_proj": False, "depformer_norm": None, "demux_second_text_stream": False,
    "depformer_low_rank_embeddings": None, "depformer_weights_per_step_schedule": None,
    "cross_attention": False, "skip_self_attn": False,
}


@dataclass
class LmConfig:
    """All hyperparameters of the LM. Field names are the reference `LMModel` keyword names.

    Defaults are nvidia/personaplex-7b-v1 (spec section 3), including the loader's dep_q=16.
    """

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000
    max_period: float = 10000.0
    positional_embedding: str = "rope"
    norm: str = "rms_norm_f32"
    gating: str = "silu"
    causal: bool = True
    text_card: int = 32000
    text_card_out: int | None = None
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    card: int = 2048
    n_q: int = 16
    dep_q: int = 16
    delays: tuple[int, ...] = _PERSONAPLEX_DELAYS
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int | None = 4224
    depformer_multi_linear: bool = True
    depformer_weights_per_step: bool = True
    depformer_pos_emb: str = "none"
    depformer_gating: str = "silu"

    def __post_init__(self):
        self.delays = tuple(int(d) for d in self.delays)
        self.validate()

    # ---- construction
    @classmethod
    def personaplex(cls) -> "LmConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "LmConfig":
        """The PersonaPlex structure (17 streams, delays, dep_q 16, card 2048, context 3000) with
        small widths, and a 1000-piece text vocabulary (the tiny SentencePiece model). Widths are
        chosen so every matrix quantizes with group size 64 (gating hidden 384 / 192)."""
        return cls(dim=128, num_heads=4, num_layers=2, hidden_scale=4.5, text_card=1000,
                   depformer_dim=64, depformer_num_heads=4, depformer_num_layers=2,
                   depformer_dim_feedforward=288)

    @classmethod
    def from_dict(cls, d: dict) -> "LmConfig":
        """Our field names or the reference `LMModel`/loader kwarg names (unknown extras rejected)."""
        if not isinstance(d, dict):
            raise ConfigError(f"LM config must be a dict, got {type(d).__name__}")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k in _FIXED_KEYS:
                if v != _FIXED_KEYS[k] and not (v in (0, None, False) and _FIXED_KEYS[k] in (0, None, False)):
                    raise ConfigError(f"LM config {k}={v!r} is not supported (only {_FIXED_KEYS[k]!r})")
            elif k == "dim_feedforward":
                raise ConfigError("LM config: give hidden_scale (the reference LMModel has no dim_feedforward)")
            elif k in _IGNORED_KEYS:
                if k in ("conditioners", "fuser") and v not in (None, {}, []):
                    raise ConfigError(f"LM config {k}={v!r}: conditioned models are not supported")
            else:
                unknown.append(k)
        if unknown:
            raise ConfigError(f"LM config has unknown keys {sorted(unknown)}; "
                              f"valid keys: {sorted(names)}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["delays"] = list(self.delays)
        return d

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(f"invalid LM config: {msg}")
        for name in ("dim", "num_heads", "num_layers", "context", "text_card", "card", "n_q",
                     "depformer_dim", "depformer_num_heads", "depformer_num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name}={v!r} must be a positive int")
        if not isinstance(self.dep_q, int) or not 0 < self.dep_q <= self.n_q:
            bad(f"dep_q={self.dep_q!r} must be in 1..n_q={self.n_q}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            bad(f"dim={self.dim} must split into num_heads={self.num_heads} heads of even size")
        if self.depformer_dim % self.depformer_num_heads:
            bad(f"depformer_dim={self.depformer_dim} not divisible by {self.depformer_num_heads} heads")
        if len(self.delays) != self.n_q + 1 or min(self.delays) < 0:
            bad(f"delays={list(self.delays)} must be n_q+1={self.n_q + 1} non-negative ints")
        if self.norm not in ("rms_norm_f32", "rms_norm"):
            bad(f"norm={self.norm!r} (supported: rms_norm_f32, rms_norm)")
        for name in ("gating", "depformer_gating"):
            v = getattr(self, name)
            if v is not None and v != "silu":
                bad(f"{name}={v!r} (supported: silu)")
        if self.positional_embedding != "rope":
            bad(f"positional_embedding={self.positional_embedding!r} (supported: rope)")
        if self.depformer_pos_emb != "none":
            bad(f"depformer_pos_emb={self.depformer_pos_emb!r} (supported: none)")
        if not self.causal:
            bad("causal=False is not supported")

    # ---- derived sizes
    @property
    def num_codebooks(self) -> int:
        return self.n_q + 1

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def text_out(self) -> int:
        return self.text_card if self.text_card_out is None else self.text_card_out

    @property
    def norm_eps(self) -> float:
        return 1e-8 if self.norm == "rms_norm_f32" else 1e-5

    @staticmethod
    def _gating_hidden(dim: int, dff: int) -> int:
        # Rule of the reference ActivationGating.
        return (21 * dim) // 8 if dff == 4 * dim else (2 * dff) // 3

    @property
    def hidden(self) -> int:
        return self._gating_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden(self) -> int:
        dff = self.depformer_dim_feedforward
        if dff is None:
            dff = int(self.hidden_scale * self.depformer_dim)
        return self._gating_hidden(self.depformer_dim, dff)

    @property
    def depformer_slots(self) -> int:
        """Number of per-step weight sets in the depformer layers."""
        return self.dep_q if self.depformer_weights_per_step else 1

    @property
    def depformer_in_slots(self) -> int:
        return self.dep_q if self.depformer_multi_linear else 1


# ----------------------------------------------------------------------------- layers
def _qmm(x, w, scales, biases, group_size, bits):
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


class Linear(nn.Module):
    """y = x @ W.T (no bias). Optionally affine-quantized (`to_quantized`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = mx.zeros((out_dim, in_dim))
        self.bits = None
        self.group_size = None

    def quantize(self, bits: int, group_size: int = 64) -> None:
        self.weight, self.scales, self.biases = mx.quantize(self.weight, group_size, bits)
        self.bits, self.group_size = bits, group_size

    def __call__(self, x, dense: bool = False):
        """dense=True (prefill chunks on a GPU): dequantize and use the dense matmul instead of
        `quantized_matmul`, whose M > 1 path is suspected slow on MLX CUDA (bench/gpu_probe.py)."""
        if self.bits is None:
            return x @ self.weight.T
        if dense:
            w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)
            return x @ w.astype(x.dtype).T
        return _qmm(x, self.weight, self.scales, self.biases, self.group_size, self.bits)


class MultiLinear(nn.Module):
    """`slots` linears stacked as one (slots*out, in) matrix; slot s uses rows [s*out, (s+1)*out)."""

    def __init__(self, slots: int, in_dim: int, out_dim: int):
        super().__init__()
        self.slots, self.out_dim = slots, out_dim
        self.weight = mx.zeros((slots * out_dim, in_dim))
        self.bits = None
        self.group_size = None

    def quantize(self, bits: int, group_size: int = 64) -> None:
        self.weight, self.scales, self.biases = mx.quantize(self.weight, group_size, bits)
        self.bits, self.group_size = bits, group_size

    def __call__(self, x, s: int):
        s = min(s, self.slots - 1)
        lo, hi = s * self.out_dim, (s + 1) * self.out_dim
        if self.bits is None:
            return x @ self.weight[lo:hi].T
        return _qmm(x, self.weight[lo:hi], self.scales[lo:hi], self.biases[lo:hi],
                    self.group_size, self.bits)


class Table(nn.Module):
    """Embedding table(s) stacked as one (tables*rows, dim) matrix. Index -1 gives a zero vector."""

    def __init__(self, tables: int, rows: int, dim: int):
        super().__init__()
        self.tables, self.rows = tables, rows
        self.weight = mx.zeros((tables * rows, dim))
        self.bits = None
        self.group_size = None

    def quantize(self, bits: int, group_size: int = 64) -> None:
        self.weight, self.scales, self.biases = mx.quantize(self.weight, group_size, bits)
        self.bits, self.group_size = bits, group_size

    def lookup(self, idx, out_dtype):
        """idx: int array of flat row indices (already clamped >= 0)."""
        if self.bits is None:
            return self.weight[idx]
        return mx.dequantize(self.weight[idx], self.scales[idx], self.biases[idx],
                             self.group_size, self.bits).astype(out_dtype)

    def __call__(self, tokens, table: int = 0, out_dtype=mx.float32):
        valid = tokens >= 0
        idx = mx.maximum(tokens, 0) + table * self.rows
        e = self.lookup(idx, out_dtype)
        return mx.where(valid[..., None], e, mx.zeros((), e.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


class _Attention(nn.Module):
    def __init__(self, dim, slots=None):
        super().__init__()
        if slots is None:
            self.in_proj, self.out_proj = Linear(dim, 3 * dim), Linear(dim, dim)
        else:
            self.in_proj, self.out_proj = MultiLinear(slots, dim, 3 * dim), MultiLinear(slots, dim, dim)


class _Gating(nn.Module):
    def __init__(self, dim, hidden, slots=None):
        super().__init__()
        if slots is None:
            self.linear_in, self.linear_out = Linear(dim, 2 * hidden), Linear(hidden, dim)
        else:
            self.linear_in = MultiLinear(slots, dim, 2 * hidden)
            self.linear_out = MultiLinear(slots, hidden, dim)


class _Layer(nn.Module):
    def __init__(self, dim, hidden, eps, slots=None):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.self_attn = _Attention(dim, slots)
        self.gating = _Gating(dim, hidden, slots)


class _Stack(nn.Module):
    def __init__(self, n, *args):
        super().__init__()
        self.layers = [_Layer(*args) for _ in range(n)]


def _silu_gate(y):
    a, b = mx.split(y, 2, axis=-1)
    return nn.silu(a) * b


# ----------------------------------------------------------------------------- state
@dataclass
class LmCache:
    """Temporal KV rings of B conversations, each row at its own position.

    keys/values[l]: (R, H, context, head_dim) with R >= B (rows past B are spare capacity a slot
    manager fills later; a step writes garbage at their slot 0), in the model's dtype or as fp8
    e4m3 bits (uint8, `make_cache(kv_dtype="fp8")`: half the memory and bandwidth; see
    `to_cache`); `pos` (B, context) the absolute
    position each row stored in each slot (-1 empty); `offset` (B,) each row's next absolute
    position (an mx array, so compiled steps don't retrace) and `steps` its host-side mirror.
    Memory is fixed at creation: positions keep growing (RoPE stays absolute), slots are reused
    modulo `context`.
    """

    keys: list
    values: list
    pos: mx.array
    offset: mx.array
    steps: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def uniform(self) -> bool:
        """Every row at the same position (a B=1 conversation always is)."""
        return bool((self.steps == self.steps[0]).all())

    @property
    def step(self) -> int:
        """The rows' common position (calls so far); an error when the rows differ."""
        if not self.uniform:
            raise ConfigError(f"the rows of this cache are at different positions {self.steps.tolist()}")
        return int(self.steps[0])

    def copy(self) -> "LmCache":
        # mx arrays are immutable values: sharing them is a snapshot.
        return LmCache(list(self.keys), list(self.values), self.pos, self.offset, self.steps.copy())

    def arrays(self) -> list:
        return [*self.keys, *self.values, self.pos, self.offset]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


@dataclass
class DepformerCache:
    """Per-frame depformer KV (keys/values[l]: (B, H, steps so far, head_dim)); make one per frame."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    steps: int = 0


# ----------------------------------------------------------------------------- model
class LM(nn.Module):
    def __init__(self, config: LmConfig | None = None, dtype=mx.float32):
        super().__init__()
        c = self.config = config or LmConfig.personaplex()
        self.dtype = dtype
        self.text_emb = Table(1, c.text_card + 1, c.dim)
        self.emb = Table(c.n_q, c.card + 1, c.dim)
        self.transformer = _Stack(c.num_layers, c.dim, c.hidden, c.norm_eps)
        self.out_norm = RMSNorm(c.dim, c.norm_eps)
        self.text_linear = Linear(c.dim, c.text_out)
        self.depformer_in = MultiLinear(c.depformer_in_slots, c.dim, c.depformer_dim)
        self.depformer_text_emb = Table(1, c.text_card + 1, c.depformer_dim)
        self.depformer_emb = Table(max(c.dep_q - 1, 1), c.card + 1, c.depformer_dim)
        self.depformer = _Stack(c.depformer_num_layers, c.depformer_dim, c.depformer_hidden,
                                c.norm_eps, c.depformer_slots)
        self.linears = MultiLinear(c.dep_q, c.depformer_dim, c.card)
        self.quant_plan = None
        self._compiled = None
        # Diagnostics only (respond_diagnostic): fn(name, hidden) after each quarter of the temporal
        # layers. Set it on an uncompiled model; None costs nothing.
        self.stats_hook = None
        self._audio_base = mx.arange(c.n_q, dtype=mx.int32)[:, None] * (c.card + 1)
        # Prefill chunks of at least this many positions run quantized matmuls as dequantize +
        # dense matmul (None: never). MLX 0.32's quantized_matmul costs about M times its M=1
        # cost for M rows: measured on the CPU, 64 rows run 4-18x slower than dequantize + BLAS;
        # on CUDA it is the prime suspect of the slow batched prefill (bench/gpu_probe.py).
        self.dense_prefill_rows = 16

    # ---- loading
    @classmethod
    def from_file(cls, path, config: LmConfig | None = None, dtype=mx.bfloat16, quantize=None) -> "LM":
        """Load a reference-layout `model.safetensors` (e.g. nvidia/personaplex-7b-v1).

        quantize: None, 4, 8, or an `engine.models.quant.QuantPlan` (applied after loading).
        """
        path = Path(path)
        if not path.is_file():
            raise ModelNotFound(f"LM checkpoint {str(path)!r} does not exist")
        try:
            weights = mx.load(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
            raise CorruptCheckpoint(f"cannot read LM checkpoint {str(path)!r}: {e}") from None
        return cls.from_weights(weights, config, dtype, quantize)

    @classmethod
    def from_weights(cls, weights: dict, config: LmConfig | None = None, dtype=mx.bfloat16,
                     quantize=None) -> "LM":
        config = config or LmConfig.personaplex()
        lm = cls(config, dtype)
        lm.load_sanitized(sanitize(weights, config))
        if quantize is not None:
            quant.apply(lm, quant.QuantPlan.parse(quantize))
        return lm

    @classmethod
    def from_cache(cls, directory) -> "LM":
        """Load a model written by `quant.save` as it is (no re-quantization)."""
        config, dtype, plan, weights_path = quant.read_cache(directory)
        try:
            weights = mx.load(str(weights_path))
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"cannot read {str(weights_path)!r}: {e}") from None
        return cls.from_quantized(weights, LmConfig.from_dict(config), dtype, plan)

    @classmethod
    def from_quantized(cls, weights: dict, config: LmConfig, dtype, plan) -> "LM":
        """A model from weights in this module tree that are already quantized by `plan` (packed
        weights + `scales` / `biases`, as `quant.save` or engine/models/mlx_layout.py give them):
        loaded as they are, never re-quantized. Float arrays are cast to `dtype`."""
        lm = cls(config, dtype)
        quant.apply(lm, plan, evaluate=False)  # shapes only: the lazy zeros are never computed
        lm.load_sanitized(weights)
        return lm

    @classmethod
    def cached(cls, source, cache_dir, config: LmConfig | None = None, dtype=mx.bfloat16,
               quantize=None) -> "LM":
        """`source` (a reference model.safetensors) quantized by `quantize`, through `cache_dir`:
        the first call quantizes and saves, later calls (same file, config, dtype, plan) load."""
        config = config or LmConfig.personaplex()
        if quant.cache_matches(cache_dir, source, config, dtype, quantize):
            return cls.from_cache(cache_dir)
        lm = cls.from_file(source, config, dtype, quantize)
        quant.save(lm, cache_dir, source)
        return lm

    @classmethod
    def random(cls, config: LmConfig | None = None, dtype=mx.bfloat16, seed: int = 0) -> "LM":
        """Random weights generated directly in MLX at the config's shapes (benchmarks)."""
        lm = cls(config, dtype)
        key = mx.random.key(seed)
        params = {}
        for name, p in _flatten(lm.parameters()):
            key, k = mx.random.split(key)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "out_norm.weight":
                params[name] = mx.ones(p.shape, dtype)
            else:
                std = 1.0 if "emb" in name else 1.0 / math.sqrt(p.shape[-1])
                params[name] = (std * mx.random.normal(p.shape, key=k)).astype(dtype)
            mx.eval(params[name])
        lm.load_weights(list(params.items()), strict=True)
        return lm

    def load_sanitized(self, weights: dict) -> None:
        expected = dict(_flatten(self.parameters()))
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise CorruptCheckpoint(f"LM checkpoint does not match the config: missing {missing[:8]}"
                                    f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                                    f"{' ...' if len(extra) > 8 else ''}")
        items = []
        for k, v in weights.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CorruptCheckpoint(f"LM weight {k!r} has shape {tuple(v.shape)}, expected "
                                        f"{tuple(expected[k].shape)} for this config")
            if mx.issubdtype(v.dtype, mx.floating) and v.dtype != self.dtype:
                v = v.astype(self.dtype)
            elif v.dtype != expected[k].dtype:
                raise CorruptCheckpoint(f"LM weight {k!r} has dtype {v.dtype}, expected {expected[k].dtype}")
            items.append((k, v))
        self.load_weights(items, strict=True)
        mx.eval(self.parameters())

    # ---- state
    def make_cache(self, batch_size: int = 1, kv_dtype: str = "model") -> LmCache:
        """An empty KV ring for `batch_size` conversations; kv_dtype "model" (the model's dtype) or
        "fp8" (e4m3 bits, see `to_cache`)."""
        c = self.config
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1")
        dt = self.kv_storage(kv_dtype)
        shape = (batch_size, c.num_heads, c.context, c.head_dim)
        keys = [mx.zeros(shape, dt) for _ in range(c.num_layers)]
        values = [mx.zeros(shape, dt) for _ in range(c.num_layers)]
        return LmCache(keys, values, mx.full((batch_size, c.context), -1, mx.int32),
                       mx.zeros((batch_size,), mx.int32), np.zeros(batch_size, np.int64))

    def kv_storage(self, kv_dtype: str):
        """The mx dtype a KV ring of `kv_dtype` ("model" or "fp8") is stored in."""
        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype={kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
        return mx.uint8 if kv_dtype == "fp8" else self.dtype

    def make_depformer_cache(self) -> DepformerCache:
        """A fresh per-frame depformer KV (its arrays take their batch size from the first step)."""
        return DepformerCache()

    # ---- temporal
    def embed(self, tokens: mx.array) -> mx.array:
        """tokens int (B, n_q+1, T) -> summed input embeddings (B, T, dim). -1 -> zero vector."""
        c = self.config
        if tokens.ndim != 3 or tokens.shape[1] != c.num_codebooks:
            raise ConfigError(f"embed expects tokens (B, {c.num_codebooks}, T), got {tuple(tokens.shape)}")
        tokens = tokens.astype(mx.int32)
        x = self.text_emb(tokens[:, 0], 0, self.dtype)                    # (B, T, D)
        audio = tokens[:, 1:]                                               # (B, n_q, T)
        valid = audio >= 0
        idx = mx.maximum(audio, 0) + self._audio_base
        e = self.emb.lookup(idx, self.dtype)                               # (B, n_q, T, D)
        e = mx.where(valid[..., None], e, mx.zeros((), e.dtype))
        return x + e.sum(axis=1)

    def temporal(self, x: mx.array, cache: LmCache, compiled: bool | None = None):
        """x (B, T, dim) -> (h (B, T, dim) after out_norm, text_logits (B, T, text_out)).

        Advances every row of `cache` by T positions; rows at different positions step with T=1.
        T > 1 (prefill) is exact as long as the chunk does not wrap past `context` positions (the
        reference writes keys before attending, like here). compiled=False runs the eager graph
        even on a compiled model (prefill chunks of varying length would otherwise trace one graph
        per length).
        """
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.dim or x.shape[0] != cache.batch_size:
            raise ConfigError(f"temporal expects x (B={cache.batch_size}, T, {c.dim}), got {tuple(x.shape)}")
        B, T = x.shape[:2]
        if T > c.context:
            raise ConfigError(f"temporal chunk of {T} steps exceeds the context {c.context}")
        if cache.uniform:
            flags = self.temporal_flags(T, int(cache.steps[0]))
        elif T == 1:
            flags = self.row_flags(full=False)
        else:
            raise ConfigError("rows at different positions step one position at a time (T=1)")
        if self._compiled and compiled is not False:
            fn = self._compiled["temporal"].get(flags)
            if fn is None:
                fn = self._compiled["temporal"][flags] = mx.compile(functools.partial(self._temporal, flags=flags))
        else:
            fn = functools.partial(self._temporal, flags=flags)
        h, logits = self.take_temporal_state(fn(x.astype(self.dtype), *cache.arrays()), cache, T)
        return h[:B * T].reshape(B, T, -1), logits.reshape(B, T, -1)

    def temporal_flags(self, T: int, step: int) -> tuple:
        """Static (host-known) facts about a chunk of T positions starting at absolute `step` in
        every row, which pick the cheapest exact graph (the key of a compiled temporal graph):
        (write, dense, width, rows, full, attn). write "slice": the chunk's ring slots do not wrap,
        so keys go in with one slice update, "scatter" otherwise; dense: quantized matmuls as
        dequantize + dense matmul; attn "mlx" (see `row_flags`). A single step (T=1) always gets
        the same flags, so a compiled live step is traced once (no retrace when the ring fills up
        mid-conversation)."""
        C = self.config.context
        write = "slice" if (step % C) + T <= C else "scatter"
        rows = self.dense_prefill_rows
        dense = rows is not None and self.quant_plan is not None and T >= rows
        return write, dense, None, None, False, "mlx"

    def row_flags(self, width: int | None = None, rows: int | None = None, full: bool = False,
                  attn: str = "mlx") -> tuple:
        """Flags of one step (T=1) of rows at different positions (a slot manager's batch): each
        row writes its own ring slot. width: attend over the first `width` ring slots only (every
        row's later slots are empty; None: all); rows: run the linear layers on this many rows
        (zero padded, >= B; None: B); full: every row's ring is full, so no mask. attn "mlx":
        MLX's attention over the ring (masked unless full); "ring": the CUDA kernels of
        engine/models/ring_attn.py, which read each row's stored slots only (width and full
        change nothing there: pass None / False, so one graph serves every ring state)."""
        if attn not in ("mlx", "ring"):
            raise ConfigError(f"attn={attn!r}: choose 'mlx' or 'ring'")
        return "rows", False, width, rows, full, attn

    def take_temporal_state(self, out, cache: LmCache, T: int):
        """Store a `_temporal` result's state in `cache` -> (h (R, dim), text_logits (B*T, text_out))."""
        h, logits, *state = out
        L = self.config.num_layers
        cache.keys, cache.values = list(state[:L]), list(state[L:2 * L])
        cache.pos, cache.offset = state[2 * L], state[2 * L + 1]
        cache.steps = cache.steps + T
        return h, logits

    def _temporal(self, x, *state, flags=("slice", False, None, None, False, "mlx")):
        """The temporal transformer as a pure function: x (B, T, dim), state = LmCache.arrays()
        -> (h (R, dim), text_logits (B*T, text_out), *keys, *values, pos, offset + T), where
        R = rows (flags) or B*T: activations are 2-D, so every linear layer is ONE matrix
        product over all rows (on CUDA a (B, 1, D) input is B one-row products, each re-reading
        the whole weight)."""
        c = self.config
        L = c.num_layers
        write, dense, width, rows, full, attn = flags
        keys, values, pos, offset = state[:L], state[L:2 * L], state[2 * L], state[2 * L + 1]
        B, T, D = x.shape
        H, hd, C = c.num_heads, c.head_dim, c.context
        N = B * T
        R = keys[0].shape[0]
        rows = N if rows is None else rows
        if write == "rows":
            if T != 1:
                raise ConfigError("rows at different positions step one position at a time (T=1)")
            slots = (offset % C)[:, None]                                   # (B, 1)
            pos = mx.put_along_axis(pos, slots, offset[:, None], axis=1)    # slot now holds offset
            idx = mx.broadcast_to(_pad_rows(slots, R)[:, None, :, None], (R, H, 1, hd))

            def put(cache_arr, new):
                return mx.put_along_axis(cache_arr, idx, to_cache(_pad_rows(new, R), cache_arr.dtype), axis=2)
            rope_offset = offset
        else:
            if R != B:
                raise ConfigError(f"a cache with spare rows ({R} > {B}) steps with row_flags")
            o = offset[:1]                                                   # every row's position
            t_abs = o if T == 1 else o + mx.arange(T, dtype=mx.int32)        # (T,)
            upd = mx.broadcast_to(t_abs[None], (B, T))
            if write == "slice":
                start = o % C
                pos = mx.slice_update(pos, upd, start, axes=(1,))

                def put(cache_arr, new):
                    return mx.slice_update(cache_arr, to_cache(new, cache_arr.dtype), start, axes=(2,))
            else:
                slots = t_abs % C
                pos = _scatter(pos, slots, upd, axis=1)

                def put(cache_arr, new):
                    return _scatter(cache_arr, slots, to_cache(new, cache_arr.dtype), axis=2)
            rope_offset = o.reshape(())
        if attn == "ring" and T != 1:
            raise ConfigError("the ring attention kernels take one query per row (T=1)")
        if full or attn == "ring":
            mask = None                           # every slot holds one of the last C positions
        elif T == 1:
            mask = (pos >= 0)[:, None, None, :width]   # a stored position is <= t and > t - C
        else:
            delta = t_abs[None, :, None] - pos[:, None, :]                   # (B, T, C)
            mask = ((pos[:, None, :] >= 0) & (delta >= 0) & (delta < C))[:, None]
        scale = 1.0 / math.sqrt(hd)
        new_k, new_v = [], []
        group = max(1, len(self.transformer.layers) // 4)
        x = _pad_rows(x.reshape(N, D), rows)
        for li, (layer, k_cache, v_cache) in enumerate(zip(self.transformer.layers, keys, values)):
            qkv = layer.self_attn.in_proj(layer.norm1(x), dense)
            qkv = qkv[:N] if rows > N else qkv
            # (B, 3H, T, hd): a reshape for T=1; slices below are views, not gathers (GPU kernels).
            qkv = qkv.reshape(B, 3 * H, 1, hd) if T == 1 else qkv.reshape(B, T, 3 * H, hd).transpose(0, 2, 1, 3)
            qk = mx.fast.rope(qkv[:, :2 * H], hd, traditional=True, base=c.max_period, scale=1.0,
                              offset=rope_offset)                            # q and k in one call
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, 2 * H:]
            k_cache, v_cache = put(k_cache, k), put(v_cache, v)
            new_k.append(k_cache)
            new_v.append(v_cache)
            if attn == "ring":            # reads rows < B, stored slots only (pos is this step's)
                a = ring_attention(q, k_cache, v_cache, pos, scale)
            else:
                kw, vw = k_cache, v_cache
                if R > B or (width is not None and width < C):
                    kw, vw = kw[:B, :, :width], vw[:B, :, :width]
                kw, vw = from_cache(kw, q.dtype), from_cache(vw, q.dtype)
                a = mx.fast.scaled_dot_product_attention(q, kw, vw, scale=scale, mask=mask)
            a = a.reshape(N, D) if T == 1 else a.transpose(0, 2, 1, 3).reshape(N, D)
            x = x + layer.self_attn.out_proj(_pad_rows(a, rows), dense)
            x = x + layer.gating.linear_out(_silu_gate(layer.gating.linear_in(layer.norm2(x), dense)), dense)
            if self.stats_hook is not None and (li + 1) % group == 0:
                self.stats_hook(f"layers {li + 1 - group}-{li}", x[:N].reshape(B, T, D))
        h = self.out_norm(x)
        logits = self.text_linear(h)
        return (h, logits[:N] if rows > N else logits, *new_k, *new_v, pos, offset + T)

    # ---- depformer
    def depformer_step(self, s: int, h: mx.array, prev: mx.array, dc: DepformerCache) -> mx.array:
        """Depformer step s (codebook s): h (B, dim) temporal output, prev (B,) int32 the previous
        token (the text token for s=0, codebook s-1 otherwise) -> logits (B, card)."""
        c = self.config
        if not 0 <= s < c.dep_q or s != dc.steps:
            raise ConfigError(f"depformer_step s={s}: expected s == {dc.steps} (steps run in order "
                              f"0..{c.dep_q - 1}, one fresh DepformerCache per frame)")
        fn = self._compiled["dep"][s] if self._compiled else (lambda *a: self._depformer(s, *a))
        logits, *kv = fn(h.astype(self.dtype), prev.astype(mx.int32), *dc.keys, *dc.values)
        L = c.depformer_num_layers
        dc.keys, dc.values = list(kv[:L]), list(kv[L:])
        dc.steps += 1
        return logits

    def depformer_inputs(self, h: mx.array, n: int) -> list:
        """h (B, dim) -> [depformer_in(h, s) (B, depformer_dim) for s < n], one matmul for all n."""
        m = self.depformer_in
        if m.slots == 1:
            return [m(h, 0)] * n
        rows = n * m.out_dim
        if m.bits is None:
            y = h @ m.weight[:rows].T
        else:
            y = _qmm(h, m.weight[:rows], m.scales[:rows], m.biases[:rows], m.group_size, m.bits)
        return [a.squeeze(1) for a in mx.split(y.reshape(h.shape[0], n, m.out_dim), n, axis=1)]

    def _depformer(self, s, h, prev, *kv, x_in=None):
        """Depformer step s as a pure function: h (R, dim) the temporal output (rows >= B: padding),
        prev (B,) the previous token, kv this frame's depformer keys/values so far (x_in: this
        step's `depformer_inputs`, if computed already) -> (logits (B, card), *keys, *values)."""
        c = self.config
        L = c.depformer_num_layers
        keys, values = kv[:L], kv[L:]
        B, R = prev.shape[0], h.shape[0]
        H, D = c.depformer_num_heads, c.depformer_dim
        hd = D // H
        x = self.depformer_in(h.astype(self.dtype), s) if x_in is None else x_in
        prev = _pad_rows(prev.astype(mx.int32), R)
        x = x + (self.depformer_text_emb(prev, 0, self.dtype) if s == 0
                 else self.depformer_emb(prev, s - 1, self.dtype))
        scale = 1.0 / math.sqrt(hd)
        new_k, new_v = [], []
        for i, layer in enumerate(self.depformer.layers):
            qkv = layer.self_attn.in_proj(layer.norm1(x), s).reshape(R, 3 * H, 1, hd)
            q, k, v = qkv[:, :H], qkv[:, H:2 * H], qkv[:, 2 * H:]           # views (no gather)
            if s > 0:
                k = mx.concatenate([keys[i], k], axis=2)
                v = mx.concatenate([values[i], v], axis=2)
                a = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
            else:
                a = v   # one key: its softmax weight is exactly 1
            new_k.append(k)
            new_v.append(v)
            x = x + layer.self_attn.out_proj(a.reshape(R, D), s)
            x = x + layer.gating.linear_out(_silu_gate(layer.gating.linear_in(layer.norm2(x), s)), s)
        return (self.linears(x[:B] if R > B else x, s), *new_k, *new_v)

    # ---- compilation
    def compile(self) -> "LM":
        """Route temporal/depformer steps through mx.compile (one trace per T / per step s)."""
        self._compiled = {
            "temporal": {},   # one compiled graph per temporal_flags(), traced on first use
            "dep": [mx.compile(lambda *a, s=s: self._depformer(s, *a)) for s in range(self.config.dep_q)],
        }
        return self

    def uncompile(self) -> "LM":
        self._compiled = None
        return self

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for _, v in _flatten(self.parameters()))


def _flatten(tree):
    from mlx.utils import tree_flatten
    return tree_flatten(tree)


def _pad_rows(x: mx.array, rows: int) -> mx.array:
    """x with zero rows appended up to `rows` rows (x itself when it has them)."""
    b = x.shape[0]
    return x if rows == b else mx.concatenate([x, mx.zeros((rows - b, *x.shape[1:]), x.dtype)])


KV_DTYPES = ("model", "fp8")


def to_cache(x: mx.array, dtype) -> mx.array:
    """x as a KV ring stores it: `dtype` itself, or for uint8 the fp8 e4m3 bits of x (mx.to_fp8:
    3 mantissa bits, magnitudes saturating at 448, below 2^-9 rounding to 0); values already
    stored that way are returned as they are."""
    if x.dtype == dtype:
        return x
    if x.dtype == mx.uint8:                       # fp8 bits into a wider ring: decode them
        return mx.from_fp8(x, dtype=dtype)
    return mx.to_fp8(x) if dtype == mx.uint8 else x.astype(dtype)


def from_cache(x: mx.array, dtype) -> mx.array:
    """A stored KV ring as `dtype` values (fp8 e4m3 decoded; other dtypes returned as they are)."""
    return mx.from_fp8(x, dtype=dtype) if x.dtype == mx.uint8 else x


def _scatter(a, idx, upd, axis):
    """a with a[..., idx, ...] = upd along `axis` (idx int32 (T,), upd's `axis` dim T)."""
    index = [slice(None)] * axis + [idx]
    a[tuple(index)] = upd
    return a


# ----------------------------------------------------------------------------- checkpoints
_STEP_KEY = re.compile(r"^(depformer_in|depformer_emb|linears)\.(\d+)\.weight$")
_GATING_KEY = re.compile(r"^depformer\.layers\.(\d+)\.gating\.(\d+)\.(linear_in|linear_out)\.weight$")
_COMPANION_KEY = re.compile(r"^(.*)([._])(scales|biases)$")
_DROP_PREFIXES = ("extra_heads.",)


@dataclass
class _Param:
    """One matrix of a checkpoint: its weight and, for an MLX affine-quantized matrix, the packed
    uint32 weight with its per-group `scales` and `biases` (which follow every stacking step)."""

    key: str
    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def items(self, dst: str):
        """(key, array) pairs under our name `dst` ("....weight")."""
        yield dst, self.weight
        if self.quantized:
            base = dst[: -len("weight")]
            yield base + "scales", self.scales
            yield base + "biases", self.biases


def _group_companions(weights: dict, describe) -> dict:
    """key -> _Param: `X.scales`/`X.biases` (or `X_scales`/`X_biases` next to a packed `X_weight`)
    join the weight they quantize."""
    comp, plain = {}, {}
    for k, v in weights.items():
        m = _COMPANION_KEY.match(k)
        if m:
            comp.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = v
        else:
            plain[k] = v
    out = {}
    for k, v in plain.items():
        c = comp.pop((k[: -len("weight") - 1], k[-len("weight") - 1]), None) if k.endswith("weight") else None
        if c is not None and len(c) != 2:
            raise CorruptCheckpoint(f"LM checkpoint has {describe(k)} with {sorted(c)} but not both "
                                    "scales and biases")
        out[k] = _Param(k, v, c["scales"], c["biases"]) if c else _Param(k, v)
    if comp:
        orphans = sorted(f"{base}{sep}{kind}" for (base, sep), c in comp.items() for kind in c)
        raise CorruptCheckpoint(f"LM checkpoint has quantization scales/biases without their weight: "
                                f"{', '.join(describe(k) for k in orphans[:4])}")
    return out


def _cat(parts: list, what: str, describe) -> _Param:
    """Stack matrices on axis 0 (all float, or all quantized alike)."""
    if len(parts) == 1:
        return parts[0]
    q = {p.quantized for p in parts}
    if len(q) > 1:
        raise CorruptCheckpoint(f"LM checkpoint mixes quantized and float matrices in {what}: "
                                f"{', '.join(describe(p.key) for p in parts if p.quantized)[:200]} are "
                                "quantized, the others are not")
    try:
        cat = [mx.concatenate([getattr(p, a) for p in parts], axis=0)
               for a in (("weight", "scales", "biases") if q == {True} else ("weight",))]
    except ValueError:
        shapes = sorted({(describe(p.key), tuple(p.weight.shape)) for p in parts})
        raise CorruptCheckpoint(f"LM checkpoint: the matrices of {what} do not stack (shapes {shapes[:4]})") from None
    return _Param(parts[0].key, *cat)


def _zeros_like(p: _Param) -> _Param:
    if p.quantized:
        return _Param(p.key, mx.zeros_like(p.weight), mx.zeros_like(p.scales), mx.zeros_like(p.biases))
    return _Param(p.key, mx.zeros_like(p.weight))


def sanitize(weights: dict, config: LmConfig | None = None, describe=None) -> dict:
    """Reference key names (PersonaPlex `model.safetensors`, or a PyPI moshi `LMModel.state_dict()`)
    -> this module tree. Pure: returns a new dict, arrays untouched except stacking / reshaping.

    Applies the PersonaPlex loader fix-ups when the checkpoint has fewer depformer steps than
    `config.dep_q` (8 -> 16): packed depformer attention weights are repeated, missing per-step
    `gating.N`, `linears.N`, `depformer_in.N`, `depformer_emb.N` are copied from N-8.

    A matrix may come MLX affine-quantized: its packed uint32 weight plus `.scales` / `.biases`
    (`_scales` / `_biases` next to a packed `in_proj_weight`); they are stacked with it and come
    out as `<our name>.scales` / `.biases` (engine/models/mlx_layout.py reads such checkpoints).
    `describe(key)` renders a key in error messages (default: repr).
    """
    c = config or LmConfig.personaplex()
    describe = describe or repr
    w = _group_companions({k: v for k, v in weights.items() if not k.startswith(_DROP_PREFIXES)}, describe)
    out = {}

    def take(key):
        if key not in w:
            raise CorruptCheckpoint(f"LM checkpoint is missing {describe(key)}")
        return w.pop(key)

    def attn_proj(prefix, name, packed_key):
        # `in_proj_weight` (PersonaPlex) / `in_proj.weight` / per-step `in_projs.{i}.weight` (PyPI moshi).
        for k in (f"{prefix}.{packed_key}", f"{prefix}.{name}.weight"):
            if k in w:
                return w.pop(k)
        parts = sorted((int(m.group(1)), k) for k in list(w)
                       if (m := re.fullmatch(re.escape(f"{prefix}.{name}s.") + r"(\d+)\.weight", k)))
        if not parts:
            raise CorruptCheckpoint(f"LM checkpoint is missing {describe(f'{prefix}.{packed_key}')}")
        return _cat([w.pop(k) for _, k in parts], f"{prefix}.{name}", describe)

    def norm(src, dst):
        a = take(src)
        if a.quantized:
            raise CorruptCheckpoint(f"LM checkpoint: norm {describe(src)} must not be quantized")
        out[dst] = _Param(src, a.weight.reshape(-1))

    out["text_emb.weight"] = take("text_emb.weight")
    out["emb.weight"] = _cat([take(f"emb.{q}.weight") for q in range(c.n_q)], "emb", describe)
    out["text_linear.weight"] = take("text_linear.weight")
    norm("out_norm.alpha", "out_norm.weight")
    for i in range(c.num_layers):
        p = f"transformer.layers.{i}"
        out[f"{p}.self_attn.in_proj.weight"] = attn_proj(f"{p}.self_attn", "in_proj", "in_proj_weight")
        out[f"{p}.self_attn.out_proj.weight"] = attn_proj(f"{p}.self_attn", "out_proj", "out_proj_weight")
        norm(f"{p}.norm1.alpha", f"{p}.norm1.weight")
        norm(f"{p}.norm2.alpha", f"{p}.norm2.weight")
        for n in ("linear_in", "linear_out"):
            out[f"{p}.gating.{n}.weight"] = take(f"{p}.gating.{n}.weight")

    # Per-step depformer tensors, with the dep_q 8 -> 16 copy fix-up.
    steps = {}
    for k in list(w):
        m = _STEP_KEY.match(k)
        if m:
            steps[(m.group(1), int(m.group(2)))] = w.pop(k)

    def stacked(name, n):
        parts = []
        for s in range(n):
            src = s
            while (name, src) not in steps and src >= 8:
                src -= 8
            if (name, src) not in steps:
                if name == "depformer_emb" and s == 7 and (name, 6) in steps and n > 8:
                    # 8-step checkpoint: the reference leaves this table at its random init (it
                    # only feeds step 8, the user's cb0); zeros are the deterministic stand-in.
                    parts.append(_zeros_like(steps[(name, 6)]))
                    continue
                raise CorruptCheckpoint(f"LM checkpoint is missing {describe(f'{name}.{s}.weight')}")
            parts.append(steps[(name, src)])
        return _cat(parts, name, describe)

    out["depformer_in.weight"] = stacked("depformer_in", c.depformer_in_slots)
    out["depformer_emb.weight"] = stacked("depformer_emb", max(c.dep_q - 1, 1))
    out["linears.weight"] = stacked("linears", c.dep_q)
    out["depformer_text_emb.weight"] = take("depformer_text_emb.weight")
    S, Dd = c.depformer_slots, c.depformer_dim
    gat = {}
    for k in list(w):
        m = _GATING_KEY.match(k)
        if m:
            gat[(int(m.group(1)), int(m.group(2)), m.group(3))] = w.pop(k)
    for j in range(c.depformer_num_layers):
        p = f"depformer.layers.{j}"
        for name, packed, rows in (("in_proj", "in_proj_weight", 3 * Dd), ("out_proj", "out_proj_weight", Dd)):
            a = attn_proj(f"{p}.self_attn", name, packed)
            n_rows = a.weight.shape[0]
            if n_rows != S * rows and n_rows > 0 and (S * rows) % n_rows == 0 and n_rows % rows == 0:
                a = _cat([a] * (S * rows // n_rows), f"{p}.self_attn.{name}", describe)  # 8-step checkpoint -> 16 slots
            out[f"{p}.self_attn.{name}.weight"] = a
        norm(f"{p}.norm1.alpha", f"{p}.norm1.weight")
        norm(f"{p}.norm2.alpha", f"{p}.norm2.weight")
        for n in ("linear_in", "linear_out"):
            if S == 1 and f"{p}.gating.{n}.weight" in w:
                out[f"{p}.gating.{n}.weight"] = w.pop(f"{p}.gating.{n}.weight")
                continue
            parts = []
            for s in range(S):
                src = s
                while (j, src, n) not in gat and src >= 8:
                    src -= 8
                if (j, src, n) not in gat:
                    raise CorruptCheckpoint(f"LM checkpoint is missing {describe(f'{p}.gating.{s}.{n}.weight')}")
                parts.append(gat[(j, src, n)])
            out[f"{p}.gating.{n}.weight"] = _cat(parts, f"{p}.gating.{n}", describe)
    leftover = sorted(k for k in w if not (_STEP_KEY.match(k) or _GATING_KEY.match(k)))
    if leftover:
        raise CorruptCheckpoint(f"LM checkpoint has unexpected keys for this config: "
                                f"{', '.join(describe(k) for k in leftover[:8])}{' ...' if len(leftover) > 8 else ''}")
    return {k: v for dst, p in out.items() for k, v in p.items(dst)}


def random_state_dict(config: LmConfig | None = None, seed: int = 0) -> dict:
    """Deterministic random fp32 weights in the reference (PersonaPlex) key names and shapes."""
    c = config or LmConfig.tiny()
    rng = np.random.default_rng(seed)
    sd = {}

    def lin(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim), dtype=np.float32) / math.sqrt(in_dim)).astype(np.float32)

    def alpha(d):
        return (1.0 + 0.1 * rng.standard_normal((1, 1, d))).astype(np.float32)

    def table(rows, d):
        return rng.standard_normal((rows, d), dtype=np.float32)

    D, Dd, S = c.dim, c.depformer_dim, c.depformer_slots
    sd["text_emb.weight"] = table(c.text_card + 1, D)
    for q in range(c.n_q):
        sd[f"emb.{q}.weight"] = table(c.card + 1, D)
    for i in range(c.num_layers):
        p = f"transformer.layers.{i}"
        sd[f"{p}.self_attn.in_proj_weight"] = lin(3 * D, D)
        sd[f"{p}.self_attn.out_proj.weight"] = lin(D, D)
        sd[f"{p}.norm1.alpha"] = alpha(D)
        sd[f"{p}.norm2.alpha"] = alpha(D)
        sd[f"{p}.gating.linear_in.weight"] = lin(2 * c.hidden, D)
        sd[f"{p}.gating.linear_out.weight"] = lin(D, c.hidden)
    sd["out_norm.alpha"] = alpha(D)
    sd["text_linear.weight"] = 3.0 * lin(c.text_out, D)
    for s in range(c.depformer_in_slots):
        sd[f"depformer_in.{s}.weight"] = lin(Dd, D)
    sd["depformer_text_emb.weight"] = table(c.text_card + 1, Dd)
    for s in range(c.dep_q - 1):
        sd[f"depformer_emb.{s}.weight"] = table(c.card + 1, Dd)
    for j in range(c.depformer_num_layers):
        p = f"depformer.layers.{j}"
        sd[f"{p}.self_attn.in_proj_weight"] = np.concatenate([lin(3 * Dd, Dd) for _ in range(S)])
        sd[f"{p}.self_attn.out_proj.weight"] = np.concatenate([lin(Dd, Dd) for _ in range(S)])
        sd[f"{p}.norm1.alpha"] = alpha(Dd)
        sd[f"{p}.norm2.alpha"] = alpha(Dd)
        for s in range(S):
            g = f"{p}.gating.{s}" if c.depformer_weights_per_step else f"{p}.gating"
            sd[f"{g}.linear_in.weight"] = lin(2 * c.depformer_hidden, Dd)
            sd[f"{g}.linear_out.weight"] = lin(Dd, c.depformer_hidden)
    for s in range(c.dep_q):
        sd[f"linears.{s}.weight"] = 3.0 * lin(c.card, Dd)
    return sd
