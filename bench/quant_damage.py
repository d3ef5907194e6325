"""Quantization damage: how far a quantized LM's distributions and greedy tokens drift from the
same weights in float, with its KV rings in the model's dtype or in fp8 (`kv_dtype`). Used by
bench/lm_step.py (--quality) and the quantization tests; its table is in docs/benchmarks.md
(Quantization damage)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np


def _greedy_run(lm, user, forced=None, kv_dtype="model"):
    """Minimal greedy loop (no delays, live mode: agent codebooks only). user (B, 8, T) codes.
    Returns tokens (T, B, 1+A) and log-probs [(text (B, V), audio (B, A, card))] per step; with
    `forced` the fed-back tokens come from `forced` (teacher forcing) instead of the argmax."""
    c = lm.config
    B, _, T = user.shape
    A = min(8, c.dep_q)
    cache = lm.make_cache(B, kv_dtype)
    inp = mx.array([[c.text_card] + [c.card] * c.n_q] * B, dtype=mx.int32)[:, :, None]
    toks, logps = [], []
    for t in range(T):
        h, tl = lm.temporal(lm.embed(inp), cache)
        tl = tl[:, -1].astype(mx.float32)
        text = mx.argmax(tl, -1).astype(mx.int32) if forced is None else forced[t][:, 0]
        dc = lm.make_depformer_cache()
        prev, codes, als = text, [], []
        for s in range(A):
            lg = lm.depformer_step(s, h[:, -1], prev, dc).astype(mx.float32)
            prev = mx.argmax(lg, -1).astype(mx.int32) if forced is None else forced[t][:, 1 + s]
            codes.append(prev)
            als.append(lg)
        frame = mx.stack([text, *codes], 1)
        mx.eval(frame)
        toks.append(frame)
        logps.append((tl - mx.logsumexp(tl, -1, keepdims=True),
                      mx.stack(als, 1) - mx.logsumexp(mx.stack(als, 1), -1, keepdims=True)))
        user_t = mx.array(user[:, :, t], dtype=mx.int32)
        fill = [mx.full((B, c.n_q - A - user.shape[1]), c.card, mx.int32)] if c.n_q - A > user.shape[1] else []
        inp = mx.concatenate([frame, *fill, user_t[:, : c.n_q - A]], 1)[:, :, None]
    return mx.stack(toks), logps


def measure_damage(ref, lm, steps: int = 50, seed: int = 0, batch: int = 2, kv_dtype: str = "model") -> dict:
    """Quantization damage of `lm` (its KV rings in `kv_dtype`) against `ref` (same weights in
    float, KV in the model's dtype; `lm` may be `ref` itself, to measure the KV alone): mean
    KL(ref || lm) of the text and agent-audio distributions under teacher forcing by ref's greedy
    tokens, the share of equal argmax under that teacher forcing (tf_top1_*), and the share of
    identical tokens when both run greedily on their own for `steps` frames."""
    user = np.random.default_rng(seed).integers(0, ref.config.card, (batch, 8, steps))
    ref_toks, ref_lp = _greedy_run(ref, user)
    forced = [ref_toks[t] for t in range(steps)]
    _, q_lp = _greedy_run(lm, user, forced, kv_dtype)
    free_toks, _ = _greedy_run(lm, user, kv_dtype=kv_dtype)

    def kl(a, b):
        return float(mx.mean(mx.sum(mx.exp(a) * (a - b), -1)))

    same = np.array(ref_toks) == np.array(free_toks)  # (T, B, 1+A)
    first = same.all(axis=(1, 2))
    top1 = [(np.array(mx.argmax(r[0], -1) == mx.argmax(q[0], -1)), np.array(mx.argmax(r[1], -1) == mx.argmax(q[1], -1)))
            for r, q in zip(ref_lp, q_lp)]
    return {
        "tf_top1_text": float(np.mean([a.mean() for a, _ in top1])),
        "tf_top1_audio": float(np.mean([b.mean() for _, b in top1])),
        "kl_text": float(np.mean([kl(r[0], q[0]) for r, q in zip(ref_lp, q_lp)])),
        "kl_audio": float(np.mean([kl(r[1], q[1]) for r, q in zip(ref_lp, q_lp)])),
        "agree_text": float(same[:, :, 0].mean()),
        "agree_audio": float(same[:, :, 1:].mean()),
        "agree_all": float(same.mean()),
        "first_divergence": int(np.argmin(first)) if not first.all() else steps,
    }
