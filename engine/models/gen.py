"""The generator: token ring, delays, prompt phases (and the cache of prompted states), one 12.5 Hz
step; its tokens are drawn by the sampler in sampling.py.

Semantics follow PersonaPlex's own `LMGen` (github NVIDIA/personaplex, moshi/moshi/models/lm.py;
spec sections 4-5), not PyPI moshi's:

- A ring of CT = max_delay + 3 token columns per stream (17 streams: text, 8 agent, 8 user).
  A token of stream k supplied at call `offset` lands in column (offset + delay_k) % CT.
- The first call (offset 0) runs no model and returns None; so does the second (offset <= max_delay).
- Call `offset` feeds column (offset-1) % CT to the temporal transformer and predicts column offset % CT:
  text first, then the depformer walks codebooks 0..dep_q-1, each conditioned on the previous stream's
  token - the *provided* one where the caller forced it (teacher forcing), else the sampled one.
- Output is the undelayed frame: stream k read at column (offset - max_delay + delay_k) % CT, so agent
  codebooks 1..7 of a frame come from the call after the one that sampled codebook 0.

Which cells are "provided" depends only on which arguments were passed, never on token values, so the
flags live on the host (numpy) and a step needs no device->host sync at all.

Depformer modes: "exact" runs all dep_q steps like the reference; "live" (default) skips the steps that
predict the user's codebooks whenever those are provided (always, with a microphone): they cannot change
any agent token. Every sampling site draws from its own key (split per frame, one sub-key per site),
so live and exact give the same agent tokens even when sampling, not only when greedy.
"""
from __future__ import annotations

import functools
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from .sampling import gumbel, sample, site_key, split_keys

# Mimi codes of a silent frame and of a 440 Hz sine frame (reference constants, spec section 3).
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
TEXT_PAD = 3             # text id fed during every prompt phase except the text prompt
UNGENERATED = -2         # ring cells not written yet
SILENCE_FRAMES = 6       # int(0.5 s * 12.5 Hz), as the reference server/offline runner use
_PREFILL_CHUNK = 64      # temporal prefill chunk (steps)
_CHUNK_SLOW_S = 0.05     # a prefill chunk faster than this is never judged slow (timer noise)

__all__ = ["SamplingParams", "VoicePrompt", "StepOutput", "RowStep", "GenState", "LmGen", "PromptCache",
           "frame_walk", "SILENCE_TOKENS", "SINE_TOKENS", "TEXT_PAD", "SILENCE_FRAMES"]


@dataclass(frozen=True)
class SamplingParams:
    """Temperature + top-k for text and audio (reference defaults); greedy = argmax everywhere.
    A temperature of 0 is greedy for that modality; top_k 0 means the whole vocabulary."""

    temp_text: float = 0.7
    top_k_text: int = 25
    temp_audio: float = 0.8
    top_k_audio: int = 250
    greedy: bool = False

    def __post_init__(self):
        for name in ("temp_text", "temp_audio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ConfigError(f"SamplingParams.{name}={v!r} must be a finite number >= 0")
        for name in ("top_k_text", "top_k_audio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ConfigError(f"SamplingParams.{name}={v!r} must be an int >= 0 (0 = no top-k)")


@dataclass
class VoicePrompt:
    """A voice for prompt phase 1, in one of the reference's two forms.

    embeddings (N, D) float32 + cache (17, 4) int64: what a released `<NAME>.pt` voice holds (the summed
    input embeddings of N voice steps and the token ring after them); replayed straight into the
    temporal transformer, then the ring is restored. codes (8, N): agent Mimi codes of a wav voice,
    stepped as agent tokens (`VoicePrompt.from_codes`).
    """

    embeddings: np.ndarray | None = None
    cache: np.ndarray | None = None
    codes: np.ndarray | None = None

    def __post_init__(self):
        if self.codes is not None:
            if self.embeddings is not None or self.cache is not None:
                raise ConfigError("VoicePrompt takes either codes or embeddings+cache, not both")
            codes = np.asarray(self.codes)
            if codes.ndim != 2 or codes.shape[1] < 1 or not np.issubdtype(codes.dtype, np.integer):
                raise ConfigError(f"VoicePrompt codes must be integer (codebooks, frames), "
                                  f"got {codes.dtype} {codes.shape}")
            self.codes = codes.astype(np.int64)
            return
        if self.embeddings is None or self.cache is None:
            raise ConfigError("VoicePrompt needs embeddings (N, D) and cache (17, 4), or codes")
        emb = np.asarray(self.embeddings, dtype=np.float32)
        cache = np.asarray(self.cache)
        if emb.ndim == 4 and emb.shape[1:3] == (1, 1):  # the .pt layout [N, 1, 1, D]
            emb = emb[:, 0, 0]
        if cache.ndim == 3 and cache.shape[0] == 1:      # the .pt layout [1, 17, 4]
            cache = cache[0]
        if emb.ndim != 2 or emb.shape[0] < 1:
            raise ConfigError(f"VoicePrompt embeddings must be (N, D) with N >= 1, got {emb.shape}")
        if not np.all(np.isfinite(emb)):
            raise ConfigError("VoicePrompt embeddings contain NaN or inf")
        if cache.ndim != 2 or not np.issubdtype(cache.dtype, np.integer):
            raise ConfigError(f"VoicePrompt cache must be an integer (streams, columns) ring, "
                              f"got {cache.dtype} {cache.shape}")
        self.embeddings, self.cache = emb, cache.astype(np.int64)

    @classmethod
    def from_codes(cls, codes) -> "VoicePrompt":
        """Voice from agent Mimi codes (num_codebooks, frames) of a wav voice prompt."""
        return cls(codes=np.asarray(codes))

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[1]) if self.codes is not None else int(self.embeddings.shape[0])


@dataclass
class StepOutput:
    """One undelayed frame: text (B,), agent_codes (B, 8), user_codes (B, 8), all int32 mx arrays."""

    text: mx.array
    agent_codes: mx.array
    user_codes: mx.array


@dataclass(frozen=True)
class RowStep:
    """The model parts of one frame as a slot manager runs them for its rows (`LmGen.step_rows`);
    the frame around them (ring writes, sampling sites, the walk, the output) is `LmGen`'s.

    temporal(x (B, 1, dim)) -> (h (R >= B, dim), text_logits (B, text_out)): advances every row's
    KV ring by one position, each at its own; sampling: `SamplingParams` or its fields as per-row
    arrays; depformer(s, h, prev, kv) -> (logits (B, card), kv): depformer step s with the frame's
    KV so far ([] at s = 0); depformer_all(h, text, prov, target, sites, n_steps) -> tokens (B,
    n_steps), the whole walk in one kernel, or None to walk with `depformer`."""

    temporal: Callable
    sampling: object
    depformer: Callable | None = None
    depformer_all: Callable | None = None


@dataclass
class GenState:
    """Everything that changes during one batch of conversations.

    tokens: (B, streams, CT) int32 ring (device); provided: bool on the host, (streams, CT) the same
    for every row (it depends only on which arguments were given), or (B, streams, CT) one per row
    (a slot manager's batch, whose rows joined at different times); offset: calls made so far (a
    slot manager's shared ring phase); cache: the temporal KV ring (`LmCache`, rows at their own
    positions); key: the RNG key (split once per model call), or (B, 2) one per row.
    """

    tokens: mx.array
    provided: np.ndarray
    offset: int
    cache: object
    key: mx.array
    batch_size: int

    def copy(self) -> "GenState":
        """Independent snapshot (mx arrays are immutable values, so sharing them is safe)."""
        return GenState(self.tokens, self.provided.copy(), self.offset, self.cache.copy(), self.key,
                        self.batch_size)


def _as_codes(x, name: str, batch: int, n: int, card: int) -> mx.array:
    """Validate (B, n) integer codes. Values are range-checked only for host arrays (no device sync)."""
    if isinstance(x, mx.array):
        if x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.shape != (batch, n) or not mx.issubdtype(x.dtype, mx.integer):
            raise ConfigError(f"{name} must be integer ({batch}, {n}), got {x.dtype} {tuple(x.shape)}")
        return x.astype(mx.int32)
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 1 and batch == 1 and a.shape[0] == n:
        a = a[None]
    if a.shape != (batch, n) or not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(f"{name} must be integer ({batch}, {n}), got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= card):
        raise ConfigError(f"{name} has values outside 0..{card - 1} (min {a.min()}, max {a.max()})")
    return mx.array(a.astype(np.int32))


def frame_walk(h: mx.array, text_logits: mx.array, target: mx.array, prov: np.ndarray, n_steps: int,
               sites: mx.array, sp, depformer=None, depformer_all=None, after_text=None) -> list:
    """The tokens of one frame after the temporal step: the text token, then the depformer's walk
    over the codebooks, each step conditioned on the previous stream's token (the provided one
    where the caller forced it). The one eager spelling of the walk, run by `LmGen._step` for a
    solo state and for the server's batch (`step_rows`: rows at their own positions, each with its
    own parameters and key); `_step_graph` and `_fused_graph` are its compiled and fused batch-1 forms.

    h (R, dim) temporal output (R >= B: padding rows), text_logits (B, text_out), target (B,
    streams) the target column as it stands (forced tokens where provided), prov (streams,) for
    every row or (B, streams) per row, host bool; n_steps depformer steps; sites the sub-keys of
    `split_keys` ((1 + dep_q, 2) shared or (B, 1 + dep_q, 2) per row); sp the sampling parameters
    (`SamplingParams`, or anything with its fields as per-row arrays). depformer(s, h, prev) ->
    logits (B, card), the caller keeping the step's KV; or depformer_all(text) -> tokens (B,
    n_steps) with the forced tokens in place (a kernel that walks every step at once).
    after_text(h, text): called once the text token is sampled (a probe). -> the new target
    column: one (B,) token array per stream."""
    B, S = target.shape
    prov = np.broadcast_to(prov, (B, S))

    def pick(k, sampled):
        if prov[:, k].all():
            return target[:, k]
        if not prov[:, k].any():
            return sampled
        return mx.where(mx.array(prov[:, k]), target[:, k], sampled)

    text = sample(text_logits, sp.temp_text, sp.top_k_text, sp.greedy, site_key(sites, 0)).astype(mx.int32)
    if after_text is not None:
        after_text(h, text)
    prev = pick(0, text)
    col = [prev]
    if depformer_all is not None:
        toks = depformer_all(prev)
        col.extend(toks[:, s] for s in range(n_steps))
    else:
        for s in range(n_steps):
            logits = depformer(s, h, prev)
            tok = sample(logits, sp.temp_audio, sp.top_k_audio, sp.greedy, site_key(sites, 1 + s)).astype(mx.int32)
            prev = pick(s + 1, tok)
            col.append(prev)
    col.extend(target[:, k] for k in range(n_steps + 1, S))
    return col


def _step_graph(lm, sp: SamplingParams, prov: tuple, n_steps: int, flags: tuple, emit: bool,
                tokens, in_col, tgt_col, out_idx, key, *cache):
    """One model call of `LmGen._step` as a pure function (traced by mx.compile).

    tokens (B, streams, CT) ring; in_col (1,) / tgt_col (2,) = [0, target column] / out_idx
    (streams,) the ring phase; key the RNG key; cache the LmCache arrays. Returns (tokens, key,
    out (B, streams) or None, *cache). Same draws as the eager path: split the key, one sub-key
    per sampling site (text, then depformer step s).
    """
    c = lm.config
    B, S, _ = tokens.shape
    x = lm.embed(mx.slice(tokens, in_col, axes=(2,), slice_size=(B, S, 1)))
    target = mx.slice(tokens, tgt_col[1:], axes=(2,), slice_size=(B, S, 1))[:, :, 0]
    h, text_logits, *cache = lm._temporal(x.astype(lm.dtype), *cache, flags=flags)   # (B, D), (B, V)
    key, keys = split_keys(key, 1 + c.dep_q)
    # Sampled tokens stay uint32 (argmax's type) inside the graph: the embedding lookups take them
    # as they are, and `_column` casts each run of sampled streams once.
    prev = target[:, 0] if prov[0] else sample(text_logits, sp.temp_text, sp.top_k_text, sp.greedy,
                                               site_key(keys, 0))
    # Every audio site's noise in one draw (bit-identical to one gumbel call per site key).
    noise = [None] * n_steps
    if not (sp.greedy or sp.temp_audio <= 0) and n_steps:
        g = gumbel(keys[1:1 + n_steps], (B, c.card))
        noise = [a.squeeze(0) for a in mx.split(g, n_steps, axis=0)] if n_steps > 1 else [g.squeeze(0)]
    x_in = lm.depformer_inputs(h, n_steps) if n_steps else []
    new_col, kv = [prev], []
    for s in range(n_steps):
        logits, *kv = lm._depformer(s, h, prev, *kv, x_in=x_in[s])
        if prov[s + 1]:
            prev = target[:, s + 1]
        else:
            prev = sample(logits, sp.temp_audio, sp.top_k_audio, sp.greedy, noise=noise[s])
        new_col.append(prev)
    if not all(prov):
        col = _column(new_col, target, n_steps, prov)
        tokens = mx.slice_update(tokens, col[:, :, None], tgt_col, axes=(1, 2))
    out = None
    if emit:  # stream k read at its own delayed column: one gather, no arange
        out = mx.take_along_axis(tokens, mx.broadcast_to(out_idx[None, :, None], (B, S, 1)), axis=2)[:, :, 0]
    return (tokens, key, out, *cache)


def _column(new_col: list, target: mx.array, n_steps: int, prov: tuple) -> mx.array:
    """The target column (B, streams) int32: new_col[k] for k <= n_steps (uint32 where sampled,
    int32 where provided), target's own value after. Runs of one kind become one slice/stack."""
    parts, k = [], 0
    S = target.shape[1]
    while k < S:
        sampled = k <= n_steps and not prov[k]
        end = k + 1
        while end < S and (end <= n_steps and not prov[end]) == sampled:
            end += 1
        if sampled:
            parts.append(mx.stack(new_col[k:end], axis=1).astype(mx.int32))
        else:
            parts.append(target[:, k:end])
        k = end
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def _fused_graph(lm, fused, sp: SamplingParams, prov0: bool, n_steps: int, emit: bool,
                 tokens, in_col, tgt_col, out_idx, key, kv, pos, offset):
    """`_step_graph` for the fused CUDA kernels (engine/models/fused.py): batch 1, no agent stream
    provided. Same inputs, key splits and noise draws; the model part is two kernel launches."""
    from .fused import FusedCache
    c = lm.config
    B, S, _ = tokens.shape
    x = lm.embed(mx.slice(tokens, in_col, axes=(2,), slice_size=(B, S, 1)))
    target = mx.slice(tokens, tgt_col[1:], axes=(2,), slice_size=(B, S, 1))[:, :, 0]
    cache = FusedCache(kv, pos, offset)
    h, text_logits, scr = fused.temporal(x.reshape(-1), cache)
    cache = fused.advance(cache, scr)
    key, keys = split_keys(key, 1 + c.dep_q)
    if prov0:
        text = target[:, 0]
    else:
        text = sample(text_logits[None].astype(lm.dtype), sp.temp_text, sp.top_k_text, sp.greedy,
                      site_key(keys, 0)).astype(mx.int32)
    noise = None
    if not (sp.greedy or sp.temp_audio <= 0):
        noise = gumbel(keys[1:1 + n_steps], (B, c.card))
    toks, _ = fused.depformer(h, text, noise, n_steps, sp)
    col = mx.concatenate([text.reshape(1, 1), toks.reshape(1, n_steps), target[:, n_steps + 1:]], axis=1)
    tokens = mx.slice_update(tokens, col[:, :, None], tgt_col, axes=(1, 2))
    out = None
    if emit:
        out = mx.take_along_axis(tokens, mx.broadcast_to(out_idx[None, :, None], (B, S, 1)), axis=2)[:, :, 0]
    return (tokens, key, out, cache.kv, cache.pos, cache.offset)


class LmGen:
    """Generator over an `engine.models.lm.LM`. Holds no per-conversation state: see `new_state`."""

    def __init__(self, lm, sampling: SamplingParams | None = None, depformer_mode: str = "live",
                 fused: bool | str = "auto"):
        if depformer_mode not in ("live", "exact"):
            raise ConfigError(f"depformer_mode={depformer_mode!r} must be 'live' or 'exact'")
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise ConfigError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        self.lm, self.sampling, self.depformer_mode = lm, sampling, depformer_mode
        self.stats_hook = None      # diagnostics only: fn(name, logits) for text / agent audio logits
        # With a compiled LM (lm.compile()), one live step is ONE mx.compile'd graph (embedding,
        # temporal, text sampling, depformer loop, sampling, ring write, output gather): far fewer
        # host-side ops per step, which is what bounds MLX on a GPU. False: per-stage graphs only.
        self.whole_step_compile = True
        # Fused CUDA step (engine/models/fused.py): "auto" uses it for batch-1 live steps when MLX
        # runs on CUDA and the model fits the kernels (env PERSONAPLEX_FUSED=0 turns it off);
        # True insists (error if unavailable); False never.
        if fused not in ("auto", True, False):
            raise ConfigError(f"fused={fused!r} must be 'auto', True or False")
        self.fused_mode = fused
        self._fused = None
        self._fused_fns: dict = {}
        # Prompt prefill: chunk length, and a guard that times the first chunk against single steps
        # once per generator and falls back to T=1 steps if chunks are slower per position (the
        # MLX CUDA batched-prefill pathology). `chunk_ok` holds the decision (None: not measured).
        self.prefill_chunk = _PREFILL_CHUNK
        self.prefill_guard = True
        self.chunk_ok: bool | None = None
        c = self.config = lm.config
        self.delays = tuple(c.delays)
        self.max_delay = max(self.delays)
        self.ct = self.max_delay + 3
        self.num_streams = c.n_q + 1
        self.n_cb = c.n_q // 2                       # codebooks per side (agent 1..n_cb, user n_cb+1..)
        self.initial = np.array([c.text_card] + [c.card] * c.n_q, dtype=np.int32)
        # Streams of one side grouped into runs of equal delay, for contiguous ring writes.
        self._runs = {side: self._delay_runs(first) for side, first in (("agent", 1), ("user", 1 + self.n_cb))}
        self._starts: dict = {}
        # Per ring phase o % ct: (input column, target column, output columns) as device arrays, made
        # once, so a compiled step is traced once and fed without per-step host->device copies.
        self._phase_arrays = [
            (mx.array([(o - 1) % self.ct], dtype=mx.int32), mx.array([0, o % self.ct], dtype=mx.int32),
             mx.array([(o - self.max_delay + d) % self.ct for d in self.delays], dtype=mx.int32))
            for o in range(self.ct)]

    def _delay_runs(self, first: int) -> list[tuple[int, int, int]]:
        runs, q = [], 0
        while q < self.n_cb:
            end = q + 1
            while end < self.n_cb and self.delays[first + end] == self.delays[first + q]:
                end += 1
            runs.append((q, end, self.delays[first + q]))
            q = end
        return runs

    # ------------------------------------------------------------------ state
    def new_state(self, batch_size: int = 1, seed: int | None = None) -> GenState:
        """Fresh state for `batch_size` conversations; `seed` fixes sampling (None = random)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1")
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed={seed!r} must be an int >= 0 or None")
        b = int(batch_size)
        tokens = mx.full((b, self.num_streams, self.ct), UNGENERATED, dtype=mx.int32)
        return GenState(tokens, np.zeros((self.num_streams, self.ct), dtype=bool), 0,
                        self.lm.make_cache(b), mx.random.key(int(seed)), b)

    # ------------------------------------------------------------------ ring bookkeeping
    def _put(self, tokens: mx.array, values: mx.array, stream: int, col: int) -> mx.array:
        """tokens[:, stream:stream+n, col] = values (B or 1, n)."""
        values = mx.broadcast_to(values, (tokens.shape[0], values.shape[1]))
        start = self._starts.get((stream, col))
        if start is None:  # made once per (stream, column): no host->device array per step
            start = self._starts[(stream, col)] = mx.array([stream, col], dtype=mx.int32)
        return mx.slice_update(tokens, values[:, :, None], start, axes=(1, 2))

    def _prepare(self, state: GenState, user, agent, text) -> bool:
        """Reference `prepare_step_input` on the state: write supplied tokens at offset + delay, force the
        initial token where offset <= delay. Returns False on the very first call (no model run)."""
        o, ct = state.offset, self.ct
        tokens = state.tokens
        for side, codes in (("user", user), ("agent", agent)):
            if codes is None:
                continue
            first = 1 if side == "agent" else 1 + self.n_cb
            for q0, q1, d in self._runs[side]:
                col = (o + d) % ct
                tokens = self._put(tokens, codes[:, q0:q1], first + q0, col)
                state.provided[..., first + q0:first + q1, col] = True
        if text is not None:
            col = (o + self.delays[0]) % ct
            tokens = self._put(tokens, text[:, None], 0, col)
            state.provided[..., 0, col] = True
        forced = [k for k, d in enumerate(self.delays) if o <= d]
        if forced:
            col = o % ct
            init = np.where(np.isin(np.arange(self.num_streams), forced), self.initial, 0)
            mask = np.zeros((self.num_streams, ct), dtype=bool)
            mask[forced, col] = True
            tokens = mx.where(mx.array(mask)[None], mx.array(init)[None, :, None], tokens)
            state.provided[..., forced, col] = True
        if o == 0:
            # Whole column 0 becomes the initial tokens (the model's BOS input); nothing runs.
            tokens = self._put(tokens, mx.broadcast_to(mx.array(self.initial)[None],
                                                       (state.batch_size, self.num_streams)), 0, 0)
            state.tokens = tokens
            state.offset = 1
            return False
        state.tokens = tokens
        return True

    def _text_array(self, text_token, batch: int) -> mx.array:
        if isinstance(text_token, mx.array):
            if text_token.ndim == 0:
                text_token = text_token.reshape(1)
            if text_token.shape not in ((batch,), (1,)) or not mx.issubdtype(text_token.dtype, mx.integer):
                raise ConfigError(f"text_token must be an int or integer ({batch},), got "
                                  f"{text_token.dtype} {tuple(text_token.shape)}")
            return mx.broadcast_to(text_token.astype(mx.int32), (batch,))
        a = np.asarray(text_token)
        if a.ndim == 0:
            a = a.reshape(1)
        if a.shape not in ((batch,), (1,)) or not np.issubdtype(a.dtype, np.integer):
            raise ConfigError(f"text_token must be an int or integer ({batch},), got {text_token!r}")
        if a.min() < 0 or a.max() > self.config.text_card:
            raise ConfigError(f"text_token {a.tolist()} outside 0..{self.config.text_card}")
        return mx.broadcast_to(mx.array(a.astype(np.int32)), (batch,))

    # ------------------------------------------------------------------ one step
    def step(self, state: GenState, user_codes=None, agent_codes=None, text_token=None,
             probe: Callable[[str], None] | None = None) -> StepOutput | None:
        """Advance every conversation of the batch by one 80 ms frame.

        user_codes / agent_codes: (B, 8) Mimi codes (mx or numpy) forced into the user / agent streams;
        text_token: int or (B,) forced text. Returns the undelayed frame, or None for the first two calls.
        probe(stage), if given, is called after "temporal" and "depformer" with that stage evaluated.
        """
        b, card = state.batch_size, self.config.card
        user = None if user_codes is None else _as_codes(user_codes, "user_codes", b, self.n_cb, card)
        agent = None if agent_codes is None else _as_codes(agent_codes, "agent_codes", b, self.n_cb, card)
        text = None if text_token is None else self._text_array(text_token, b)
        return self._step(state, user, agent, text, None, probe)

    def step_rows(self, state: GenState, rows: "RowStep", user_codes=None) -> StepOutput:
        """`step` for a slot manager's batch (engine/server/batch.py): the same frame (ring writes,
        text token, depformer walk, ring update, undelayed output) with the model parts its rows
        need (`RowStep`): rows at their own KV positions, per-row provided flags, keys and sampling
        parameters. `state.offset` is the batch's ring phase (past the prompt phases). Nothing is
        evaluated: the caller evaluates the tick (the codec's steps with it) at once."""
        out = self._step(state, user_codes, None, None, None, None, rows)
        if out is None:
            raise ConfigError(f"step_rows needs a state past the prompt phases (offset {state.offset})")
        return out

    def _step(self, state: GenState, user, agent, text, embedding, probe,
              rows: "RowStep | None" = None) -> StepOutput | None:
        if not self._prepare(state, user, agent, text):
            if embedding is None:
                return None
            # Reference `step_embeddings`: the call at offset 0 is retried with the same dummy tokens.
            self._prepare(state, user, agent, text)
        c, ct, o = self.config, self.ct, state.offset
        in_col, tgt_col = (o - 1) % ct, o % ct
        prov = state.provided[..., tgt_col].copy()                         # (streams,) or (B, streams)
        self._check_known(state, in_col)
        # The batch-1 fast forms (fused, compiled) know flags shared by the rows only.
        plain = (rows is None and state.provided.ndim == 2 and embedding is None and probe is None
                 and self.stats_hook is None and self.lm.stats_hook is None)
        if plain and state.batch_size == 1 and not prov[1:1 + self._live_steps(prov)].any():
            fused = self.fused_engine()
            if fused is not None:
                return self._fused_step(state, fused, prov, in_col)
        if rows is None:
            self._mlx_cache(state)
        if plain and self.whole_step_compile and self.lm._compiled is not None:
            return self._compiled_step(state, prov, in_col)
        target = state.tokens[:, :, tgt_col]                                # (B, streams)
        if embedding is None:
            x = self.lm.embed(state.tokens[:, :, in_col:in_col + 1])
        else:
            x = mx.broadcast_to(embedding.astype(self.lm.dtype)[None, None], (state.batch_size, 1, c.dim))
        if rows is None:
            h, text_logits = self.lm.temporal(x, state.cache)
            h, text_logits = h[:, 0], text_logits[:, 0]
        else:
            h, text_logits = rows.temporal(x)
        if self.stats_hook is not None:
            self.stats_hook("text_logits", text_logits)

        state.key, keys = split_keys(state.key, 1 + c.dep_q)
        n_steps = self._live_steps(prov)
        dc = self.lm.make_depformer_cache()
        kv: list = []

        def depformer(s, h, prev):
            nonlocal kv
            if rows is not None:
                logits, kv = rows.depformer(s, h, prev, kv)
            else:
                logits = self.lm.depformer_step(s, h, prev, dc)
            if self.stats_hook is not None and s < self.n_cb:
                self.stats_hook("audio_logits", logits)
            return logits

        def depformer_all(text):
            return rows.depformer_all(h, text, prov, target, keys, n_steps)

        def after_text(h, text):
            mx.eval(h, text)
            probe("temporal")

        kernel = rows is not None and rows.depformer_all is not None
        new_col = frame_walk(h, text_logits, target, prov, n_steps, keys,
                             self.sampling if rows is None else rows.sampling,
                             None if kernel else depformer, depformer_all if kernel else None,
                             after_text=None if probe is None else after_text)
        if probe is not None:
            mx.eval(new_col)
            probe("depformer")

        state.provided[..., in_col] = False
        if not prov.all():
            state.tokens = self._put(state.tokens, mx.stack(new_col, axis=1), 0, tgt_col)
        if o <= self.max_delay:
            state.offset += 1
            mx.async_eval(state.tokens, state.key)
            return None
        out = self.delayed(state.tokens, o)                                 # (B, streams)
        state.offset += 1
        res = StepOutput(out[:, 0], out[:, 1:1 + self.n_cb], out[:, 1 + self.n_cb:1 + 2 * self.n_cb])
        if rows is None:      # a slot manager evaluates its whole tick (codec included) at once
            mx.async_eval(state.tokens, state.key, res.text, res.agent_codes, res.user_codes)
        return res

    def _live_steps(self, prov) -> int:
        """Depformer steps of a frame whose provided target streams are `prov` ((streams,), or
        (B, streams) per row: a step is skipped only where every row provides its stream)."""
        n_steps = self.config.dep_q
        if self.depformer_mode == "live":
            # Steps that predict provided streams beyond the agent's codebooks cannot affect anything.
            while n_steps > self.n_cb and np.asarray(prov)[..., n_steps].all():
                n_steps -= 1
        return n_steps

    def delayed(self, tokens: mx.array, offset: int) -> mx.array:
        """The undelayed frame of call `offset` from the ring: stream k read at column
        (offset - max_delay + delay_k) % CT -> (B, streams)."""
        idx = [(offset - self.max_delay + d) % self.ct for d in self.delays]
        return tokens[:, mx.arange(self.num_streams), mx.array(idx)]

    def _compiled_step(self, state: GenState, prov: np.ndarray, in_col: int) -> StepOutput | None:
        """`_step` after `_prepare` as one compiled graph. Static (part of the trace key): the
        sampling parameters, which target streams are provided, the depformer step count, the
        temporal flags and whether a frame is emitted; the ring phase is passed as arrays."""
        lm, o = self.lm, state.offset
        emit = o > self.max_delay
        n_steps = self._live_steps(prov)
        flags = lm.temporal_flags(1, state.cache.step)
        trace_key = ("gen_step", self.sampling, tuple(bool(p) for p in prov), n_steps, flags, emit)
        fns = lm._compiled.setdefault("gen", {})
        fn = fns.get(trace_key)
        if fn is None:
            fn = fns[trace_key] = mx.compile(functools.partial(
                _step_graph, lm, self.sampling, trace_key[2], n_steps, flags, emit))
        in_arr, tgt_arr, out_arr = self._phase_arrays[o % self.ct]
        res = fn(state.tokens, in_arr, tgt_arr, out_arr, state.key, *state.cache.arrays())
        state.tokens, state.key = res[0], res[1]
        lm.take_temporal_state((None, None, *res[3:]), state.cache, 1)
        state.provided[:, in_col] = False
        state.offset += 1
        if not emit:
            mx.async_eval(state.tokens, state.key)
            return None
        out = res[2]
        out = StepOutput(out[:, 0], out[:, 1:1 + self.n_cb], out[:, 1 + self.n_cb:1 + 2 * self.n_cb])
        mx.async_eval(state.tokens, state.key, out.text, out.agent_codes, out.user_codes)
        return out

    def set_fused(self, mode: bool | str) -> None:
        """Switch the fused CUDA step: "auto", True (error where unavailable) or False."""
        if mode not in ("auto", True, False):
            raise ConfigError(f"fused={mode!r} must be 'auto', True or False")
        self.fused_mode, self._fused, self._fused_fns = mode, None, {}

    def fused_engine(self):
        """The `FusedLM` for this model, or None where the fused step is off or unavailable."""
        if self._fused is None:
            import os
            from .fused import FusedLM, FusedUnavailable
            off = self.fused_mode is False or (self.fused_mode == "auto"
                                               and os.environ.get("PERSONAPLEX_FUSED", "1") == "0")
            if off:
                self._fused = False
            else:
                # Cached on the model: the FusedLM (weights packed once), or why there is none.
                fused = getattr(self.lm, "_fused_lm", None)
                if fused is None:
                    try:
                        fused = FusedLM(self.lm)
                    except FusedUnavailable as e:
                        fused = str(e)
                    self.lm._fused_lm = fused
                if isinstance(fused, str):
                    if self.fused_mode is True:
                        raise FusedUnavailable(fused)
                    fused = False
                self._fused = fused
        return self._fused or None

    @staticmethod
    def _mlx_cache(state: GenState) -> None:
        """Make sure `state.cache` is an `LmCache` (the MLX path's layout)."""
        from .fused import FusedCache
        if isinstance(state.cache, FusedCache):
            state.cache = state.cache.to_lm_cache()

    def _fused_step(self, state: GenState, fused, prov: np.ndarray, in_col: int) -> StepOutput | None:
        from .fused import FusedCache
        if not isinstance(state.cache, FusedCache):
            state.cache = FusedCache.from_lm_cache(state.cache)
        o = state.offset
        emit = o > self.max_delay
        n_steps = self._live_steps(prov)
        trace_key = (self.sampling, bool(prov[0]), n_steps, emit)
        fn = self._fused_fns.get(trace_key)
        if fn is None:
            fn = functools.partial(_fused_graph, self.lm, fused, self.sampling, bool(prov[0]), n_steps, emit)
            if self.whole_step_compile:
                fn = mx.compile(fn)
            self._fused_fns[trace_key] = fn
        in_arr, tgt_arr, out_arr = self._phase_arrays[o % self.ct]
        c = state.cache
        step = c.step
        res = fn(state.tokens, in_arr, tgt_arr, out_arr, state.key, c.kv, c.pos, c.offset)
        # Drop every reference to the old ring before evaluating, so the KV write happens in place
        # (a shared ring would be copied: 1.5 GB per step at the 7B shapes).
        del c
        state.tokens, state.key = res[0], res[1]
        state.cache = FusedCache(res[3], res[4], res[5], step + 1)
        state.provided[:, in_col] = False
        state.offset += 1
        if not emit:
            mx.async_eval(state.tokens, state.key, *state.cache.arrays())
            return None
        out = res[2]
        out = StepOutput(out[:, 0], out[:, 1:1 + self.n_cb], out[:, 1 + self.n_cb:1 + 2 * self.n_cb])
        mx.async_eval(state.tokens, state.key, out.text, out.agent_codes, out.user_codes, *state.cache.arrays())
        return out

    def warmup(self, state: GenState, steps: int = 3) -> None:
        """Trace (and JIT) the live step on a throw-away copy of `state`, so the first real frames
        are not late: with a compiled LM the first call of a step pattern traces the whole graph.
        `state` is left untouched (mx arrays are values; the copy never donates shared buffers)."""
        scratch = state.copy()
        user = np.broadcast_to(np.array(SINE_TOKENS, dtype=np.int32), (state.batch_size, self.n_cb))
        for _ in range(steps):
            self.step(scratch, user_codes=user)
        mx.eval(scratch.tokens, scratch.key, *scratch.cache.arrays())

    def _check_known(self, state: GenState, in_col: int) -> None:
        # With dep_q < n_q the depformer never samples streams dep_q+1.., so they must be supplied.
        c = self.config
        if c.dep_q < c.n_q and not state.provided[..., c.dep_q + 1:, in_col].all() and state.offset > 1:
            raise ConfigError(f"this model generates only {c.dep_q} audio streams: pass user_codes "
                              "on every step")

    # ------------------------------------------------------------------ prompt phases
    def _prompt_calls(self, voice: VoicePrompt | None, text_tokens, silence_frames: int):
        """The reference's prompt call sequence as (user, agent, text, embedding index | None)."""
        sine, silence = np.array(SINE_TOKENS), np.array(SILENCE_TOKENS)
        calls = []
        if voice is not None and voice.codes is not None:
            calls += [(sine, voice.codes[:, i], TEXT_PAD, None) for i in range(voice.num_frames)]
        elif voice is not None:
            dummy = np.full(self.n_cb, self.config.card)
            calls += [(dummy, dummy, TEXT_PAD, i) for i in range(voice.num_frames)]
        calls += [(sine, silence, TEXT_PAD, None)] * silence_frames
        calls += [(sine, silence, int(t), None) for t in text_tokens]
        calls += [(sine, silence, TEXT_PAD, None)] * silence_frames
        return calls

    def _validate_prompts(self, state, voice, text_tokens, silence_frames):
        c = self.config
        if not isinstance(state, GenState):
            raise ConfigError(f"state must come from LmGen.new_state, got {type(state).__name__}")
        if voice is not None and not isinstance(voice, VoicePrompt):
            raise ConfigError(f"voice must be a VoicePrompt or None, got {type(voice).__name__}")
        if voice is not None and voice.codes is not None:
            codes = voice.codes
            if codes.shape[0] != self.n_cb or codes.min() < 0 or codes.max() >= c.card:
                raise ConfigError(f"voice codes must be ({self.n_cb}, N) in 0..{c.card - 1}, got shape "
                                  f"{codes.shape}, range {codes.min()}..{codes.max()}")
        elif voice is not None:
            if voice.embeddings.shape[1] != c.dim:
                raise ConfigError(f"voice embeddings have width {voice.embeddings.shape[1]}, this model "
                                  f"needs {c.dim} (a voice made for another model?)")
            if voice.cache.shape != (self.num_streams, self.ct):
                raise ConfigError(f"voice cache has shape {voice.cache.shape}, expected "
                                  f"({self.num_streams}, {self.ct})")
        text_tokens = [] if text_tokens is None else list(text_tokens)
        for t in text_tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < c.text_card:
                raise ConfigError(f"text prompt token {t!r} outside 0..{c.text_card - 1}")
        if isinstance(silence_frames, bool) or not isinstance(silence_frames, int) or silence_frames < 0:
            raise ConfigError(f"silence_frames={silence_frames!r} must be an int >= 0")
        return text_tokens

    def run_prompts(self, state: GenState, voice: VoicePrompt | None = None, text_tokens=None,
                    silence_frames: int = SILENCE_FRAMES, batched: bool = True) -> None:
        """Prompt phases: voice, silence, text prompt, silence (all streams forced, outputs discarded).

        batched=True prefills the temporal transformer in chunks (one model call for the whole prompt
        when it fits the context); the token ring, flags, offset and RNG key end up exactly as with
        batched=False, which steps one call at a time like the reference. An empty text prompt skips
        phase 3 (the reference crashes there).
        """
        if batched:
            for _ in self.prompt_steps(state, voice, text_tokens, silence_frames):
                pass
            return
        calls, emb, n_voice_calls = self._prompt_plan(state, voice, text_tokens, silence_frames)
        for i, (u, a, t, e) in enumerate(calls):
            self._step(state, mx.array(u[None].astype(np.int32)), mx.array(a[None].astype(np.int32)),
                       mx.array([t], dtype=mx.int32), None if e is None else emb[e], None)
            if i == n_voice_calls - 1 and voice is not None and voice.cache is not None:
                self._restore_ring(state, voice.cache)
            mx.eval(state.tokens)

    def _prompt_plan(self, state, voice, text_tokens, silence_frames):
        """Validate, then the model calls of the prompt phases, the voice embeddings (or None)
        and how many calls belong to the voice."""
        text_tokens = self._validate_prompts(state, voice, text_tokens, silence_frames)
        self._mlx_cache(state)
        calls = self._prompt_calls(voice, text_tokens, silence_frames)
        emb = None if voice is None or voice.embeddings is None else mx.array(voice.embeddings)
        return calls, emb, (voice.num_frames if voice is not None else 0)

    def prompt_steps(self, state: GenState, voice: VoicePrompt | None = None, text_tokens=None,
                     silence_frames: int = SILENCE_FRAMES, max_chunk: int | None = None):
        """`run_prompts(batched=True)` as a generator: it yields after each evaluated prefill chunk
        (at most `max_chunk` positions, default `prefill_chunk`), so a caller with deadlines (the
        server's loop) can spread a new prompt over the slack of several ticks. The state is
        complete once the generator is exhausted; validation errors raise at the first `next`."""
        calls, emb, n_voice_calls = self._prompt_plan(state, voice, text_tokens, silence_frames)
        yield from self._prefill(state, calls, emb, voice, n_voice_calls, max_chunk)

    def _restore_ring(self, state: GenState, ring: np.ndarray) -> None:
        # Reference: `state.cache.copy_(voice_prompt_cache)`: tokens only, flags untouched.
        state.tokens = mx.broadcast_to(mx.array(ring.astype(np.int32))[None], state.tokens.shape)

    def _simulate(self, ring, provided, o, calls, voice, n_voice_calls):
        """Run the reference's token bookkeeping for forced calls on host arrays (in place).
        Returns (inputs, offset): per model call its input ring column (B, streams) or, for a replayed
        voice embedding, the embedding index."""
        ct = self.ct
        inputs: list = []
        for i, (u, a, t, e) in enumerate(calls):
            while True:
                for side, codes in (("user", u), ("agent", a)):
                    first = 1 if side == "agent" else 1 + self.n_cb
                    for q0, q1, d in self._runs[side]:
                        ring[:, first + q0:first + q1, (o + d) % ct] = codes[q0:q1]
                        provided[first + q0:first + q1, (o + d) % ct] = True
                ring[:, 0, (o + self.delays[0]) % ct] = t
                provided[0, (o + self.delays[0]) % ct] = True
                for k, d in enumerate(self.delays):
                    if o <= d:
                        ring[:, k, o % ct] = self.initial[k]
                        provided[k, o % ct] = True
                if o == 0:
                    ring[:, :, 0] = self.initial
                    o = 1
                    if e is not None:  # step_embeddings retries the first call
                        continue
                    break
                in_col, tgt_col = (o - 1) % ct, o % ct
                if not provided[:, tgt_col].all():
                    raise AssertionError("prompt step with a stream that is not forced")
                inputs.append(e if e is not None else ring[:, :, in_col].copy())
                provided[:, in_col] = False
                o += 1
                break
            if i == n_voice_calls - 1 and voice is not None and voice.cache is not None:
                ring[:] = voice.cache[None]
        return inputs, o

    def _prefill(self, state, calls, emb, voice, n_voice_calls, max_chunk: int | None = None):
        """Simulate the ring on the host (every stream is forced, so no token depends on the model),
        collect each model call's input, then run the temporal transformer over them in chunks,
        yielding after each. The depformer is skipped: with every target stream provided, nothing
        it samples is kept. The ring, offset and key are set after the last chunk."""
        ring = np.array(state.tokens)                       # one sync, before any model work
        b = state.batch_size
        inputs, o = self._simulate(ring, state.provided, state.offset, calls, voice, n_voice_calls)
        # Embed the token columns in one go; voice embeddings are used as they are.
        tok_idx = [j for j, x in enumerate(inputs) if not isinstance(x, int)]
        xs = [None] * len(inputs)
        if tok_idx:
            cols = np.stack([inputs[j] for j in tok_idx], axis=-1).astype(np.int32)  # (B, streams, T)
            embedded = self.lm.embed(mx.array(cols))                             # (B, T, D)
            for n, j in enumerate(tok_idx):
                xs[j] = embedded[:, n]
        for j, x in enumerate(inputs):
            if isinstance(x, int):
                xs[j] = mx.broadcast_to(emb[x].astype(self.lm.dtype)[None], (b, self.config.dim))
        key = state.key
        for _ in inputs:
            key, _sub = mx.random.split(key)
        # Chunks must not wrap the KV ring (a chunk may not overwrite keys its first query still sees).
        cache, ctx, start = state.cache, self.config.context, 0
        chunk = self.prefill_chunk if max_chunk is None else max(1, min(max_chunk, self.prefill_chunk))
        # Guard: 2 single steps (the second is timed), then the first chunk is judged against it.
        probe_left = 2 if (self.prefill_guard and self.chunk_ok is None and chunk > 1 and len(xs) >= 6) else 0
        single = None
        while start < len(xs):
            pos = cache.step
            limit = 1 if (probe_left or self.chunk_ok is False) else chunk
            n = min(limit, len(xs) - start, ctx - pos) if pos < ctx else 1
            x = mx.stack(xs[start:start + n], axis=1)
            t0 = time.perf_counter()
            self.lm.temporal(x, cache, compiled=False if n > 1 else None)
            mx.eval(cache.arrays())
            dt = time.perf_counter() - t0
            if probe_left:
                probe_left -= 1
                single = dt if probe_left == 0 else None
            elif single is not None and n > 1 and self.chunk_ok is None:
                self.chunk_ok = dt < _CHUNK_SLOW_S or dt / n <= 2 * single
                single = None
            start += n
            if start < len(xs):
                yield n
        state.tokens = mx.array(ring.astype(np.int32))
        state.offset, state.key = o, key
        mx.eval(state.tokens, state.key)

    def voice_prompt_from_codes(self, codes) -> VoicePrompt:
        """Turn a wav voice's agent codes (8, N) into the embeddings+cache form a `.pt` voice holds
        (the reference's `save_voice_prompt_embeddings`): N-1 summed input embeddings and the ring."""
        voice = VoicePrompt.from_codes(codes)
        self._validate_prompts(GenState.__new__(GenState), voice, [], 0)
        calls = self._prompt_calls(voice, [], 0)
        ring = np.full((1, self.num_streams, self.ct), UNGENERATED, dtype=np.int64)
        provided = np.zeros((self.num_streams, self.ct), dtype=bool)
        cols, _ = self._simulate(ring, provided, 0, calls, None, 0)
        if not cols:
            raise ConfigError("a voice prompt needs at least 2 frames of codes")
        x = self.lm.embed(mx.array(np.stack(cols, axis=-1).astype(np.int32)))
        return VoicePrompt(embeddings=np.array(x[0].astype(mx.float32)), cache=ring[0].astype(np.int64))


class PromptCache:
    """Generator states after the prompt phases, built once per (voice, prompt, batch size) and
    copied for each new conversation (a copy is no model work), with a fresh RNG key per copy.

    `resolve(voice, prompt) -> (key, inputs)` comes from the owner, which knows what voice and
    prompt names mean (engine.api.PersonaPlex resolves them through engine.persona): `key` is a
    hashable name for the pair, `inputs()` returns (VoicePrompt | None, text prompt token ids) and
    is called only for a pair not cached yet. `state`, `job` and `warm` run MLX (worker thread);
    `ready` does not.

    At most `max_states` states are kept (each holds a whole KV ring: 1.57 GB at the 7B shapes);
    past that the least recently used one is dropped (`evictions` counts them) and built again
    when asked for. A conversation's copy never depends on the cache keeping its state.
    """

    def __init__(self, gen: LmGen, resolve: Callable, max_states: int = 8):
        if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
            raise ConfigError(f"max_states={max_states!r} must be an int >= 1")
        self.gen, self.resolve, self.max_states = gen, resolve, max_states
        self._states: OrderedDict = OrderedDict()
        self._warmed: set = set()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._states)

    def ready(self, voice, prompt, batch_size: int = 1) -> bool:
        """Whether this pair's state is cached (a new conversation then costs no model work)."""
        return (self.resolve(voice, prompt)[0], batch_size) in self._states

    def state(self, voice, prompt, seed: int | None, batch_size: int = 1, warm: bool = True) -> GenState:
        """A new conversation's state after the prompt phases; `seed` fixes its sampling (None:
        random). `warm`: also trace/JIT the live B=`batch_size` step once per pair (the server's
        batch never runs it)."""
        job = self.job(voice, prompt, seed, batch_size, warm)
        while True:
            try:
                next(job)
            except StopIteration as done:
                return done.value

    def job(self, voice, prompt, seed: int | None, batch_size: int = 1, warm: bool = True,
            max_chunk: int | None = None):
        """`state` as a generator that yields between units of model work (prefill chunks of at
        most `max_chunk` positions, the warm-up) and returns the state, so a caller with deadlines
        (the server's loop) can fit a new prompt into the slack between its steps."""
        name, inputs = self.resolve(voice, prompt)
        key = (name, batch_size)
        if key not in self._states:
            voice_prompt, tokens = inputs()
            state = self.gen.new_state(batch_size, seed=0)
            yield from self.gen.prompt_steps(state, voice=voice_prompt, text_tokens=tokens, max_chunk=max_chunk)
            mx.eval(state.tokens)
            self._states[key] = state
            while len(self._states) > self.max_states:
                old, _ = self._states.popitem(last=False)
                self._warmed.discard(old)
                self.evictions += 1
        self._states.move_to_end(key)
        entry = self._states[key]          # kept here: another job may evict it while this one waits
        if warm and key not in self._warmed:
            yield
            # Trace/JIT the live step now (on a copy), not during the conversation's first frames:
            # on MLX CUDA a kernel's first use can cost seconds.
            self.gen.warmup(entry)
            if key in self._states:
                self._warmed.add(key)
        state = entry.copy()
        state.key = mx.random.key(secrets.randbits(32) if seed is None else int(seed))
        return state
