"""Mimi building blocks in MLX: causal convolutions, SEANet, the streaming transformer and the
split residual vector quantizer.

Layout is channels-last, (B, T, C), everywhere inside. Every streamable layer takes a `cache`
dict (owned by a `MimiState`, never by the module) and reads/writes its own entry under its
name; an empty dict means "start of stream". Whole-signal calls use a fresh dict and throw it
away, which reproduces the reference's non-streaming padding exactly (its convolutions pad the
same way on the first chunk as in streaming).
"""
from __future__ import annotations

import math
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CorruptCheckpoint


_EXPM1_TAYLOR = tuple(1.0 / math.factorial(i) for i in range(1, 10))


def _expm1_nonpos(y: mx.array) -> mx.array:
    """expm1(y) for y <= 0 from multiplies and adds only (max rel. error ~3e-7).

    MLX's CPU transcendentals are scalar: expm1 costs ~30 ns an element, 50x numpy, and the
    SEANet ELUs run on ~1M elements a frame. Below -18, expm1 is -1 in float32. The argument is
    scaled by 1/32 into [-0.57, 0], a degree-9 Taylor series is exact there to float32, and five
    doublings e^(2z) - 1 = p * (p + 2) undo the scaling without the cancellation of exp(y) - 1.
    """
    z = mx.maximum(y, -18.0) * (1.0 / 32)
    p = _EXPM1_TAYLOR[-1]
    for c in reversed(_EXPM1_TAYLOR[:-1]):
        p = p * z + c
    p = p * z
    for _ in range(5):
        p = p * (p + 2.0)
    return p


def elu(x: mx.array) -> mx.array:
    """ELU(alpha=1); expm1 keeps the small negative values exact, as torch does."""
    neg = mx.minimum(x, 0)
    if x.size >= 8192 and x.dtype == mx.float32 and mx.default_device() == mx.cpu:
        # ~20 cheap vectorised ops beat one scalar expm1 on large CPU arrays (2.3x).
        return mx.maximum(x, 0) + _expm1_nonpos(neg)
    return mx.maximum(x, 0) + mx.expm1(neg)


class ELU(nn.Module):
    """Parameter-free slot, so module indices match the checkpoint's `model.N` numbering."""

    def __call__(self, x, cache=None):
        return elu(x)

    def state_spec(self) -> list:
        return []

    def step(self, x, st):
        return elu(x), []


class Conv1d(nn.Module):
    """Causal conv with the reference's streaming padding.

    The layer keeps the last `(k-1)*dilation + 1 - stride` input samples between calls (zeros,
    or the first sample repeated for `pad_mode="replicate"`, before the first call); inputs must
    be a multiple of `stride` long, so every call emits `T // stride` frames.
    """

    def __init__(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1,
                 dilation: int = 1, bias: bool = True, pad_mode: str = "constant"):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, cin))  # MLX layout (out, k, in)
        if bias:
            self.bias = mx.zeros((cout,))
        self._name, self._stride, self._dilation = name, stride, dilation
        self._pad_mode = pad_mode
        self._tail = (kernel - 1) * dilation + 1 - stride

    # im2col buffers above this many elements (whole-signal calls on long audio) use conv1d.
    _IM2COL_MAX = 1 << 22
    # How im2col columns are built: "slices" (a concatenation of k shifted slices) or
    # "strided" (one as_strided view + one copy). A class-level switch for benchmarks.
    _im2col = "strided"

    def __call__(self, x: mx.array, cache: dict) -> mx.array:
        if x.dtype != self.weight.dtype:  # mixed precision: a layer computes in its own dtype
            x = x.astype(self.weight.dtype)
        tp = self._tail
        if tp > 0:
            prev = cache.get(self._name)
            if prev is None:
                if self._pad_mode == "replicate":
                    prev = mx.repeat(x[:, :1], tp, axis=1)
                else:
                    prev = mx.zeros((x.shape[0], tp, x.shape[2]), dtype=x.dtype)
            x = mx.concatenate([prev, x], axis=1)
            cache[self._name] = x[:, -tp:]
        return self._conv(x)

    # -- fixed-shape streaming (Mimi's "fixed"/"compiled" step modes): state in, state out
    def state_spec(self) -> list:
        return [(self._name, "tail")] if self._tail > 0 else []

    def init_state(self, batch: int) -> list:
        w = self.weight
        return [mx.zeros((batch, self._tail, w.shape[2]), w.dtype)] if self._tail > 0 else []

    def step(self, x: mx.array, st: list, fresh: mx.array | None = None):
        """x (B, T, C) -> (y, [new tail]). `fresh` (B, 1, 1) bool: rows at their first frame,
        whose tail is the replicated first sample (pad_mode "replicate") instead of `st`."""
        if x.dtype != self.weight.dtype:
            x = x.astype(self.weight.dtype)
        if self._tail <= 0:
            return self._conv(x), []
        prev = st[0]
        if fresh is not None:
            prev = mx.where(fresh, x[:, :1], prev)
        x = mx.concatenate([prev, x], axis=1)
        return self._conv(x), [x[:, -self._tail:]]

    def _conv(self, x: mx.array) -> mx.array:
        w = self.weight
        cout, k, cin = w.shape
        s, d = self._stride, self._dilation
        n = (x.shape[1] - (k - 1) * d - 1) // s + 1
        if n * k * cin > self._IM2COL_MAX:
            y = mx.conv1d(x, w, stride=s, dilation=d)
        else:
            # im2col + one BLAS matmul against the (out, k*in) view of the weight. MLX's CPU
            # conv1d is up to 5x slower at streaming sizes (e.g. the 512->1024 stride-8 conv,
            # 33 MB of weights: 13 ms vs 2.5 ms), and 4x for a single input channel.
            if k == 1:
                cols = x[:, ::s] if s > 1 else x
            elif self._im2col == "strided":
                # One strided view (output i, tap j) -> input i*s + j*d, copied once by the
                # reshape: one copy kernel where a concatenation of k shifted slices is k.
                b, t = x.shape[0], x.shape[1]
                cols = mx.as_strided(x, (b, n, k, cin), (t * cin, s * cin, d * cin, 1))
                cols = cols.reshape(b, n, k * cin)
            elif k == 2 * s and d == 1:
                # Kernel = 2 x stride (every Mimi downsampler): output i reads input blocks i
                # and i+1 of `s` frames, so im2col is two shifted views of one reshape.
                blocks = x[:, :(n + 1) * s].reshape(x.shape[0], n + 1, s * cin)
                cols = mx.concatenate([blocks[:, :n], blocks[:, 1:]], axis=-1)
            else:
                cols = mx.concatenate([x[:, j * d: j * d + (n - 1) * s + 1: s]
                                       for j in range(k)], axis=-1)
            y = cols @ w.reshape(cout, k * cin).T
        if "bias" in self:
            y = y + self.bias
        return y


class ConvTr1d(nn.Module):
    """Causal transposed conv with kernel = 2 * stride (all of Mimi's), streaming overlap-add.

    Each input frame t produces k = 2s outputs: the first s land on output frame t, the last s
    overlap frame t+1. The overlap of the last frame (without bias) is the streaming state, so
    a whole-signal call equals the reference's right-trimmed output and chunked calls equal it
    too. `depthwise=True` is the upsampler's groups=C conv (weight (k, C)); otherwise the
    weight is (in, k, out).
    """

    def __init__(self, name: str, cin: int, cout: int, stride: int, bias: bool = True,
                 depthwise: bool = False):
        super().__init__()
        k = 2 * stride
        self.weight = mx.zeros((k, cin)) if depthwise else mx.zeros((cin, k, cout))
        if bias:
            self.bias = mx.zeros((cout,))
        self._name, self._stride, self._depthwise, self._cout = name, stride, depthwise, cout

    def __call__(self, x: mx.array, cache: dict) -> mx.array:
        prev = cache.get(self._name)
        if prev is None:
            prev = mx.zeros((x.shape[0], 1, self._stride, self._cout), dtype=self.weight.dtype)
        out, (cache[self._name],) = self.step(x, [prev])
        return out

    def state_spec(self) -> list:
        return [(self._name, "tail")]

    def init_state(self, batch: int) -> list:
        return [mx.zeros((batch, 1, self._stride, self._cout), self.weight.dtype)]

    def step(self, x: mx.array, st: list):
        """x (B, T, Cin) -> (y (B, T*stride, Cout), [overlap (B, 1, stride, Cout)])."""
        if x.dtype != self.weight.dtype:
            x = x.astype(self.weight.dtype)
        b, t, _ = x.shape
        s, c = self._stride, self._cout
        if self._depthwise:
            y = x[:, :, None, :] * self.weight  # (B, T, k, C)
        else:
            y = (x @ self.weight.reshape(x.shape[2], -1)).reshape(b, t, 2 * s, c)
        head, over = y[:, :, :s], y[:, :, s:]
        if t == 1:
            out = (head + st[0]).reshape(b, s, c)
        else:
            out = (head + mx.concatenate([st[0], over[:, :-1]], axis=1)).reshape(b, t * s, c)
        if "bias" in self:
            out = out + self.bias
        return out, [over[:, -1:]]


class ResBlock(nn.Module):
    """SEANet residual unit: x + conv1x1(elu(conv_k(elu(x)))) (true skip)."""

    def __init__(self, name: str, dim: int, kernel: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.block = [ELU(), Conv1d(f"{name}.1", dim, hidden, kernel, dilation=dilation),
                      ELU(), Conv1d(f"{name}.3", hidden, dim, 1)]

    def __call__(self, x, cache):
        y = x
        for m in self.block:
            y = m(y, cache)
        return x + y

    def state_spec(self) -> list:
        return _specs(self.block)

    def init_state(self, batch: int) -> list:
        return _inits(self.block, batch)

    def step(self, x, st):
        y, new = _steps(self.block, x, st)
        return x + y, new


def _specs(mods) -> list:
    return [e for m in mods for e in m.state_spec()]


def _inits(mods, batch) -> list:
    return [a for m in mods if m.state_spec() for a in m.init_state(batch)]


def _steps(mods, x, st):
    """Chain `step` through `mods`, each taking its own slice of the flat state list."""
    new, i = [], 0
    for m in mods:
        n = len(m.state_spec())
        x, s = m.step(x, st[i:i + n])
        new += s
        i += n
    return x, new


def seanet_layout(cfg, decoder: bool) -> list[tuple]:
    """The `model.N` entries of the SEANet encoder/decoder, as tuples:
    ("conv", cin, cout, k, stride), ("convtr", cin, cout, stride), ("res", dim, dilation), ("elu",)."""
    nf, res = cfg.n_filters, cfg.n_residual_layers
    out: list[tuple] = []
    if not decoder:
        mult = 1
        out.append(("conv", cfg.channels, nf, cfg.kernel_size, 1))
        for r in reversed(cfg.ratios):
            out += [("res", mult * nf, cfg.dilation_base ** j) for j in range(res)]
            out += [("elu",), ("conv", mult * nf, mult * nf * 2, 2 * r, r)]
            mult *= 2
        out += [("elu",), ("conv", mult * nf, cfg.dimension, cfg.last_kernel_size, 1)]
    else:
        mult = 2 ** len(cfg.ratios)
        out.append(("conv", cfg.dimension, mult * nf, cfg.kernel_size, 1))
        for r in cfg.ratios:
            out += [("elu",), ("convtr", mult * nf, mult * nf // 2, r)]
            out += [("res", mult * nf // 2, cfg.dilation_base ** j) for j in range(res)]
            mult //= 2
        out += [("elu",), ("conv", nf, cfg.channels, cfg.last_kernel_size, 1)]
    return out


class SEANet(nn.Module):
    def __init__(self, name: str, cfg, decoder: bool):
        super().__init__()
        layers = []
        for i, spec in enumerate(seanet_layout(cfg, decoder)):
            key = f"{name}.{i}"
            if spec[0] == "conv":
                layers.append(Conv1d(key, spec[1], spec[2], spec[3], stride=spec[4]))
            elif spec[0] == "convtr":
                layers.append(ConvTr1d(key, spec[1], spec[2], spec[3]))
            elif spec[0] == "res":
                layers.append(ResBlock(key, spec[1], cfg.residual_kernel_size, spec[2],
                                       cfg.compress))
            else:
                layers.append(ELU())
        self.model = layers

    def __call__(self, x, cache):
        for m in self.model:
            x = m(x, cache)
        return x

    def state_spec(self) -> list:
        return _specs(self.model)

    def init_state(self, batch: int) -> list:
        return _inits(self.model, batch)

    def step(self, x, st):
        return _steps(self.model, x, st)


class Attention(nn.Module):
    def __init__(self, name: str, dim: int, heads: int, context: int, max_period: float):
        super().__init__()
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self._name, self._heads, self._context, self._base = name, heads, context, max_period

    def __call__(self, x: mx.array, cache: dict, offset: int, mask) -> mx.array:
        """`mask` comes from `window_mask` (shared by the layers: one history length)."""
        b, t, d = x.shape
        h = self._heads
        qkv = self.in_proj(x).reshape(b, t, 3, h, d // h).transpose(2, 0, 3, 1, 4)
        # Interleaved RoPE on absolute positions (the reference's `interleave=True`), q and k
        # in one call (fewer ops: on the CPU each op costs tens of microseconds at T=2).
        qk = mx.fast.rope(qkv[:2], d // h, traditional=True, base=self._base, scale=1.0,
                          offset=offset)
        q, k, v = qk[0], qk[1], qkv[2]
        prev = cache.get(self._name)
        if prev is not None:
            k = mx.concatenate([prev[0], k], axis=2)
            v = mx.concatenate([prev[1], v], axis=2)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d // h),
                                                 mask=mask)
        # The next query is at >= offset+t, so only the last context-1 keys can still be seen.
        keep = self._context - 1
        cache[self._name] = (k[:, :, -keep:], v[:, :, -keep:])
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(b, t, d))

    def step(self, x: mx.array, offset: mx.array, mask: mx.array, kc: mx.array, vc: mx.array):
        """Fixed-window attention: `kc`/`vc` (B, H, context-1, hd) hold each row's last context-1
        keys right-aligned (zeros before the row's stream has that many; `mask` hides them);
        `offset` (B,) each row's position. Returns (y, new kc, new vc) of the same shapes, so every
        step has the same graph, for one stream or rows that started at different times."""
        b, t, d = x.shape
        h = self._heads
        qkv = self.in_proj(x).reshape(b, t, 3 * h, d // h).transpose(0, 2, 1, 3)    # (B, 3H, t, hd)
        qk = mx.fast.rope(qkv[:, :2 * h], d // h, traditional=True, base=self._base, scale=1.0,
                          offset=offset)                          # q and k of every row in one call
        k = mx.concatenate([kc, qk[:, h:]], axis=2)
        v = mx.concatenate([vc, qkv[:, 2 * h:]], axis=2)
        y = mx.fast.scaled_dot_product_attention(qk[:, :h], k, v, scale=1.0 / math.sqrt(d // h),
                                                 mask=mask)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(b, t, d)), k[:, :, t:], v[:, :, t:]


def window_mask(t: int, n: int, context: int):
    """Causal window mask for t queries after n cached keys, or None when all are visible.

    Key j sits at position offset-n+j, query i at offset+i: visible iff 0 <= i+n-j < context.
    """
    if t == 1 and n + t <= context:
        return None
    delta = mx.arange(t)[:, None] + n - mx.arange(n + t)[None, :]
    return (delta >= 0) & (delta < context)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.zeros((dim,))

    def __call__(self, x):
        return x * self.scale


class TransformerLayer(nn.Module):
    def __init__(self, name: str, cfg):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(name, d, cfg.num_heads, cfg.context, cfg.max_period)
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d, bias=False)
        self.layer_scale_1 = LayerScale(d)
        self.layer_scale_2 = LayerScale(d)

    def __call__(self, x, cache, offset, mask):
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), cache, offset, mask))
        # Exact (erf) GELU, as torch's F.gelu; moshi_mlx's tanh approximation would drift.
        return x + self.layer_scale_2(self.linear2(nn.gelu(self.linear1(self.norm2(x)))))

    def step(self, x, offset, mask, kc, vc):
        a, kc, vc = self.self_attn.step(self.norm1(x), offset, mask, kc, vc)
        x = x + self.layer_scale_1(a)
        return x + self.layer_scale_2(self.linear2(nn.gelu(self.linear1(self.norm2(x))))), kc, vc


class Transformer(nn.Module):
    """Causal transformer with a bounded (context) window; positions continue across calls."""

    def __init__(self, name: str, cfg):
        super().__init__()
        self.layers = [TransformerLayer(f"{name}.{i}", cfg) for i in range(cfg.num_layers)]
        self._name = name

    def __call__(self, x, cache):
        dt = self.layers[0].linear1.weight.dtype
        if x.dtype != dt:
            x = x.astype(dt)
        offset = cache.get(self._name, 0)
        prev = cache.get(self.layers[0].self_attn._name)
        mask = window_mask(x.shape[1], 0 if prev is None else prev[0].shape[2],
                           self.layers[0].self_attn._context)
        for layer in self.layers:
            x = layer(x, cache, offset, mask)
        cache[self._name] = offset + x.shape[1]
        return x

    # -- fixed-shape streaming: state = [offset int32 (B,), K0, V0, K1, V1, ...], K/V (B, H, W, hd)
    # with W = context - 1, the newest key last. Every array has the rows on axis 0, so rows that
    # started at different times stack into one batch (and leave it) by concatenate / take.
    def state_spec(self) -> list:
        out = [(self._name, "offset")]
        for layer in self.layers:
            out += [(layer.self_attn._name, "k"), (layer.self_attn._name, "v")]
        return out

    def init_state(self, batch: int) -> list:
        att = self.layers[0].self_attn
        d = att.in_proj.weight.shape[1]
        shape = (batch, att._heads, att._context - 1, d // att._heads)
        dt = self.layers[0].linear1.weight.dtype
        return [mx.zeros((batch,), mx.int32)] + [mx.zeros(shape, dt) for _ in range(2 * len(self.layers))]

    def step(self, x, st):
        dt = self.layers[0].linear1.weight.dtype
        if x.dtype != dt:
            x = x.astype(dt)
        offset, t = st[0], x.shape[1]
        ctx = self.layers[0].self_attn._context
        w = ctx - 1
        # In row b, key j sits at position offset[b]-w+j (the t new ones last), query i at
        # offset[b]+i: visible iff the key exists (j >= w - offset[b]) and 0 <= i+w-j < context.
        # The static parts are numpy constants: no arange/compare kernels in the step graph.
        j = np.arange(w + t)
        delta = np.arange(t)[:, None] + w - j[None, :]
        exists = mx.array(j[None, :]) >= (w - offset)[:, None]                 # (B, w+t)
        mask = exists[:, None, None, :] & mx.array((delta >= 0) & (delta < ctx))
        new = [offset + t]
        for i, layer in enumerate(self.layers):
            x, kc, vc = layer.step(x, offset, mask, st[1 + 2 * i], st[2 + 2 * i])
            new += [kc, vc]
        return x, new


class RVQ(nn.Module):
    """One residual VQ stack with its own 1x1 input/output projections.

    `embedding` is (n_q, bins, dim), already divided by the clamped cluster usage at load time.
    """

    def __init__(self, n_q: int, bins: int, dim: int, latent_dim: int):
        super().__init__()
        self.input_proj = nn.Linear(latent_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, latent_dim, bias=False)
        self.embedding = mx.zeros((n_q, bins, dim))
        self._norms = None

    def clear_cache(self) -> None:
        """Forget the per-level copies (call after the weights change)."""
        self._norms = None

    def _level(self, lvl: int) -> tuple:
        # Contiguous per-level copies: gathering from a slice of the stacked (n_q, bins, dim)
        # array costs 6x more on the CPU. Built on first use, only for the levels used.
        if self._norms is None:
            self._norms = {}
        if lvl not in self._norms:
            e = mx.contiguous(self.embedding[lvl])
            self._norms[lvl] = (e, mx.sum(e * e, axis=-1))
        return self._norms[lvl]

    def prepare(self, n: int) -> None:
        """Build (and evaluate) the first `n` levels' copies now: inside an `mx.compile` trace
        they would become graph nodes recomputed on every call."""
        mx.eval([a for lvl in range(n) for a in self._level(lvl)])
        if n > 1:
            mx.eval(self._stacked(n))

    def encode(self, x: mx.array, n: int) -> mx.array:
        """x (B, T, latent) float32 -> codes (B, n, T) int32."""
        return mx.stack(self.encode_levels(x, n), axis=1).astype(mx.int32)

    def encode_levels(self, x: mx.array, n: int) -> list:
        """x (B, T, latent) -> n arrays (B, T) of uint32 codes (argmin's type: no cast per level)."""
        r = self.input_proj(x)
        codes = []
        for lvl in range(n):
            e, norms = self._level(lvl)
            # argmin ||r - e||^2 = argmin (|e|^2 - 2 r.e); |r|^2 is constant per row.
            idx = mx.argmin(norms - 2.0 * (r @ e.T), axis=-1)
            r = r - e[idx]
            codes.append(idx)
        return codes

    def _stacked(self, n: int) -> mx.array:
        # The first n levels as one contiguous (n * bins, dim) table: decoding gathers all
        # levels at once (3 kernels instead of 2n: fewer ops per step on a host-bound GPU).
        key = ("stacked", n)
        if self._norms is None:
            self._norms = {}
        if key not in self._norms:
            self._norms[key] = mx.contiguous(self.embedding[:n].reshape(-1, self.embedding.shape[2]))
        return self._norms[key]

    def decode(self, codes: mx.array) -> mx.array:
        """codes (B, n, T) -> (B, T, latent)."""
        n = codes.shape[1]
        if n == 1:
            return self.output_proj(self._level(0)[0][codes[:, 0]])
        bins = self.embedding.shape[1]
        idx = codes + mx.array((np.arange(n) * bins)[None, :, None], dtype=codes.dtype)
        return self.output_proj(self._stacked(n)[idx].sum(axis=1))


class SplitRVQ(nn.Module):
    """1 semantic codebook (`rvq_first`) + acoustic ones (`rvq_rest`), both fed the same latent."""

    def __init__(self, n_q: int, bins: int, dim: int, latent_dim: int, n_semantic: int = 1):
        super().__init__()
        self.rvq_first = RVQ(n_semantic, bins, dim, latent_dim)
        self.rvq_rest = RVQ(n_q - n_semantic, bins, dim, latent_dim)
        self._ns = n_semantic

    def prepare(self, n: int) -> None:
        self.rvq_first.prepare(min(n, self._ns))
        self.rvq_rest.prepare(max(n - self._ns, 0))

    def encode(self, x, n):
        """x (B, T, latent) -> codes (B, n, T) int32 (one stack and one cast for all levels)."""
        codes = self.rvq_first.encode_levels(x, min(n, self._ns))
        if n > self._ns:
            codes += self.rvq_rest.encode_levels(x, n - self._ns)
        return mx.stack(codes, axis=1).astype(mx.int32)

    def decode(self, codes):
        q = self.rvq_first.decode(codes[:, :self._ns])
        if codes.shape[1] > self._ns:
            q = q + self.rvq_rest.decode(codes[:, self._ns:])
        return q


# ---------------------------------------------------------------------------------------------
# Checkpoint format

def reference_shapes(cfg) -> dict[str, tuple]:
    """Every key (and shape) of the reference MimiModel state dict for this config."""
    s: dict[str, tuple] = {}

    def conv(p, cin, cout, k, bias=True):
        s[p + ".conv.conv.weight"] = (cout, cin, k)
        if bias:
            s[p + ".conv.conv.bias"] = (cout,)

    for part, dec in (("encoder", False), ("decoder", True)):
        for i, spec in enumerate(seanet_layout(cfg, dec)):
            p = f"{part}.model.{i}"
            if spec[0] == "conv":
                conv(p, spec[1], spec[2], spec[3])
            elif spec[0] == "convtr":
                s[p + ".convtr.convtr.weight"] = (spec[1], spec[2], 2 * spec[3])
                s[p + ".convtr.convtr.bias"] = (spec[2],)
            elif spec[0] == "res":
                h = spec[1] // cfg.compress
                conv(p + ".block.1", spec[1], h, cfg.residual_kernel_size)
                conv(p + ".block.3", h, spec[1], 1)
    d, f = cfg.d_model, cfg.dim_feedforward
    for part in ("encoder_transformer", "decoder_transformer"):
        for i in range(cfg.num_layers):
            p = f"{part}.transformer.layers.{i}."
            s[p + "self_attn.in_proj_weight"] = (3 * d, d)
            s[p + "self_attn.out_proj.weight"] = (d, d)
            for n in ("norm1", "norm2"):
                s[p + n + ".weight"] = (d,)
                s[p + n + ".bias"] = (d,)
            s[p + "linear1.weight"] = (f, d)
            s[p + "linear2.weight"] = (d, f)
            s[p + "layer_scale_1.scale"] = (d,)
            s[p + "layer_scale_2.scale"] = (d,)
    k = 2 * cfg.downsample_stride
    s["downsample.conv.conv.conv.weight"] = (cfg.dimension, cfg.dimension, k)
    s["upsample.convtr.convtr.convtr.weight"] = (cfg.dimension, 1, k)
    qd = cfg.quantizer_dimension
    for name, n in (("rvq_first", cfg.n_q_semantic), ("rvq_rest", cfg.n_q - cfg.n_q_semantic)):
        p = f"quantizer.{name}."
        s[p + "input_proj.weight"] = (qd, cfg.dimension, 1)
        s[p + "output_proj.weight"] = (cfg.dimension, qd, 1)
        for lvl in range(n):
            c = f"{p}vq.layers.{lvl}._codebook."
            s[c + "embedding_sum"] = (cfg.bins, qd)
            s[c + "cluster_usage"] = (cfg.bins,)
            s[c + "_initialized"] = (1,)
    return s


_ALIASES = ((".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight"),
            (".self_attn.in_proj.weight", ".self_attn.in_proj_weight"),
            (".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight"))


def normalize_keys(weights: dict) -> dict:
    """Accept the other spellings of the attention keys: the released file has `in_proj_weight`,
    while a state dict saved from moshi 0.2.13's modules has `in_projs.0.weight`."""
    out = {}
    for k, v in weights.items():
        for a, b in _ALIASES:
            if k.endswith(a):
                k = k[: -len(a)] + b
        out[k] = v
    return out


def check_weights(weights: dict, cfg, source: str = "checkpoint") -> None:
    """Raise CorruptCheckpoint naming the first missing or mis-shaped reference key."""
    for key, shape in reference_shapes(cfg).items():
        if key not in weights:
            raise CorruptCheckpoint(f"Mimi {source} is missing key {key!r} (expected shape "
                                    f"{list(shape)}); is this the tokenizer-*.safetensors file "
                                    f"of a Mimi model with this config?")
        got = tuple(weights[key].shape)
        if got != shape and not (key.endswith("_initialized") and got == ()):
            raise CorruptCheckpoint(f"Mimi {source}: key {key!r} has shape {list(got)}, expected "
                                    f"{list(shape)} (wrong config or corrupt file)")


def _np(a) -> np.ndarray:
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32))
    return np.asarray(a, dtype=np.float32)


def sanitize(weights: dict, cfg) -> dict[str, np.ndarray]:
    """Reference state dict -> our module layout (float32 numpy). Pure: inputs are not changed.

    Convs (out, in, k) -> (out, k, in); transposed convs (in, out, k) -> (in, k, out); the
    depthwise upsampler (C, 1, k) -> (k, C); 1x1 projections lose their k axis; each codebook
    becomes embedding_sum / max(cluster_usage, 1e-5), stacked per RVQ as (n_q, bins, dim).
    """
    out: dict[str, np.ndarray] = {}
    books: dict[str, dict[int, np.ndarray]] = {"rvq_first": {}, "rvq_rest": {}}
    for key, val in weights.items():
        m = re.match(r"quantizer\.(rvq_first|rvq_rest)\.vq\.layers\.(\d+)\._codebook\.(\w+)$", key)
        if m:
            if m.group(3) == "embedding_sum":
                usage = _np(weights[key.replace("embedding_sum", "cluster_usage")])
                books[m.group(1)][int(m.group(2))] = (
                    _np(val) / np.maximum(usage, 1e-5)[:, None]).astype(np.float32)
            continue
        a = _np(val)
        if key == "downsample.conv.conv.conv.weight":
            out["downsample.weight"] = a.transpose(0, 2, 1)
        elif key == "upsample.convtr.convtr.convtr.weight":
            out["upsample.weight"] = a[:, 0, :].T
        elif key.endswith(".conv.conv.weight"):
            out[key.replace(".conv.conv.", ".")] = a.transpose(0, 2, 1)
        elif key.endswith(".conv.conv.bias"):
            out[key.replace(".conv.conv.", ".")] = a
        elif key.endswith(".convtr.convtr.weight"):
            out[key.replace(".convtr.convtr.", ".")] = a.transpose(0, 2, 1)
        elif key.endswith(".convtr.convtr.bias"):
            out[key.replace(".convtr.convtr.", ".")] = a
        elif key.startswith(("encoder_transformer.transformer.", "decoder_transformer.transformer.")):
            k = key.replace(".transformer.layers.", ".layers.").replace("in_proj_weight",
                                                                        "in_proj.weight")
            out[k] = a
        elif key.startswith("quantizer.") and key.endswith("_proj.weight"):
            out[key] = a[:, :, 0]
        else:
            out[key] = a
    for name, levels in books.items():
        if levels:
            out[f"quantizer.{name}.embedding"] = np.stack([levels[i] for i in sorted(levels)])
    # Row-major copies: MLX keeps a transposed numpy view's strides, and a matmul against a
    # permuted weight copies all of it on every call (e.g. 33 MB per frame for one conv).
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
