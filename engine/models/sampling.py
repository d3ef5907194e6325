"""Token sampling: one sampler for text and audio, for one conversation or many, each row with its
own parameters.

Sampling is the reference's "exponential race" argmax(p / E), E ~ Exp(1), over the top-k of
p = softmax(logits / temp), written as the equivalent Gumbel-max argmax(logits / temp + G), which
needs no softmax. Greedy (or temperature 0) is argmax of the raw logits.

Randomness: each model call splits its key into the next key and one sub-key per sampling site
(`split_keys`). A generator state's rows share one key (noise of the logits' whole shape); the
server's batch keeps a key per row, and row b then draws exactly the noise a batch of one with that
key draws, so a seeded conversation samples the same tokens in a batch as alone.

The parameters are host values, so every branch here is decided while tracing: where all rows
share their parameters (always at B=1) a call is the scalar graph (divide, one partition for the
k-th largest value, mask, noise, argmax), with no per-row arrays.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

__all__ = ["sample", "split_keys", "site_key", "gumbel"]


def split_keys(key: mx.array, n_sites: int) -> tuple[mx.array, mx.array]:
    """key -> (next key, sub-keys): `split(key)`, then `split(second half, n_sites)`.

    key (2,): (next (2,), sites (n_sites, 2)); keys (B, 2), one per row: (next (B, 2),
    sites (B, n_sites, 2)), row b split exactly as its key alone. Rows are taken by slicing
    (integer indexing of an mx array's first axis is a Gather kernel)."""
    if key.ndim == 1:
        pair = mx.random.split(key)
        return pair[0:1].reshape(2), mx.random.split(pair[1:2].reshape(2), n_sites)
    pair = mx.vmap(lambda k: mx.random.split(k))(key)                       # (B, 2, 2)
    return pair[:, 0], mx.vmap(lambda k: mx.random.split(k, n_sites))(pair[:, 1])


def site_key(sites: mx.array, i: int) -> mx.array:
    """Sub-key i of `split_keys`' sites: (n, 2) -> (2,), (B, n, 2) -> (B, 2), by a slice."""
    return sites[..., i:i + 1, :].reshape(*sites.shape[:-2], 2)


def gumbel(keys: mx.array, shape: tuple) -> mx.array:
    """Gumbel noise of `shape` per key: keys (2,) -> shape; keys (..., 2) -> (..., *shape), each
    entry bit-identical to `mx.random.gumbel(shape, key=that key)`, all drawn in one call."""
    if keys.ndim == 1:
        return mx.random.gumbel(shape, key=keys)
    lead = keys.shape[:-1]
    flat = keys if keys.ndim == 2 else keys.reshape(-1, 2)
    g = mx.vmap(lambda k: mx.random.gumbel(shape, key=k))(flat)
    return g if keys.ndim == 2 else g.reshape(*lead, *shape)


def _rows(value, n: int, dtype) -> np.ndarray:
    a = np.asarray(value, dtype=dtype)
    if a.ndim == 0:
        return np.full(n, a, dtype)
    if a.shape != (n,):
        raise ConfigError(f"a per-row sampling parameter has shape {a.shape}; {n} rows need ({n},) "
                          "or one value for all")
    return a


def sample(logits: mx.array, temp, top_k, greedy, key: mx.array | None = None,
           noise: mx.array | None = None) -> mx.array:
    """logits (B, V) -> tokens (B,) uint32 (argmax's type: callers cast, in a compiled graph once
    for all sites of a frame, as a cast is one more kernel per site).

    temp (>= 0; 0 is greedy), top_k (0 or >= V: the whole vocabulary) and greedy: host scalars for
    every row, or numpy arrays (B,) per row. The noise: `noise` (B, V) drawn by the caller, else from
    `key`: (2,) one key for all rows (noise of the logits' shape, as a generator state's rows share
    their key) or (B, 2) one per row (each row draws (1, V), what a batch of one with that key
    draws). Neither is needed where every row is greedy.
    """
    b, v = logits.shape[0], logits.shape[-1]
    t = _rows(temp, b, np.float32)
    is_greedy = _rows(greedy, b, bool) | (t <= 0)
    if is_greedy.all():
        return mx.argmax(logits, axis=-1)
    live = ~is_greedy
    k = _rows(top_k, b, np.int64)
    k = np.where((k > 0) & (k < v), k, v)
    t_live, k_live = t[live], k[live]
    x = logits.astype(mx.float32)
    if (t_live == t_live[0]).all():              # one temperature (greedy rows' results are discarded)
        x = x / float(t_live[0])
    else:
        x = x / mx.array(np.where(is_greedy, 1.0, t).astype(np.float32))[:, None]
    if (k_live == k_live[0]).all():
        kk = int(k_live[0])
        if kk < v:
            # The k-th largest value: one partition, then a slice (topk + min costs one more kernel).
            kth = mx.partition(x, v - kk, axis=-1)[..., v - kk:v - kk + 1]
            x = mx.where(x >= kth, x, -mx.inf)
    else:
        # The k_b-th largest of each row: the kmax largest (any order), then sort only those.
        kmax = int(k_live.max())
        k = np.where(is_greedy, kmax, k)
        top = mx.sort(mx.topk(x, kmax, axis=-1), axis=-1)                      # (B, kmax) ascending
        kth = mx.take_along_axis(top, mx.array((kmax - k).astype(np.int32))[:, None], axis=-1)
        x = mx.where(x >= kth, x, -mx.inf)
    if noise is None:
        if key is None:
            raise ConfigError("sample() needs a key or the noise where a row is not greedy")
        noise = gumbel(key, logits.shape) if key.ndim == 1 else gumbel(key, (1, v))[:, 0]
    tok = mx.argmax(x + noise, axis=-1)
    if is_greedy.any():
        tok = mx.where(mx.array(is_greedy), mx.argmax(logits, axis=-1), tok)
    return tok
