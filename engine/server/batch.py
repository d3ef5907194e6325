"""Slot management for the server: many conversations advanced as one batch.

Each conversation (slot) has its own temporal KV cache, absolute positions, token ring, provided
flags, RNG key, sampling parameters and Mimi streaming state. `BatchEngine` keeps all of them
stacked along a batch dimension (row = slot), so one 80 ms step is ONE Mimi encode, ONE temporal
pass + depformer, and ONE Mimi decode for every active slot. Slots join and leave between steps.
The LM part of a step is the generator's own frame (`LmGen.step_rows`, the `_step` a solo
conversation runs) on the batch's `GenState`; this module supplies the model parts for its rows
(`RowStep`) and manages the rows.

How rows that started at different times share one step:
- Temporal transformer and depformer: the model's own step (`LM._temporal` with `LM.row_flags`,
  `LM._depformer`), the same code a single conversation runs: the LmCache layout is per row
  (per-row RoPE offsets, a per-row slot-position table for the KV ring mask, new keys written at
  each row's own slot), so rows that joined at different times share one forward. On CUDA its
  attention runs as the ring kernels (`row_flags(attn="ring")`), which read that table and skip the
  empty slots, so one graph serves fresh and full rings.
- Token ring: a joining slot's ring (from `LmGen.run_prompts`, B=1) is rotated so that its column
  for "now" matches the batch's shared phase; every row then reads and writes the same columns.
  The provided flags are kept per row (a freshly prompted row still forces the last prompt
  frame's delayed agent codebooks on its first live step, a running row does not).
- Sampling: the generator's sampler (engine/models/sampling.py) with per-row temperature / top-k /
  greedy and a key per row, split exactly the way `LmGen.step` splits its key, so a seeded slot
  samples the same tokens in a batch as alone.
- Mimi: the codec's own fixed-shape streaming step (`Mimi._enc_fn` / `_dec_fn`), the one a solo
  conversation runs: its state keeps a position and a first-frame flag per row (the replicate-
  padded downsampler pads a row's first frame with its own first sample), so a joining slot adds
  a fresh row (`Mimi._init_flat`) and a leaving one is taken out, with no special case.

Worker thread only (every method runs MLX).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from ..models.gen import GenState, RowStep, SamplingParams
from ..models.lm import LmCache, to_cache
from ..models.sampling import gumbel, sample, site_key, split_keys

log = logging.getLogger(__name__)

__all__ = ["SlotParams", "BatchEngine"]

_WIDTH_STEP = 256
FUSED_PARTS = ("depformer", "attention")   # the CUDA kernels BatchEngine(fused=...) may use
# The server's choice (docs/performance.md, Server): the depformer kernel is one launch for all
# rows, but its cost grows ~0.5 ms per row; MLX's depformer graphs cost more at few rows and less at
# many. H200 sweep, step p50 in ms, kernel vs MLX: 8 rows 30.2 / 33.7 (fresh 34.1 / 35.5), 16 rows
# 39.5 / 38.6 (fresh 46.5 / 43.8), 32 rows 63.8 / 57.9, 64 rows 110.0 / 78.3; paced, 32 fresh
# sessions missed 726 of 752 ticks with the kernel and 1 with MLX. At 16 the sweep ties, and the one
# paced comparison there (H100, 5 minutes) favoured the kernel: 0 misses against MLX's 47, in a few
# slow seconds of the host (GPU time does not grow when the host slows down). So "auto" runs the
# kernel on steps of up to AUTO_DEP_KERNEL_MAX_ROWS rows and MLX's graphs above; an explicit choice
# (True) runs the kernel at every row count. (A batched temporal kernel, its matrices on CUDA cores,
# took 41-46 ms of GPU time at 16 rows against ~23-28 ms for MLX's graph; it was removed on 12-04.)
# The ring attention kernels (engine/models/ring_attn.py) read each row's stored slots
# only, at ~3.8-3.9 TB/s on full rings against MLX's ~2.75 (one layer, 32-64 rows): with them the
# H200 step at 32 / 64 full rows took 52.6-54.9 / 69.6-73.4 ms against 58.6 / 82.7, at 32 / 64
# fresh rows 40.9-45.4 / 50.2-59.1 against 66.5 / 97.8 (two machines; docs/performance.md), so
# "auto" runs them at every row count.
DEFAULT_FUSED_PARTS = ("depformer", "attention")
AUTO_DEP_KERNEL_MAX_ROWS = 16
FUSED_CHOICES = ("auto", "off", "depformer", "attention", "all")


def fused_choice(name: str) -> tuple:
    """`engine.serve --fused NAME` -> (BatchEngine fused=, fused_parts=). auto: the default kernels
    where MLX runs on CUDA (the depformer kernel on steps of up to AUTO_DEP_KERNEL_MAX_ROWS rows, the
    ring attention kernels at every row count), the MLX path elsewhere; off: MLX; depformer /
    attention / all: those kernels at every row count, an error where they cannot run."""
    if name == "off":
        return False, DEFAULT_FUSED_PARTS
    if name == "auto":
        return "auto", DEFAULT_FUSED_PARTS
    if name == "all":
        return True, FUSED_PARTS
    if name in FUSED_PARTS:
        return True, (name,)
    raise ConfigError(f"fused={name!r}: choose one of {', '.join(FUSED_CHOICES)}")


@dataclass(frozen=True)
class _RowSampling:
    """`SamplingParams`' fields as per-row arrays (B,), in row order."""

    temp_text: np.ndarray
    top_k_text: np.ndarray
    temp_audio: np.ndarray
    top_k_audio: np.ndarray
    greedy: np.ndarray


@dataclass(frozen=True)
class SlotParams:
    """Per-session sampling parameters (validated by SamplingParams) and seed."""

    sampling: SamplingParams = SamplingParams()
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# The batch
# ----------------------------------------------------------------------------------------------
def _concat_rows(a: list | None, b: list) -> list:
    """Two row-stacked states (lists of arrays with the rows on axis 0) as one; a: None when empty."""
    return b if a is None else [mx.concatenate([x, y], axis=0) for x, y in zip(a, b)]


def _write_rows(arrays: list, r: int, rows: list) -> None:
    """arrays[i][r:r+1, :, :n] = rows[i] (n = rows[i].shape[2]) for every layer, by static slices
    (see `BatchEngine.join`); each old array is dropped from `arrays` first so the update can
    reuse its buffer (donation)."""
    for i, src in enumerate(rows):
        x = arrays[i]
        arrays[i] = None
        x[r:r + 1, :, :src.shape[2]] = to_cache(src, x.dtype)
        arrays[i] = x


def _fused_engine_or_raise(gen):
    """gen's FusedLM; raises FusedUnavailable with the reason where there is none."""
    from ..models.fused import FusedLM, FusedUnavailable
    fe = gen.fused_engine()
    if fe is None:
        reason = FusedLM.unsupported(gen.lm) or "the fused step is turned off (PERSONAPLEX_FUSED=0 or fused=False)"
        raise FusedUnavailable(reason)
    return fe


class BatchEngine:
    """Active slots stacked on the batch dimension. Row order = `self.slots`.

    `model` is a loaded `engine.api.PersonaPlex` (its mimi, lm and gen are used; never modified).
    """

    def __init__(self, model, compiled: bool = False, capacity: int | None = None,
                 fused: bool | str = False, fused_parts=DEFAULT_FUSED_PARTS, kv_dtype: str = "model"):
        self.model = model
        self.mimi, self.lm, self.gen = model.mimi, model.lm, model.gen
        c = self.lm.config
        # The rows' KV rings: the model's dtype, or fp8 e4m3 ("fp8": half the memory and the
        # attention's reads; a join converts the prompted state's keys, `lm.to_cache`).
        self._kv_storage = self.lm.kv_storage(kv_dtype)
        self.n_cb, self.ct, self.max_delay = self.gen.n_cb, self.gen.ct, self.gen.max_delay
        self.num_streams = self.gen.num_streams
        self.slots: list = []
        # LM state: one GenState of all rows (row = slot), stepped by the generator's own frame
        # (`LmGen.step_rows`): token ring (its offset is the batch's ring phase, past the prompt
        # phases), provided flags, RNG keys per row, and an LmCache whose KV arrays hold `cap`
        # preallocated rows (active rows first), so joins and leaves copy one row, not the batch;
        # the small per-row arrays are rebuilt (None while empty).
        self.capacity = capacity
        self.cap = 0
        cache = LmCache([None] * c.num_layers, [None] * c.num_layers, None, None, np.zeros(0, np.int64))
        self.state = GenState(None, np.zeros((0, self.num_streams, self.ct), dtype=bool), self.ct, cache,
                              None, 0)
        self.temp_text = np.zeros(0, np.float32)
        self.top_k_text = np.zeros(0, np.int32)
        self.temp_audio = np.zeros(0, np.float32)
        self.top_k_audio = np.zeros(0, np.int32)
        self.greedy = np.zeros(0, bool)
        # Mimi: the codec's own fixed-shape streaming state (`Mimi._init_flat`, every array with
        # the rows on axis 0, per-row positions and first-frame flags), one list per direction,
        # rows in slot order; a joining slot adds a fresh row.
        self.enc: list | None = None
        self.dec: list | None = None
        self._scale = 1.0 / math.sqrt(c.head_dim)
        self.compiled = compiled
        self._temporal_fns: dict = {}
        self._dep_fns: dict = {}
        # Linear layers run on at least `min_rows` rows once B > 1 (zero rows padded): on CUDA a
        # quantized matmul with fewer than 8 rows is a per-row kernel (one weight pass per row),
        # from 8 rows on one tiled pass. The CPU has no such cliff.
        self.min_rows = 8 if mx.default_device() == mx.gpu else 1
        # Attention width: until some row has filled its ring, the slots past max(offset) are empty
        # in every row, so attend over the used prefix, rounded up to `width_step` (few shapes).
        # Compiled on a GPU: always the whole ring (None), one graph per batch size; the fused
        # attention kernel does not care, and a retrace every 256 steps would cost a deadline. On
        # the CPU attention cost grows with the width (the whole ring costs 4x the first 256 slots
        # at 8 rows of the tiny model), so compiled steps bucket too, all widths traced at reserve().
        self.width_step = None if (compiled and mx.default_device() == mx.gpu) else _WIDTH_STEP
        # The depformer walk of all rows as ONE CUDA kernel launch (FusedLM.depformer_rows)
        # instead of MLX graphs, sampling sites and their
        # hundreds of kernels: MLX on CUDA is host-bound, and a step whose work is on the GPU does
        # not slow down when the host does (DEFAULT_FUSED_PARTS says what was measured).
        # `fused_parts` picks the kernels. "auto": where the model's fused engine exists (MLX on
        # CUDA, PERSONAPLEX_FUSED not 0); True raises where it does not; False (default): MLX.
        if fused not in ("auto", True, False):
            raise ConfigError(f"fused={fused!r} must be 'auto', True or False")
        bad = set(fused_parts) - set(FUSED_PARTS)
        if bad or not fused_parts:
            raise ConfigError(f"fused_parts={tuple(fused_parts)!r}: choose from {FUSED_PARTS}")
        self.fused = None          # the FusedLM whose depformer kernel runs (None: MLX's graphs)
        # The temporal step's attention as the ring kernels (engine/models/ring_attn.py: each row's
        # stored slots only, one graph for fresh and full rings) instead of MLX's masked attention.
        self.ring_attn = False
        if fused is not False and "attention" in fused_parts:
            from ..models import ring_attn
            why = ring_attn.unsupported(c.head_dim, self._kv_storage)
            if why is None and fused == "auto" and os.environ.get("PERSONAPLEX_FUSED", "1") == "0":
                why = "the fused kernels are turned off (PERSONAPLEX_FUSED=0)"
            if why is not None and fused is True:
                from ..models.fused import FusedUnavailable
                raise FusedUnavailable(why)
            self.ring_attn = why is None
        if kv_dtype == "fp8" and not self.ring_attn:
            log.warning("fp8 KV rings without the ring attention kernels (CUDA, fused part 'attention'): "
                        "MLX's attention decodes every ring in every layer, slower than bf16 rings")
        # steps of more rows than this run MLX's depformer graphs even where the kernel is on
        self.dep_kernel_max_rows = AUTO_DEP_KERNEL_MAX_ROWS if fused == "auto" else None
        if fused is not False and "depformer" in fused_parts:
            fe = self.gen.fused_engine() if fused == "auto" else _fused_engine_or_raise(self.gen)
            if fe is not None:
                from ..models.fused import FusedUnavailable
                try:      # builds and launches them once now (NVRTC: seconds), not on a live step
                    fe.prepare_rows(self.n_cb if self.gen.depformer_mode == "live" else c.dep_q)
                    self.fused = fe
                except FusedUnavailable as e:
                    if fused is True:
                        raise
                    log.warning("batched fused kernels unavailable, using the MLX path: %s", e)

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def cache(self) -> LmCache:
        """The rows' temporal KV rings (`self.state.cache`)."""
        return self.state.cache

    @property
    def fused_dep(self) -> bool:
        return self.fused is not None

    def dep_kernel(self, b: int) -> bool:
        """Whether a step of b rows runs the depformer kernel (else MLX's depformer graphs)."""
        return self.fused_dep and (self.dep_kernel_max_rows is None or b <= self.dep_kernel_max_rows)

    def reserve(self, progress=None) -> None:
        """Allocate the KV rows of `capacity` sessions (and build their kernels) now; compiled:
        also trace the step graphs of every batch size, so a join or leave never waits for a
        trace (a whole temporal graph per new size) while the other sessions are live.
        `progress(done, total)` is called after each batch size."""
        if self.capacity and self.cap < self.capacity:
            self._grow(self.capacity)
        if self.compiled and self.size == 0:
            for b in range(1, self.cap + 1):
                self._prewarm(b)
                self._prewarm_mimi(b)
                if progress is not None:
                    progress(b, self.cap)

    def _prewarm(self, b: int) -> None:
        """Run the compiled temporal (fresh and full-ring variants) and depformer steps once for
        b rows of dummy input. Only while no session is active: it writes slot 0 of unused rows."""
        c = self.lm.config
        C, L = c.context, c.num_layers
        x = mx.zeros((b, c.dim), self.lm.dtype)
        rows = self._rows(b)
        variants = [(C, 0), (C, C)]                       # (width, offset): fresh and full rings
        if self.ring_attn:                                # one graph for both
            variants = [(C, 0)]
        elif self.width_step:
            variants += [(w, 0) for w in range(self.width_step, C, self.width_step)]
        for width, off in variants:
            pos = mx.full((b, C), -1 if off == 0 else 0, mx.int32)
            fn = self._temporal_fn(width, rows, off >= C - 1)
            cache = self.cache
            kv = cache.keys + cache.values
            cache.keys = cache.values = None
            h, logits, *kv, _, _ = fn(x[:, None], *kv, pos, mx.full((b,), off, mx.int32))
            cache.keys, cache.values = list(kv[:L]), list(kv[L:])
            prev, dkv = mx.zeros((b,), mx.int32), []
            if not self.dep_kernel(b):
                for s in range(c.dep_q):
                    _, dkv = self._depformer(s, h, prev, dkv)
            mx.eval(logits, h, dkv, self.cache.keys, self.cache.values)
        # Sampling with the default parameters (its top-k / sort kernels are JIT-compiled per
        # shape on CUDA: seconds, which would stall every session on the first live step).
        sp = SamplingParams()
        _, site = split_keys(mx.random.split(mx.random.key(0), b), 1 + c.dep_q)
        for v, temp, k in ((c.text_out, sp.temp_text, sp.top_k_text), (c.card, sp.temp_audio, sp.top_k_audio)):
            mx.eval(sample(mx.zeros((b, v), self.lm.dtype), np.full(b, temp, np.float32),
                           np.full(b, k, np.int32), np.zeros(b, bool), site_key(site, 0)))

    def rehearse(self, state_fn, progress=None) -> int:
        """Run real steps for every batch size 1..cap with dummy sessions (`state_fn()` gives a
        prompted B=1 GenState), then remove them. Beyond the traced graphs, a live step runs
        eager ops (token ring, embeddings, provided-codebook merges, joins) whose CUDA
        kernels MLX JIT-compiles on first use; measured on an H100, the first live step of 16
        fresh sessions otherwise took 7-8 s. Only while no session is active. Returns the steps run.
        `progress(done, total)` is called after each batch size."""
        if self.size:
            raise ConfigError("rehearse() needs an empty batch")
        steps = 0
        C = self.lm.config.context
        try:
            for b in range(1, max(self.cap, 1) + 1):
                self.join(("rehearsal", b), state_fn(), SlotParams())
                for _ in range(2):          # a joining row's first step (prompt codebooks forced), then plain
                    self.step(np.zeros((self.size, self.mimi.frame_size), np.float32))
                    steps += 1
                # Then as long sessions: every ring full, the mask-free variant. _prewarm traced it
                # on broadcast dummy inputs; live inputs are plain arrays, and on an H100 the first
                # live step at the ring-fill point took 89-103 ms (new kernels at first use).
                self.set_offsets(2 * C + np.arange(self.size))
                self.step(np.zeros((self.size, self.mimi.frame_size), np.float32))
                steps += 1
                if progress is not None:
                    progress(b, max(self.cap, 1))
        finally:
            for slot in list(self.slots):
                self.leave(slot)
        return steps

    def set_offsets(self, offsets) -> None:
        """Make row r look as if it had run up to position offsets[r] - 1: its KV ring slot table
        holds the last `context` positions (slots never written count as written: their keys
        are whatever the row holds). For rehearsals and benchmarks of long sessions only."""
        C = self.lm.config.context
        o = np.asarray(offsets, np.int64).reshape(self.size)
        j = np.arange(C)
        last = o[:, None] - 1
        pos = np.where(last >= j[None], last - (last - j[None]) % C, -1)
        cache = self.cache
        cache.pos, cache.offset = mx.array(pos.astype(np.int32)), mx.array(o.astype(np.int32))
        cache.steps = o.copy()
        mx.eval(cache.pos, cache.offset)

    def _grow(self, cap: int) -> None:
        """Make room for `cap` rows of temporal KV (rows >= size are unused)."""
        c = self.lm.config
        shape = (cap - self.cap, c.num_heads, c.context, c.head_dim)
        for lst in (self.cache.keys, self.cache.values):
            for i in range(c.num_layers):
                z = mx.zeros(shape, self._kv_storage)
                lst[i] = z if self.cap == 0 else mx.concatenate([lst[i], z], axis=0)
                mx.eval(lst[i])
        self.cap = cap
        self.warm_kernels(cap)

    def warm_kernels(self, max_rows: int) -> list:
        """Build the quantized-matmul kernels every batch size up to `max_rows` will use, now
        rather than mid-conversation: MLX CUDA compiles its tiled kernel (NVRTC, seconds) once per
        row-tile size (16 / 32 / 64 rows: batches of 8-16, 17-32, 33+ rows). Returns the
        (rows, bits, group_size) combinations run; cheap on the CPU."""
        combos = sorted({(m.bits, m.group_size) for m in self.lm.modules()
                         if isinstance(getattr(m, "bits", None), int) and getattr(m, "group_size", None)})
        rows = [r for r in (1, self.min_rows, 17, 33) if r <= max(max_rows, self.min_rows)]
        done = []
        for bits, gs in combos:
            k = max(64, gs) * 2
            w, sc, bi = mx.quantize(mx.zeros((128, k), self.lm.dtype), gs, bits)
            for r in sorted(set(rows)):
                mx.eval(mx.quantized_matmul(mx.zeros((r, k), self.lm.dtype), w, sc, bi, transpose=True,
                                            group_size=gs, bits=bits))
                done.append((r, bits, gs))
        return done

    # ------------------------------------------------------------------ join / leave
    def join(self, slot, state: GenState, params: SlotParams) -> None:
        """Add `slot` (any hashable id) with its prompted B=1 generator state as a new last row."""
        if slot in self.slots:
            raise ConfigError(f"slot {slot!r} is already in the batch")
        if not isinstance(state, GenState) or state.batch_size != 1:
            raise ConfigError("join needs a B=1 GenState after the prompt phases")
        if state.offset <= self.max_delay:
            raise ConfigError("join needs a state after the prompt phases (offset > max delay)")
        sp = params.sampling
        enc, dec = self._fresh_mimi_rows(1)
        st = self.state
        shift = (st.offset - state.offset) % self.ct
        tokens = mx.roll(state.tokens, shift, axis=2)
        prov = np.roll(state.provided, shift, axis=1)[None]
        cache = state.cache
        pos, off = cache.pos, cache.offset                             # (1, C), (1,)
        key = state.key[None]
        B = self.size
        if B == self.cap:
            if self.capacity is not None and self.cap >= self.capacity:
                raise ConfigError(f"the batch is full ({self.capacity} rows)")
            self._grow(self.capacity or max(1, 2 * self.cap))
        # Write the new row in place (the old arrays' only reference is the update, so it is
        # donated). Only the ring slots the prompt phases wrote: the others are masked (their pos
        # is -1) until this session writes them itself, whatever an earlier session left there.
        # One eval for all layers: on a GPU each eval is a host round trip. Static indices:
        # measured on an H100, `mx.slice_update` with an index array took ~55 ms for the 64 KV
        # arrays of 16 rows (bench/join_probe.py) and the same update by slice ~2 ms.
        used = min(int(cache.step), self.lm.config.context)
        rows = self.cache
        _write_rows(rows.keys, B, [k[:, :, :used] for k in cache.keys])
        _write_rows(rows.values, B, [v[:, :, :used] for v in cache.values])
        if B == 0:
            rows.pos, rows.offset, st.tokens, st.key = pos, off, tokens, key
        else:
            rows.pos = mx.concatenate([rows.pos, pos], axis=0)
            rows.offset = mx.concatenate([rows.offset, off], axis=0)
            st.tokens = mx.concatenate([st.tokens, tokens], axis=0)
            st.key = mx.concatenate([st.key, key], axis=0)
        st.provided = np.concatenate([st.provided, prov], axis=0)
        rows.steps = np.append(rows.steps, np.int64(cache.step))
        st.batch_size = B + 1
        self.temp_text = np.append(self.temp_text, np.float32(sp.temp_text))
        self.top_k_text = np.append(self.top_k_text, np.int32(sp.top_k_text))
        self.temp_audio = np.append(self.temp_audio, np.float32(sp.temp_audio))
        self.top_k_audio = np.append(self.top_k_audio, np.int32(sp.top_k_audio))
        self.greedy = np.append(self.greedy, bool(sp.greedy))
        self.slots.append(slot)
        self.enc, self.dec = _concat_rows(self.enc, enc), _concat_rows(self.dec, dec)
        mx.eval(rows.keys, rows.values, rows.pos, rows.offset, st.tokens, st.key, self.enc, self.dec)

    def _fresh_mimi_rows(self, b: int) -> tuple[list, list]:
        """Mimi state of b streams before their first frame (what a solo conversation starts from)."""
        return self.mimi._init_flat("enc", b), self.mimi._init_flat("dec", b)

    def leave(self, slot) -> None:
        """Remove `slot`'s row; the other rows keep their state untouched."""
        if slot not in self.slots:
            return
        r = self.slots.index(slot)
        last = len(self.slots) - 1
        # Swap-remove: the last row moves into the freed one (KV: one row copied, in place).
        order = list(range(last + 1))
        order[r] = last
        order.pop()
        self.slots[r] = self.slots[last]
        self.slots.pop()
        st, cache = self.state, self.cache
        if r != last:
            zero = mx.array(0, cache.keys[0].dtype)
            rk = [k[last:last + 1] + zero for k in cache.keys]
            rv = [v[last:last + 1] + zero for v in cache.values]
            mx.eval(rk, rv)                       # own buffers first, so the big arrays can be donated
            _write_rows(cache.keys, r, rk)
            _write_rows(cache.values, r, rv)
            del rk, rv
            mx.eval(cache.keys, cache.values)
        if not order:
            cache.pos = cache.offset = st.tokens = st.key = self.enc = self.dec = None
        else:
            idx = mx.array(order, mx.int32)
            cache.pos, cache.offset = mx.take(cache.pos, idx, axis=0), mx.take(cache.offset, idx, axis=0)
            st.tokens, st.key = mx.take(st.tokens, idx, axis=0), mx.take(st.key, idx, axis=0)
            self.enc = [mx.take(a, idx, axis=0) for a in self.enc]
            self.dec = [mx.take(a, idx, axis=0) for a in self.dec]
            mx.eval(cache.pos, cache.offset, st.tokens, st.key, self.enc, self.dec)
        st.provided, cache.steps = st.provided[order], cache.steps[order]
        st.batch_size = len(order)
        for a in ("temp_text", "top_k_text", "temp_audio", "top_k_audio", "greedy"):
            setattr(self, a, getattr(self, a)[order])

    # ------------------------------------------------------------------ Mimi
    def _encode(self, frames: np.ndarray) -> mx.array:
        """frames (B, 1920) float32 in row order -> user codes (B, n_cb) int32."""
        _, codes, self.enc = self.mimi._step("enc", self._mimi_mode, mx.array(frames)[:, :, None], self.enc)
        return codes[:, :self.n_cb, 0]

    def _decode(self, agent: mx.array) -> mx.array:
        """agent codes (B, n_cb) in row order -> pcm (B, 1920) float32."""
        pcm, self.dec = self.mimi._step("dec", self._mimi_mode, agent[:, :, None], self.dec)
        return pcm[:, :, 0]

    @property
    def _mimi_mode(self) -> str:
        """The codec's own step, for any number of rows: one compiled graph per batch size, or
        the same graph uncompiled."""
        return "compiled" if self.compiled else "fixed"

    def _prewarm_mimi(self, b: int) -> None:
        """Trace the compiled Mimi steps for b rows (fresh dummy rows; nothing is kept)."""
        enc, dec = self._fresh_mimi_rows(b)
        _, c, e2 = self.mimi._step("enc", self._mimi_mode, mx.zeros((b, self.mimi.frame_size, 1), mx.float32), enc)
        pcm, d2 = self.mimi._step("dec", self._mimi_mode, mx.zeros((b, self.n_cb, 1), mx.int32), dec)
        mx.eval(c, pcm, e2, d2)

    # ------------------------------------------------------------------ LM
    def _temporal(self, x: mx.array):
        """x (B, 1, D) -> (h (R, D) with R >= B (rows past B: padding), text_logits (B, V)); advances
        every row by one position (`RowStep.temporal`)."""
        C = self.lm.config.context
        cache = self.cache
        if self.ring_attn:
            fn = self._temporal_fn(C, self._rows(x.shape[0]), False)
        else:
            step = self.width_step
            width = C if step is None else min(C, -(-(int(cache.steps.max()) + 1) // step) * step)
            fn = self._temporal_fn(width, self._rows(x.shape[0]), bool(cache.steps.min() >= C - 1))
        # The caches are passed in and replaced by the outputs: no other reference to the old
        # arrays survives this call, so the per-row scatter updates them in place (donation).
        kv = cache.keys + cache.values
        cache.keys = cache.values = None
        h, logits, *kv, cache.pos, cache.offset = fn(x, *kv, cache.pos, cache.offset)
        L = len(kv) // 2
        cache.keys, cache.values = list(kv[:L]), list(kv[L:])
        cache.steps += 1
        return h, logits

    def _temporal_fn(self, width: int, rows: int, full: bool):
        """The model's temporal step (`LM._temporal`, rows at their own positions) for this
        attention width, row count and ring state: fn(x (B, 1, D), *keys, *values, pos, offset)."""
        fn = self._temporal_fns.get((width, rows, full))
        if fn is None:
            flags = self.lm.row_flags(width, rows, full, "ring" if self.ring_attn else "mlx")
            fn = functools.partial(self.lm._temporal, flags=flags)
            fn = self._temporal_fns[(width, rows, full)] = mx.compile(fn) if self.compiled else fn
        return fn

    def _rows(self, b: int) -> int:
        """Rows the linear layers run on: b, padded up to `min_rows` when 1 < b < min_rows."""
        return max(b, self.min_rows) if b > 1 else b

    def _depformer(self, s: int, h: mx.array, prev: mx.array, kv: list) -> tuple[mx.array, list]:
        key = (s, h.shape[0], prev.shape[0])
        fn = self._dep_fns.get(key)
        if fn is None:
            fn = functools.partial(self.lm._depformer, s)
            fn = self._dep_fns[key] = mx.compile(fn) if self.compiled else fn
        logits, *kv = fn(h, prev, *kv)
        return logits, kv

    def _lm_step(self, user: mx.array):
        """user codes (B, n_cb) -> (text (B,), agent codes (B, n_cb)) of the undelayed frame: the
        generator's own frame (`LmGen.step_rows`) over the rows, with this batch's model parts."""
        kernel = self.dep_kernel(self.size)
        rows = RowStep(self._temporal, self._sampling(), None if kernel else self._depformer,
                       self._fused_depformer if kernel else None)
        out = self.gen.step_rows(self.state, rows, user)
        return out.text, out.agent_codes

    def _sampling(self) -> "_RowSampling":
        """The rows' sampling parameters, each field a (B,) array (what `frame_walk` reads)."""
        return _RowSampling(self.temp_text, self.top_k_text, self.temp_audio, self.top_k_audio, self.greedy)

    def _fused_depformer(self, h: mx.array, text: mx.array, prov: np.ndarray, target: mx.array,
                         site: mx.array, n_steps: int) -> mx.array:
        """The depformer walk of every row in one kernel launch -> tokens (B, n_steps): the same
        tokens as the MLX loop (same keys, same Gumbel draws, forced codebooks kept)."""
        B = self.size
        card = self.lm.config.card
        p = prov[:, 1:1 + n_steps]
        if p.any():
            forced = mx.where(mx.array(p), target[:, 1:1 + n_steps], -1)
        else:
            forced = mx.full((B, n_steps), -1, mx.int32)
        greedy = self.greedy | (self.temp_audio <= 0)
        temp = np.where(greedy, 0.0, self.temp_audio).astype(np.float32)
        noise = None
        if not greedy.all():
            noise = gumbel(site[:, 1:1 + n_steps], (1, card))[:, :, 0]      # (B, n_steps, card)
        toks, _ = self.fused.depformer_rows(h[:B], text, forced, mx.array(temp), mx.array(self.top_k_audio),
                                            noise, n_steps)
        return toks

    # ------------------------------------------------------------------ one step
    def step(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """frames (B, 1920) float32 mic audio in row order -> (agent pcm (B, 1920), text ids (B,))."""
        B = self.size
        frames = np.ascontiguousarray(frames, dtype=np.float32)
        if B == 0 or frames.shape != (B, self.mimi.frame_size):
            raise ConfigError(f"step expects frames ({B}, {self.mimi.frame_size}), got {frames.shape}")
        user = self._encode(frames)
        text, agent = self._lm_step(user)
        pcm = self._decode(agent)
        st, cache = self.state, self.cache
        state = [pcm, text, st.tokens, st.key, cache.pos, cache.offset, *cache.keys, *cache.values]
        state += self.enc + self.dec
        mx.eval(state)
        return np.array(pcm, dtype=np.float32), np.array(text, dtype=np.int64)
