"""Mimi codec (24 kHz audio <-> 12.5 Hz codes) in MLX, loading the reference checkpoint format.

API (see docs/interfaces.md):
- `MimiConfig.personaplex()` / `.tiny()` / `.from_dict()` / `.to_dict()`
- `Mimi.from_file(path, num_codebooks=8)`, `Mimi(config, num_codebooks)`
- whole signal: `encode(pcm (B,1,T)) -> codes (B,K,T//1920)`, `decode(codes) -> pcm`
- streaming: `state = mimi.make_state(B)`, `encode_step(frame, state)`, `decode_step(codes, state)`,
  `state.reset()`
- `sanitize(weights)`: reference state dict -> our layout; `tiny_state_dict(config, seed)`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import AudioFormatError, ConfigError, CorruptCheckpoint, ModelNotFound
from .mimi_modules import (ConvTr1d, Conv1d, SEANet, SplitRVQ, Transformer, check_weights,
                            normalize_keys, reference_shapes, sanitize, seanet_layout)

_log = logging.getLogger(__name__)

__all__ = ["Mimi", "MimiConfig", "MimiState", "STEP_MODES", "check_weights",
           "normalize_keys", "reference_shapes", "sanitize", "tiny_state_dict"]


@dataclass
class MimiConfig:
    """Mimi hyper-parameters (defaults: the released codec, `loaders._mimi_config`)."""
    sample_rate: int = 24000
    frame_rate: float = 12.5
    channels: int = 1
    # SEANet
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    # encoder/decoder transformers
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10000.0
    norm_eps: float = 1e-5
    # split RVQ
    quantizer_dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    n_q_semantic: int = 1
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.ratios = tuple(int(r) for r in self.ratios)
        hop = math.prod(self.ratios)
        enc_rate = self.sample_rate / hop
        stride = enc_rate / self.frame_rate
        if stride != int(stride) or int(stride) < 1:
            raise ConfigError(f"MimiConfig: encoder rate {enc_rate} Hz (sample_rate/prod(ratios)) "
                              f"must be an integer multiple of frame_rate {self.frame_rate}")
        if self.d_model != self.dimension:
            raise ConfigError(f"MimiConfig: d_model ({self.d_model}) must equal dimension "
                              f"({self.dimension}); projected transformers are not supported")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ConfigError(f"MimiConfig: d_model {self.d_model} must split into "
                              f"{self.num_heads} heads of even size")
        if not 0 < self.n_q_semantic < self.n_q:
            raise ConfigError(f"MimiConfig: need 0 < n_q_semantic ({self.n_q_semantic}) < "
                              f"n_q ({self.n_q})")

    @property
    def downsample_stride(self) -> int:
        return int(self.sample_rate / math.prod(self.ratios) / self.frame_rate)

    @property
    def frame_size(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    @classmethod
    def personaplex(cls) -> "MimiConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "MimiConfig":
        """Same structure and 1920-sample frames, small widths (the embedded test model)."""
        return cls(dimension=32, n_filters=4, d_model=32, num_heads=2, num_layers=2,
                   dim_feedforward=64, quantizer_dimension=16, n_q=16)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MimiConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"MimiConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**known, extra={k: v for k, v in d.items() if k not in names})
        except TypeError as e:
            raise ConfigError(f"MimiConfig.from_dict: bad values in {d!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# State

STEP_MODES = ("eager", "fixed", "compiled")


class MimiState:
    """Per-stream state: conv tails, transposed-conv overlaps, transformer KV windows.

    `mode` picks the step implementation (`Mimi.make_state`):
    - "eager": dicts keyed by layer name, KV windows growing to context-1 keys (the reference's
      layout).
    - "fixed": flat lists of fixed-shape arrays (full-width KV windows, a position per row, conv
      tails, a first-frame flag per row), so every step runs the same graph; every array has the
      rows on axis 0, so streams that started at different times stack into one batch (the
      server's `BatchEngine` runs this step for all its rows).
    - "compiled": "fixed" with each step one `mx.compile`d graph (the default; few host-side
      ops per frame matters on MLX CUDA, which is host-bound).
    In the fixed modes `encoder` / `decoder` are read-only views in the eager layout.
    """

    def __init__(self, batch_size: int, mode: str = "eager", mimi: "Mimi | None" = None, fused: bool = True):
        self.batch_size, self.mode, self._mimi = batch_size, mode, mimi
        self.fused = fused            # may the fused CUDA encoder run this state (see Mimi.fused_encode)
        self.reset()

    def reset(self) -> None:
        self.enc_frames = self.dec_frames = 0
        if self.mode == "eager":
            self._encoder, self._decoder = {}, {}
        else:
            self.enc_flat = self._mimi._init_flat("enc", self.batch_size)
            self.dec_flat = self._mimi._init_flat("dec", self.batch_size)

    # The encoder state lives in one of two layouts: the fixed-shape list (`enc_flat`) or, while
    # the fused CUDA encoder runs it, `enc_fused` (engine/models/fused_mimi.py). Reading
    # `enc_flat` converts back (a host sync: only for the MLX step, views and tests).
    enc_fused = None

    @property
    def enc_flat(self) -> list:
        if self.enc_fused is not None:
            self._enc_flat = self.enc_fused.to_flat()
            self.enc_fused = None
        return self._enc_flat

    @enc_flat.setter
    def enc_flat(self, flat: list) -> None:
        self._enc_flat, self.enc_fused = flat, None

    @property
    def encoder(self) -> dict:
        if self.mode == "eager":
            return self._encoder
        return self._mimi._view("enc", self.enc_flat, self.enc_frames)

    @encoder.setter
    def encoder(self, d: dict) -> None:
        if self.mode != "eager":
            raise ConfigError(f"MimiState: the encoder state of a {self.mode!r} state is read-only")
        self._encoder = d

    @property
    def decoder(self) -> dict:
        if self.mode == "eager":
            return self._decoder
        return self._mimi._view("dec", self.dec_flat, self.dec_frames)

    @decoder.setter
    def decoder(self, d: dict) -> None:
        if self.mode != "eager":
            raise ConfigError(f"MimiState: the decoder state of a {self.mode!r} state is read-only")
        self._decoder = d

    def arrays(self) -> list:
        """All arrays held (to `mx.eval` them with the outputs)."""
        if self.mode != "eager":
            enc = [self.enc_fused.buf] if self.enc_fused is not None else self._enc_flat
            return [*enc, *self.dec_flat]
        out = []
        for d in (self._encoder, self._decoder):
            for v in d.values():
                if isinstance(v, tuple):
                    out.extend(v)
                elif isinstance(v, mx.array):
                    out.append(v)
        return out


# ---------------------------------------------------------------------------------------------
# Model

class Mimi(nn.Module):
    def __init__(self, config: MimiConfig | None = None, num_codebooks: int = 8,
                 dtype: mx.Dtype = mx.float32):
        super().__init__()
        cfg = config or MimiConfig.personaplex()
        if not isinstance(num_codebooks, int) or not 1 <= num_codebooks <= cfg.n_q:
            raise ConfigError(f"num_codebooks must be an int in 1..{cfg.n_q}, got {num_codebooks!r}")
        if dtype not in (mx.float32, mx.bfloat16, mx.float16):
            raise ConfigError(f"Mimi dtype must be float32, bfloat16 or float16, got {dtype}")
        self._cfg, self._k, self._dtype = cfg, num_codebooks, dtype
        st = cfg.downsample_stride
        self.encoder = SEANet("encoder.model", cfg, decoder=False)
        self.decoder = SEANet("decoder.model", cfg, decoder=True)
        self.encoder_transformer = Transformer("encoder_transformer", cfg)
        self.decoder_transformer = Transformer("decoder_transformer", cfg)
        self.downsample = Conv1d("downsample", cfg.dimension, cfg.dimension, 2 * st, stride=st,
                                 bias=False, pad_mode="replicate")
        self.upsample = ConvTr1d("upsample", cfg.dimension, cfg.dimension, st, bias=False,
                                 depthwise=True)
        self.quantizer = SplitRVQ(cfg.n_q, cfg.bins, cfg.quantizer_dimension, cfg.dimension,
                                  cfg.n_q_semantic)
        self.step_mode = "compiled"
        self._clear_compiled()

    # -- properties
    config = property(lambda self: self._cfg)
    sample_rate = property(lambda self: self._cfg.sample_rate)
    frame_rate = property(lambda self: self._cfg.frame_rate)
    frame_size = property(lambda self: self._cfg.frame_size)
    num_codebooks = property(lambda self: self._k)
    cardinality = property(lambda self: self._cfg.bins)
    dtype = property(lambda self: self._dtype)

    @property
    def step_mode(self) -> str:
        """The default `mode` of new states (`make_state`): "compiled", "fixed" or "eager"."""
        return self._step_mode

    @step_mode.setter
    def step_mode(self, mode: str) -> None:
        if mode not in STEP_MODES:
            raise ConfigError(f"Mimi step_mode must be one of {STEP_MODES}, got {mode!r}")
        self._step_mode = mode

    # -- precision
    def half_precision_modules(self) -> list:
        """The modules that run in `dtype` when it is bf16/fp16: the decoder side (upsampler,
        decoder transformer, SEANet decoder). The encoder path and the quantizer stay float32.

        Codes are discrete and the deep RVQ levels are fragile: on a 7B-size fixture with
        data-like codebooks, bf16 anywhere on the encoder path flips codes (all of it: 17 % of
        the 8 codes; only the 3 highest-rate SEANet layers: 1.5 %), below the 99 % agreement the
        engine needs, while the decoder's output is continuous (bf16: ~44 dB SNR vs float32).
        Figures in docs/benchmarks.md (Mimi).
        """
        return [self.decoder, self.decoder_transformer, self.upsample]

    # -- loading
    def load_reference_weights(self, weights: dict, source: str = "state dict") -> "Mimi":
        """Load a reference-format state dict (numpy/mx arrays), checking every key and shape."""
        weights = normalize_keys(weights)
        check_weights(weights, self._cfg, source)
        ours = sanitize({k: v for k, v in weights.items() if k in reference_shapes(self._cfg)},
                        self._cfg)
        self.load_weights([(k, mx.array(v)) for k, v in ours.items()], strict=True)
        if self._dtype != mx.float32:
            for mod in self.half_precision_modules():
                mod.set_dtype(self._dtype)
        for r in (self.quantizer.rvq_first, self.quantizer.rvq_rest):
            r.clear_cache()
        self._clear_compiled()  # compiled steps captured the old weights as constants
        mx.eval(self.parameters())
        return self

    @classmethod
    def from_file(cls, path, num_codebooks: int = 8, config: MimiConfig | None = None,
                  dtype: mx.Dtype = mx.float32) -> "Mimi":
        """Load `tokenizer-e351c8d8-checkpoint125.safetensors` (reference key names)."""
        p = Path(path)
        if not p.is_file():
            raise ModelNotFound(f"Mimi checkpoint not found: {str(p)!r}")
        try:
            weights = mx.load(str(p))
        except Exception as e:  # truncated file, bad header, not safetensors
            raise CorruptCheckpoint(f"cannot read Mimi checkpoint {str(p)!r}: {e}") from None
        if not isinstance(weights, dict):
            raise CorruptCheckpoint(f"Mimi checkpoint {str(p)!r} is not a safetensors file")
        model = cls(config, num_codebooks, dtype)
        return model.load_reference_weights(weights, source=f"checkpoint {p.name!r}")

    # -- state
    def make_state(self, batch_size: int = 1, mode: str | None = None, fused: bool = True) -> MimiState:
        """Streaming state for `batch_size` rows; `mode` defaults to `self.step_mode`
        ("compiled"; see `MimiState` for "fixed" and "eager"). `fused=False` keeps the state on
        the MLX step even where the fused CUDA encoder runs (a state whose eager view is read
        after each step would convert back every time)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        mode = self._step_mode if mode is None else mode
        if mode not in STEP_MODES:
            raise ConfigError(f"Mimi state mode must be one of {STEP_MODES}, got {mode!r}")
        return MimiState(batch_size, mode, self, fused)

    # -- fixed-shape streaming state (flat lists of arrays; see MimiState)
    def _parts(self, which: str) -> list:
        if which == "enc":
            return [self.encoder, self.encoder_transformer, self.downsample]
        return [self.upsample, self.decoder_transformer, self.decoder]

    def _spec(self, which: str) -> list:
        head = [("first_frame", "flag")] if which == "enc" else []
        return head + [e for m in self._parts(which) for e in m.state_spec()]

    def _init_flat(self, which: str, batch: int) -> list:
        head = [mx.ones((batch, 1, 1), mx.bool_)] if which == "enc" else []
        return head + [a for m in self._parts(which) for a in m.init_state(batch)]

    def _view(self, which: str, flat: list, frames: int) -> dict:
        """A fixed-mode state in the eager layout (what an eager state holds after `frames`
        steps): KV windows trimmed to their valid keys, offsets as ints."""
        if frames == 0:
            return {}
        tokens = frames * (self.frame_size // math.prod(self._cfg.ratios))
        w = self._cfg.context - 1
        n = min(tokens, w)
        out: dict = {}
        for (name, kind), a in zip(self._spec(which), flat):
            if kind == "tail":
                out[name] = a
            elif kind == "offset":
                out[name] = tokens
            elif kind == "k":
                out[name] = a[:, :, w - n:]
            elif kind == "v":
                out[name] = (out[name], a[:, :, w - n:])
        return out

    def _split(self, which: str, st: list) -> list:
        out, i = [], 1 if which == "enc" else 0
        for m in self._parts(which):
            n = len(m.state_spec())
            out.append(st[i:i + n])
            i += n
        return out

    def _enc_fn(self, x: mx.array, st: list):
        """One step, pure: pcm (B, T, 1) float32, state -> (latent (B, T', D), codes, state)."""
        first = st[0]
        s_enc, s_tr, s_down = self._split("enc", st)
        y, n1 = self.encoder.step(x, s_enc)
        y, n2 = self.encoder_transformer.step(y, s_tr)
        lat, n3 = self.downsample.step(y, s_down, fresh=first)
        lat = lat.astype(mx.float32)
        codes = self.quantizer.encode(lat, self._k)
        return lat, codes, [mx.zeros_like(first)] + n1 + n2 + n3

    def _dec_fn(self, codes: mx.array, st: list):
        """One step, pure: codes (B, K, T) int32, state -> (pcm (B, T*frame, 1) float32, state)."""
        s_up, s_tr, s_dec = self._split("dec", st)
        z = self.quantizer.decode(mx.clip(codes, 0, self._cfg.bins - 1)).astype(self._dtype)
        z, n1 = self.upsample.step(z, s_up)
        z, n2 = self.decoder_transformer.step(z, s_tr)
        y, n3 = self.decoder.step(z, s_dec)
        return y.astype(mx.float32), n1 + n2 + n3

    def _clear_compiled(self) -> None:
        self._enc_compiled = self._dec_compiled = None
        self._compile_failed = False
        self._fused_enc = None      # packed from the old weights

    # "auto": the fused CUDA encoder step (engine/models/fused_mimi.py) for batch-1 "compiled"
    # states where MLX runs on CUDA; False: always the MLX step. PERSONAPLEX_FUSED=0 turns it off.
    fused_encode = "auto"

    def _fused_encoder(self):
        """The `FusedMimiEncoder` of this model, or None where it is off or unavailable (the
        reason is kept in `fused_encode_reason`)."""
        if self._fused_enc is None:
            import os
            if self.fused_encode not in ("auto", True, False):
                raise ConfigError(f"Mimi.fused_encode={self.fused_encode!r}: use 'auto', True or False")
            self._fused_enc = False
            if self.fused_encode is False or os.environ.get("PERSONAPLEX_FUSED", "1") == "0":
                self.fused_encode_reason = "turned off"
            else:
                from .fused import FusedUnavailable
                from .fused_mimi import FusedMimiEncoder
                reason = FusedMimiEncoder.unsupported(self)
                if reason is None:
                    try:
                        self._fused_enc = FusedMimiEncoder(self)
                    except FusedUnavailable as e:
                        reason = str(e)
                self.fused_encode_reason = reason
                if reason is not None and self.fused_encode is True:
                    raise FusedUnavailable(reason)
        return self._fused_enc or None

    def _step(self, which: str, mode: str, *args):
        """Run one fixed-shape step; if tracing the compiled graph fails (a backend without
        support for one of its ops), warn once and use the uncompiled step (same state)."""
        if mode == "compiled" and not self._compile_failed:
            fn = self._step_fns("compiled")[0 if which == "enc" else 1]
            try:
                return fn(*args)
            except (RuntimeError, ValueError) as e:
                self._compile_failed = True
                _log.warning("Mimi: compiled step failed (%s); using the uncompiled step", e)
        return (self._enc_fn if which == "enc" else self._dec_fn)(*args)

    def _step_fns(self, mode: str):
        if mode == "fixed":
            return self._enc_fn, self._dec_fn
        if self._enc_compiled is None:
            self.quantizer.prepare(self._k)  # before tracing (see RVQ.prepare)
            self._enc_compiled = mx.compile(self._enc_fn)
            self._dec_compiled = mx.compile(self._dec_fn)
        return self._enc_compiled, self._dec_compiled

    # -- core (channels-last; cache dicts from a MimiState)
    def _latent(self, x: mx.array, cache: dict) -> mx.array:
        """pcm (B, T, 1) -> unquantized latent (B, T/frame, dim) in float32."""
        y = self.encoder(x, cache)  # float32 in: even rounding the pcm to bf16 flips codes
        y = self.encoder_transformer(y, cache)
        return self.downsample(y, cache).astype(mx.float32)

    def _synth(self, codes: mx.array, cache: dict) -> mx.array:
        """codes (B, K, T) -> pcm (B, T*frame, 1) float32."""
        z = self.quantizer.decode(codes).astype(self._dtype)
        z = self.upsample(z, cache)
        z = self.decoder_transformer(z, cache)
        return self.decoder(z, cache).astype(mx.float32)

    # -- input checks
    def _pcm(self, pcm, what: str, frame: bool, batch: int | None = None,
             check_values: bool = True) -> mx.array:
        """Validated pcm as float32. numpy input is checked for NaN/inf in numpy; an mx array
        only if `check_values` (a device sync: the streaming steps skip it)."""
        if not isinstance(pcm, (np.ndarray, mx.array)):
            raise AudioFormatError(f"{what}: expected a numpy or mx array, got {type(pcm).__name__}")
        if pcm.ndim != 3 or pcm.shape[1] != self._cfg.channels:
            raise AudioFormatError(f"{what}: expected shape (B, {self._cfg.channels}, T), got "
                                   f"{tuple(pcm.shape)}; add axes with x[None, None]")
        is_float = (np.issubdtype(pcm.dtype, np.floating) if isinstance(pcm, np.ndarray)
                    else mx.issubdtype(pcm.dtype, mx.floating))
        if not is_float:
            raise AudioFormatError(f"{what}: expected float samples in [-1, 1], got dtype "
                                   f"{pcm.dtype}; convert int16 with x / 32768")
        n = self.frame_size
        if frame and pcm.shape[2] != n:
            raise AudioFormatError(f"{what}: a frame must be exactly {n} samples, got "
                                   f"{pcm.shape[2]}; buffer audio into {n}-sample frames")
        if not frame and pcm.shape[2] == 0:
            raise AudioFormatError(f"{what}: empty signal (T = 0)")
        if batch is not None and pcm.shape[0] != batch:
            raise AudioFormatError(f"{what}: batch {pcm.shape[0]} does not match the state's "
                                   f"batch_size {batch}")
        if isinstance(pcm, np.ndarray):  # checked in numpy: no MLX round trip per frame
            finite = bool(np.isfinite(pcm).all())
            x = mx.array(pcm, dtype=mx.float32)
        else:
            x = pcm.astype(mx.float32)
            finite = mx.all(mx.isfinite(x)).item() if check_values else True
        if not finite:
            raise AudioFormatError(f"{what}: input contains NaN or inf samples")
        return x

    def _codes(self, codes, what: str, batch: int | None = None, steps: int | None = None,
               check_values: bool = True):
        """Validated codes as int32. numpy input is range-checked in numpy; an mx array only if
        `check_values` (a device sync: the decode step clips instead)."""
        if not isinstance(codes, (np.ndarray, mx.array)):
            raise AudioFormatError(f"{what}: expected a numpy or mx array of codes, got "
                                   f"{type(codes).__name__}")
        if codes.ndim != 3 or codes.shape[1] != self._k:
            raise AudioFormatError(f"{what}: expected codes of shape (B, {self._k}, T), got "
                                   f"{tuple(codes.shape)}")
        is_int = (np.issubdtype(codes.dtype, np.integer) if isinstance(codes, np.ndarray)
                  else mx.issubdtype(codes.dtype, mx.integer))
        if not is_int:
            raise AudioFormatError(f"{what}: codes must be integers, got dtype {codes.dtype}")
        if steps is not None and codes.shape[2] != steps:
            raise AudioFormatError(f"{what}: expected {steps} time step(s), got {codes.shape[2]}")
        if batch is not None and codes.shape[0] != batch:
            raise AudioFormatError(f"{what}: batch {codes.shape[0]} does not match the state's "
                                   f"batch_size {batch}")
        if codes.size == 0:
            raise AudioFormatError(f"{what}: empty codes (T = 0)")
        if isinstance(codes, np.ndarray):
            lo, hi = int(codes.min()), int(codes.max())
            c = mx.array(codes.astype(np.int32, copy=False))
        else:
            c = codes.astype(mx.int32)
            if not check_values:
                return c
            lo, hi = mx.min(c).item(), mx.max(c).item()
        if lo < 0 or hi >= self._cfg.bins:
            raise AudioFormatError(f"{what}: codes must be in 0..{self._cfg.bins - 1}, got "
                                   f"min {lo} max {hi}")
        return c

    def _check_state(self, state, what):
        if not isinstance(state, MimiState):
            raise ConfigError(f"{what}: state must come from mimi.make_state(), got "
                              f"{type(state).__name__}")

    # -- whole signal
    def encode_latent(self, pcm) -> mx.array:
        """pcm (B, 1, T) -> unquantized latent (B, dim, ceil(T/1920)) float32 (for parity tests)."""
        x = self._pcm(pcm, "Mimi.encode", frame=False)
        n = self.frame_size
        pad = -x.shape[2] % n
        if pad:
            x = mx.pad(x, [(0, 0), (0, 0), (0, pad)])
        return self._latent(x.transpose(0, 2, 1), {}).transpose(0, 2, 1)

    def encode(self, pcm) -> mx.array:
        """pcm float (B, 1, T) -> codes int32 (B, K, ceil(T/1920)); the end is zero-padded."""
        lat = self.encode_latent(pcm)
        return self.quantizer.encode(lat.transpose(0, 2, 1), self._k)

    def decode(self, codes) -> mx.array:
        """codes int (B, K, T) -> pcm float32 (B, 1, T*1920)."""
        c = self._codes(codes, "Mimi.decode")
        return self._synth(c, {}).transpose(0, 2, 1)

    # -- streaming
    def _encode_step(self, frame, state: MimiState):
        self._check_state(state, "Mimi.encode_step")
        x = self._pcm(frame, "Mimi.encode_step", frame=True, batch=state.batch_size,
                      check_values=False).transpose(0, 2, 1)
        fused = (self._fused_encoder() if state.fused and state.mode == "compiled" and state.batch_size == 1
                 else None)
        if fused is not None:
            if state.enc_fused is None:
                state.enc_fused = (fused.init_state() if state.enc_frames == 0 else
                                   fused.state_from_flat(state._enc_flat, state.enc_frames))
            codes, lat, _ = fused.step(x, state.enc_fused)
            lat, codes = lat.reshape(1, 1, -1), codes.reshape(1, -1, 1)
        elif state.mode == "eager":
            lat, codes = self._latent(x, state.encoder), None
        else:
            lat, codes, state.enc_flat = self._step("enc", state.mode, x, state.enc_flat)
        state.enc_frames += 1
        return lat, codes

    def encode_step_latent(self, frame, state: MimiState) -> mx.array:
        """One frame -> unquantized latent (B, dim, 1) float32 (parity tests); updates `state`."""
        return self._encode_step(frame, state)[0].transpose(0, 2, 1)

    def encode_step(self, frame, state: MimiState) -> mx.array:
        """One (B, 1, 1920) frame -> codes (B, K, 1) int32; updates `state`.

        No host sync: the work is queued (`mx.async_eval`) and the codes are ready when read.
        """
        lat, codes = self._encode_step(frame, state)
        if codes is None:
            codes = self.quantizer.encode(lat, self._k)
        mx.async_eval(codes, *state.arrays())
        return codes

    def decode_step(self, codes, state: MimiState) -> mx.array:
        """Codes (B, K, 1) -> pcm (B, 1, 1920) float32; updates `state`. Codes given as an mx
        array are not range-checked (a device sync); out-of-range ones are clipped."""
        self._check_state(state, "Mimi.decode_step")
        c = self._codes(codes, "Mimi.decode_step", batch=state.batch_size, steps=1,
                        check_values=False)
        if state.mode == "eager":
            pcm = self._synth(mx.clip(c, 0, self._cfg.bins - 1), state.decoder)
        else:
            pcm, state.dec_flat = self._step("dec", state.mode, c, state.dec_flat)
        state.dec_frames += 1
        pcm = pcm.transpose(0, 2, 1)
        mx.async_eval(pcm, *state.arrays())
        return pcm


# ---------------------------------------------------------------------------------------------
# Deterministic random weights (tiny model, tests)

def _test_signal(rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    """Speech-like synthetic audio: gliding harmonic tones with syllable envelopes and noise."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 60 * np.sin(2 * np.pi * 0.7 * t) + 40 * rng.standard_normal()
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(h * phase) / h for h in range(1, 8))
    env = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 2
    sig = 0.25 * env * voiced + 0.02 * rng.standard_normal(t.size)
    return sig.astype(np.float32)


def tiny_state_dict(config: MimiConfig | None = None, seed: int = 0,
                    level_dbfs: float = -20.0) -> dict[str, np.ndarray]:
    """Random weights in the reference key names, without torch, with codebooks that spread
    real latents over many codes (not all-zero / not out of scale), and a decoder whose output
    is at speech level: random codes decode to `level_dbfs` RMS (within 0.75 dB) with no DC
    offset. Deterministic for a seed."""
    cfg = config or MimiConfig.tiny()
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    for key, shape in reference_shapes(cfg).items():
        if key.endswith(("norm1.weight", "norm2.weight")):
            a = np.ones(shape)
        elif key.endswith(("norm1.bias", "norm2.bias", ".bias")):
            a = 0.01 * rng.standard_normal(shape)
        elif key.endswith("layer_scale_1.scale") or key.endswith("layer_scale_2.scale"):
            a = np.full(shape, 0.1)
        elif key.endswith("cluster_usage"):
            a = np.ones(shape)
        elif key.endswith("_initialized"):
            a = np.ones(shape)
        elif key.endswith("embedding_sum"):
            a = np.zeros(shape)  # filled below
        else:  # conv / linear weights: variance-preserving init over fan-in
            fan_in = int(np.prod(shape[1:])) if "convtr" not in key else shape[0] // 2
            if key.startswith("upsample"):
                fan_in = 2
            a = rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))
        sd[key] = a.astype(np.float32)
    # Codebook scales from the latents of our own model on test audio. The scales are rounded
    # (to a power of 2^(1/4)) so tiny float differences across platforms cannot change them.
    model = Mimi(cfg, cfg.n_q).load_reference_weights(sd)
    pcm = np.stack([_test_signal(np.random.default_rng(seed + i), 2.0, cfg.sample_rate)
                    for i in range(2)])[:, None]
    lat = np.array(model.encode_latent(pcm)).transpose(0, 2, 1).reshape(-1, cfg.dimension)
    for name, n in (("rvq_first", cfg.n_q_semantic), ("rvq_rest", cfg.n_q - cfg.n_q_semantic)):
        proj = sd[f"quantizer.{name}.input_proj.weight"][:, :, 0]
        r = lat @ proj.T
        for lvl in range(n):
            # 0.3 x the residual's scale: each level removes a modest share (as in a trained
            # RVQ), so deep levels stay well above float32 rounding.
            mu = r.mean(0)
            scale = 0.3 * float(2 ** (round(4 * math.log2(float((r - mu).std()) + 1e-12)) / 4))
            mu = np.round(mu / (scale / 8)) * (scale / 8)  # centred on the (rounded) mean
            book = (mu + scale * rng.standard_normal((cfg.bins, cfg.quantizer_dimension))
                    ).astype(np.float32)
            sd[f"quantizer.{name}.vq.layers.{lvl}._codebook.embedding_sum"] = book
            d = (book ** 2).sum(1)[None] - 2 * r @ book.T
            r = r - book[d.argmin(1)]
    # Output level. The random decoder's gain is arbitrary: with the init above, random codes
    # decode at about +6 dBFS RMS (half the samples beyond full scale) with a DC offset. Like a
    # trained codec, the last conv sets the level: its weight is scaled so that random codes
    # (what an untrained LM emits) decode at `level_dbfs` RMS, the scale rounded to a power of
    # 2^(1/4) as above, and its bias cancels the mean of the output.
    last = f"decoder.model.{len(seanet_layout(cfg, decoder=True)) - 1}.conv.conv"
    model.load_reference_weights(sd)
    codes = rng.integers(0, cfg.bins, size=(4, cfg.n_q, 25))
    y = np.array(model.decode(codes), np.float64)
    gain = 10 ** (level_dbfs / 20) / max(float(y.std()), 1e-12)
    gain = float(2 ** (round(4 * math.log2(gain)) / 4))
    sd[last + ".weight"] = (gain * sd[last + ".weight"]).astype(np.float32)
    bias = gain * (sd[last + ".bias"].astype(np.float64) - y.mean(axis=(0, 2)))
    sd[last + ".bias"] = (np.round(bias * 2 ** 16) / 2 ** 16).astype(np.float32)
    return sd
