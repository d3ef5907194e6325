"""The live LM step as two persistent CUDA kernels (MLX CUDA backend, batch 1).

MLX on CUDA is host-bound for this model: a compiled LM step is still ~1100 kernel launches at
~7 us of host time each, while the GPU work is 1-3 ms (docs/performance.md). Here one step is two
launches of `mx.fast.cuda_kernel`:

- `temporal`: 32 layers of norm + QKV + RoPE, attention over the KV ring, out_proj, SiLU gating,
  then out_norm and the text head. Returns h and the text logits; this step's K/V rows go straight
  into the ring, in place (see `FusedCache` for why and what that requires of the caller).
- `depformer`: depformer_in for every codebook, then per codebook 6 layers, its head and its
  token sampled on the GPU (top-k + the same Gumbel noise the MLX path draws, so the draws match).

Each kernel runs one block per SM and walks its stages with a software grid barrier (see
cuda/common.cuh). Weights stay in MLX's formats (dense or affine-quantized); `FusedLM` only stacks
each kind of matrix over layers (the modules keep views of the stacked arrays, no extra memory).
Text sampling, the token ring and the KV write stay in MLX (a few dozen ops).

`depformer_rows` is the depformer's walk for B conversations in one launch (the batched server's
fused path, engine/server/batch.py): per-row sampling parameters and forced codebooks. The batched
server's temporal step is MLX's graph with the ring attention kernels (ring_attn.py).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

_SRC = Path(__file__).with_name("cuda")
NT = 512                 # threads per block (the kernels assume a multiple of 32, <= 1024)
_SMEM_LIMIT = 200 * 1024


class FusedUnavailable(ConfigError):
    """The fused CUDA step cannot run here (no CUDA backend, or an unsupported model shape)."""


@functools.lru_cache(maxsize=1)
def sm_count() -> int | None:
    """Streaming multiprocessors of CUDA device 0 (libcuda through ctypes), None if unknown."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        dev, val = ctypes.c_int(), ctypes.c_int()
        if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(dev), 0):
            return None
        if lib.cuDeviceGetAttribute(ctypes.byref(val), 16, dev):   # MULTIPROCESSOR_COUNT
            return None
        return int(val.value)
    return None


def cuda_backend() -> bool:
    try:
        return bool(mx.cuda.is_available()) and mx.default_device().type == mx.gpu
    except AttributeError:
        return False


@dataclass
class FusedCache:
    """Temporal KV ring of one conversation in the fused layout: kv (L, 2, H, context, head_dim),
    pos (context,) absolute position per slot (-1 empty), offset () the next position.

    The temporal kernel writes each step's K/V rows into `kv` in place (an MLX slice update would
    copy the 1.5 GB ring whenever anything else still referenced it), so a FusedCache owns its `kv`
    exclusively: `copy()` duplicates it, `from_lm_cache` stacks a new one."""

    kv: mx.array
    pos: mx.array
    offset: mx.array
    step: int = 0
    batch_size: int = 1

    @classmethod
    def from_lm_cache(cls, cache) -> "FusedCache":
        if cache.batch_size != 1:
            raise FusedUnavailable("the fused step runs batch 1")
        if cache.keys[0].dtype == mx.uint8:
            raise FusedUnavailable("the fused step keeps its KV in the model's dtype, not fp8")
        kv = mx.stack([mx.stack([k[0], v[0]]) for k, v in zip(cache.keys, cache.values)])
        return cls(kv, cache.pos[0], cache.offset.reshape(()), cache.step)

    def to_lm_cache(self):
        from .lm import LmCache
        L = self.kv.shape[0]
        return LmCache([self.kv[i, 0][None] for i in range(L)], [self.kv[i, 1][None] for i in range(L)],
                       self.pos[None], self.offset.reshape(1), np.array([self.step], np.int64))

    def copy(self) -> "FusedCache":
        """An independent copy: the fused kernel writes `kv` in place, so it is never shared."""
        return FusedCache(self.kv * 1, self.pos, self.offset, self.step)

    def arrays(self) -> list:
        return [self.kv, self.pos, self.offset]

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


def _xs(n: int) -> int:
    """Shared-memory floats of an n-vector in the kernels' padded layout (cuda/common.cuh `xs_size`)."""
    return n + (n + 31) // 32 * 4


def _bits(mod) -> int:
    if mod.bits is not None:
        return mod.bits
    return 32 if mod.weight.dtype == mx.float32 else 16


class FusedLM:
    """Packs an `engine.models.lm.LM` for the fused kernels and runs them."""

    def __init__(self, lm, blocks: int | None = None):
        reason = self.unsupported(lm)
        if reason:
            raise FusedUnavailable(reason)
        self.lm = lm
        c = self.c = lm.config
        self.dtype = lm.dtype
        self.blocks = int(blocks or sm_count() or 64)
        self.group_size = lm.quant_plan.group_size if lm.quant_plan is not None else 64
        self._dummy = mx.zeros((1,), lm.dtype)
        self.nch = max(1, self.blocks // c.num_heads)      # attention chunks per head
        self._pack()
        hdr = (_SRC / "common.cuh").read_text()
        self._tk = mx.fast.cuda_kernel(
            name="pp_temporal", source=(_SRC / "temporal.cu").read_text(), header=hdr,
            input_names=["x0", "kv", "pos", "offs", "wq", "sq", "bq", "wo", "so", "bo", "wi", "si", "bi_",
                         "wd", "sd", "bd", "n1", "n2", "onorm", "wt", "st", "bt", "fp"],
            output_names=["h", "logits", "scratch"],
            shared_memory=self._smem_temporal())
        self._dk = mx.fast.cuda_kernel(
            name="pp_depformer", source=(_SRC / "depformer.cu").read_text(), header=hdr,
            input_names=["h", "ttok", "noise", "win", "sin_", "bin", "tew", "tes", "teb", "ew", "es", "eb",
                         "qw", "qs", "qb", "ow", "os", "ob", "iw", "is", "ib", "dw", "ds", "db",
                         "dn1", "dn2", "lw", "ls", "lb", "fp"],
            output_names=["toks", "scratch"],
            shared_memory=self._smem_depformer())
        self._tfp = mx.array([c.norm_eps, c.max_period], mx.float32)
        self._dfp = mx.array([c.norm_eps], mx.float32)
        self._dkr = None           # the batched depformer (`depformer_rows`), built on first use
        self._nb, self._rows_nt = 0, NT

    # ------------------------------------------------------------------ checks
    @staticmethod
    def unsupported(lm) -> str | None:
        """Why `lm` cannot use the fused kernels here, or None."""
        if not cuda_backend():
            return "the fused LM step needs MLX's CUDA backend with the GPU as default device"
        c = lm.config
        if lm.dtype not in (mx.float32, mx.bfloat16, mx.float16):
            return f"model dtype {lm.dtype} (supported: float32, bfloat16, float16)"
        for name, v in (("dim", c.dim), ("depformer_dim", c.depformer_dim), ("card", c.card),
                        ("text logits", c.text_out), ("hidden", c.hidden), ("depformer hidden", c.depformer_hidden)):
            if v % 4:
                return f"{name}={v} is not a multiple of 4"
        if c.head_dim % 32:
            return f"head_dim={c.head_dim} is not a multiple of 32"
        if c.dep_q > 16:
            return f"dep_q={c.dep_q} > 16"
        widest = max(c.dim, c.hidden, c.depformer_hidden)
        if 4 * _xs(widest) > _SMEM_LIMIT:
            return f"a {widest}-wide vector does not fit the kernels' shared memory"
        return None

    def _smem_temporal(self) -> int:
        c = self.c
        floats = max(_xs(c.dim), _xs(c.hidden), c.head_dim + 64 + (NT // 32) * c.head_dim)
        return 4 * floats

    def _smem_depformer(self) -> int:
        c = self.c
        floats = max(_xs(c.dim), _xs(c.depformer_hidden), _xs(c.depformer_dim) + c.depformer_num_heads * 16,
                     self._nsort)
        return 4 * floats

    @property
    def _nsort(self) -> int:
        return 1 << max(0, (self.c.card - 1).bit_length())

    # ------------------------------------------------------------------ packing
    def _stack(self, mods):
        """Stack one kind of matrix over layers; the modules keep views of the stacked arrays."""
        q = mods[0].bits is not None
        w = mx.stack([m.weight for m in mods])
        s = mx.stack([m.scales for m in mods]) if q else self._dummy
        b = mx.stack([m.biases for m in mods]) if q else self._dummy
        mx.eval(w, s, b)
        views = []
        for i, m in enumerate(mods):
            m.weight = w[i]
            if q:
                m.scales, m.biases = s[i], b[i]
            views += [m.weight, m.scales, m.biases] if q else [m.weight]
        # Evaluated here, once: a view left lazy keeps its slice op, and every MLX graph that reads
        # the module (compiled or not) would run that slice again on every call. At 32 rows of the
        # server's MLX depformer that cost 20 ms of host time per tick (docs/performance.md).
        mx.eval(views)
        return w, s, b

    @staticmethod
    def _own(mod):
        q = mod.bits is not None
        return mod.weight, (mod.scales if q else None), (mod.biases if q else None)

    def _pack(self):
        lm = self.lm
        L = lm.transformer.layers
        D = lm.depformer.layers
        self.t = {k: self._stack([getattr(getattr(x, a), n) for x in L])
                  for k, a, n in (("q", "self_attn", "in_proj"), ("o", "self_attn", "out_proj"),
                                  ("i", "gating", "linear_in"), ("d", "gating", "linear_out"))}
        self.t_norms = (mx.stack([x.norm1.weight for x in L]), mx.stack([x.norm2.weight for x in L]))
        self.d = {k: self._stack([getattr(getattr(x, a), n) for x in D])
                  for k, a, n in (("q", "self_attn", "in_proj"), ("o", "self_attn", "out_proj"),
                                  ("i", "gating", "linear_in"), ("d", "gating", "linear_out"))}
        self.d_norms = (mx.stack([x.norm1.weight for x in D]), mx.stack([x.norm2.weight for x in D]))
        mx.eval(*self.t_norms, *self.d_norms)
        self.bt = _bits(L[0].self_attn.in_proj)
        self.bd = _bits(D[0].self_attn.in_proj)
        if _bits(lm.depformer_in) != self.bd:
            raise FusedUnavailable("depformer_in and the depformer layers must share one quantization")
        self.bh = _bits(lm.text_linear)
        self.bhd = _bits(lm.linears)
        self.be = _bits(lm.depformer_emb)
        if _bits(lm.depformer_text_emb) != self.be:
            raise FusedUnavailable("the depformer's text and audio tables must share one quantization")

    def _qsb(self, mod):
        w, s, b = self._own(mod)
        return [w, self._dummy if s is None else s, self._dummy if b is None else b]

    # ------------------------------------------------------------------ kernels
    def temporal(self, x0: mx.array, cache: FusedCache):
        """x0 (dim,) summed input embedding -> (h (dim,) float32, text logits (text_out,) float32,
        scratch). Writes this step's K/V rows into `cache.kv` IN PLACE (slot offset % context); call
        `advance` for the cache of the next step."""
        c, lm = self.c, self.lm
        t = self.t
        inputs = [x0.astype(self.dtype), cache.kv, cache.pos, cache.offset.reshape(1),
                  *t["q"], *t["o"], *t["i"], *t["d"], *self.t_norms, lm.out_norm.weight,
                  *self._qsb(lm.text_linear), self._tfp]
        H, hd = c.num_heads, c.head_dim
        scratch = 32 + 4 * c.dim + H * self.nch * (hd + 2) + c.hidden
        h, logits, scr = self._tk(
            inputs=inputs,
            template=[("T", self.dtype), ("D", c.dim), ("H", H), ("HD", hd), ("L", c.num_layers),
                      ("C", c.context), ("HID", c.hidden), ("TXT", c.text_out), ("BT", self.bt),
                      ("BH", self.bh), ("GS", self.group_size), ("NCH", self.nch), ("NT", NT)],
            grid=(self.blocks * NT, 1, 1), threadgroup=(NT, 1, 1),
            output_shapes=[(c.dim,), (c.text_out,), (scratch,)],
            output_dtypes=[mx.float32, mx.float32, mx.float32],
            init_value=0.0)
        return h, logits, scr

    @staticmethod
    def advance(cache: FusedCache, after: mx.array) -> FusedCache:
        """The cache after a `temporal` call: pos and offset updated; `after` (an output of that
        call) orders the next step's reads after the in-place K/V write."""
        C = cache.kv.shape[3]
        slot = (cache.offset % C).reshape(1)
        pos = mx.slice_update(cache.pos, cache.offset.reshape(1), slot, axes=(0,))
        kv = mx.depends(cache.kv, after) if hasattr(mx, "depends") else cache.kv
        return FusedCache(kv, pos, cache.offset + 1, cache.step + 1)

    def depformer(self, h: mx.array, ttok: mx.array, noise: mx.array | None, n_steps: int, sampling):
        """h (dim,) float32, ttok (1,) int32 step 0's input token, noise (n_steps, card) float32
        Gumbel noise (None when greedy) -> tokens (n_steps,) int32 of codebooks 0..n_steps-1."""
        c, lm = self.c, self.lm
        greedy = bool(sampling.greedy or sampling.temp_audio <= 0)
        top_k = int(sampling.top_k_audio)
        d = self.d
        fp = mx.array([c.norm_eps, max(float(sampling.temp_audio), 1e-30)], mx.float32)
        inputs = [h, ttok.astype(mx.int32).reshape(1),
                  mx.zeros((1,), mx.float32) if greedy else noise.reshape(-1).astype(mx.float32),
                  *self._qsb(lm.depformer_in), *self._qsb(lm.depformer_text_emb), *self._qsb(lm.depformer_emb),
                  *d["q"], *d["o"], *d["i"], *d["d"], *self.d_norms, *self._qsb(lm.linears), fp]
        sin = c.depformer_in_slots
        scratch = (32 + (1 if sin == 1 else n_steps) * c.depformer_dim + 2 * c.depformer_dim
                   + 2 * c.depformer_num_layers * n_steps * c.depformer_dim + c.depformer_hidden + c.card)
        toks, scr = self._dk(
            inputs=inputs,
            template=[("T", self.dtype), ("D", c.dim), ("DD", c.depformer_dim), ("NH", c.depformer_num_heads),
                      ("LD", c.depformer_num_layers), ("HIDD", c.depformer_hidden), ("CARD", c.card),
                      ("NS", n_steps), ("NSIN", sin), ("NSL", c.depformer_slots),
                      ("BD", self.bd), ("BE", self.be), ("BHD", self.bhd), ("GS", self.group_size),
                      ("TOPK", top_k if 0 < top_k < c.card else 0), ("GREEDY", greedy),
                      ("NSORT", self._nsort), ("NT", NT)],
            grid=(self.blocks * NT, 1, 1), threadgroup=(NT, 1, 1),
            output_shapes=[(n_steps,), (scratch,)], output_dtypes=[mx.int32, mx.float32],
            init_value=0.0)
        return toks, scr

    # ------------------------------------------------------------------ several conversations
    def _rows_nb(self) -> int:
        """Vectors per chunk of the batched depformer (as many as its shared memory allows, <= 8)."""
        for nb in (8, 4, 2, 1):
            if 4 * self._rows_smem_floats(nb) <= _SMEM_LIMIT:
                return nb
        raise FusedUnavailable("the batched depformer's vectors do not fit the kernels' shared memory")

    def _rows_smem_floats(self, nb: int) -> int:
        c = self.c
        return max(nb * _xs(c.dim), nb * _xs(c.depformer_hidden),
                   nb * (_xs(c.depformer_dim) + c.depformer_num_heads * c.dep_q + c.depformer_dim), self._nsort)

    def depformer_rows(self, h: mx.array, ttok: mx.array, forced: mx.array, temp: mx.array, top_k: mx.array,
                       noise: mx.array | None, n_steps: int):
        """The depformer walk of B conversations in one launch (the batched server).

        h (B, dim) temporal outputs, ttok (B,) step 0's input tokens, forced (B, n_steps) int32: the
        token codebook s takes in row b (the input of step s+1 too), or -1 to sample it; temp (B,)
        float32 (<= 0: greedy row), top_k (B,) int32 (<= 0 or >= card: none), noise (B, n_steps, card)
        float32 Gumbel noise (None when every row is greedy) -> tokens (B, n_steps) int32."""
        B = int(h.shape[0])
        if not 1 <= B <= self.blocks:
            raise FusedUnavailable(f"the batched depformer runs 1..{self.blocks} rows, got {B}")
        if self._dkr is None:
            self.prepare_rows(n_steps)
        return self._rows_call(h, ttok, forced, temp, top_k, noise, n_steps)

    def prepare_rows(self, n_steps: int) -> tuple[int, int]:
        """Pick the batched depformer's launch shape: (threads per block, vectors per chunk). The
        widest that launches on this GPU wins; a launch needing more registers or shared memory than
        an SM has fails with "too many resources", so each candidate runs once on dummy inputs.
        Returns the shape chosen; raises FusedUnavailable when none launches."""
        if self._dkr is not None:
            return self._rows_nt, self._nb
        c = self.c
        errors = []
        best = self._rows_nb()
        for nt, nb in ((NT, best), (NT // 2, best), (NT, best // 2), (NT // 2, best // 2)):
            if nb < 1:
                continue
            self._rows_nt, self._nb = nt, nb
            self._dkr = mx.fast.cuda_kernel(
                name=f"pp_depformer_rows_{nt}_{nb}", source=(_SRC / "depformer_rows.cu").read_text(),
                header=(_SRC / "common.cuh").read_text(),
                input_names=["h", "meta", "ttok", "forced", "temp", "topk", "noise", "win", "sin_", "bin",
                             "tew", "tes", "teb", "ew", "es", "eb", "qw", "qs", "qb", "ow", "os", "ob",
                             "iw", "is", "ib", "dw", "ds", "db", "dn1", "dn2", "lw", "ls", "lb", "fp"],
                output_names=["toks", "scratch"],
                shared_memory=4 * self._rows_smem_floats(nb))
            try:
                toks, scr = self._rows_call(
                    mx.zeros((1, c.dim), mx.float32), mx.zeros((1,), mx.int32), mx.full((1, n_steps), -1, mx.int32),
                    mx.ones((1,), mx.float32), mx.zeros((1,), mx.int32), mx.zeros((1, n_steps, c.card), mx.float32),
                    n_steps)
                mx.eval(toks, scr)
                return nt, nb
            except RuntimeError as e:
                errors.append(f"{nt} threads x {nb} vectors: {e}")
        self._dkr = None
        raise FusedUnavailable("the batched depformer kernel does not launch here: " + "; ".join(errors))

    def _rows_call(self, h, ttok, forced, temp, top_k, noise, n_steps):
        c, lm = self.c, self.lm
        B = int(h.shape[0])
        nt = self._rows_nt
        d = self.d
        inputs = [h.astype(mx.float32), mx.array([B], mx.int32), ttok.astype(mx.int32).reshape(B),
                  forced.astype(mx.int32).reshape(B, n_steps), temp.astype(mx.float32).reshape(B),
                  top_k.astype(mx.int32).reshape(B),
                  mx.zeros((1,), mx.float32) if noise is None else noise.astype(mx.float32),
                  *self._qsb(lm.depformer_in), *self._qsb(lm.depformer_text_emb), *self._qsb(lm.depformer_emb),
                  *d["q"], *d["o"], *d["i"], *d["d"], *self.d_norms, *self._qsb(lm.linears), self._dfp]
        sin = c.depformer_in_slots
        DD = c.depformer_dim
        scratch = (32 + B * (1 if sin == 1 else n_steps) * DD + 2 * B * DD
                   + 2 * B * c.depformer_num_layers * n_steps * DD + B * c.depformer_hidden + B * c.card)
        toks, scr = self._dkr(
            inputs=inputs,
            template=[("T", self.dtype), ("D", c.dim), ("DD", DD), ("NH", c.depformer_num_heads),
                      ("LD", c.depformer_num_layers), ("HIDD", c.depformer_hidden), ("CARD", c.card),
                      ("NS", n_steps), ("NSIN", sin), ("NSL", c.depformer_slots),
                      ("BD", self.bd), ("BE", self.be), ("BHD", self.bhd), ("GS", self.group_size),
                      ("NSORT", self._nsort), ("NT", nt), ("NB", self._nb)],
            grid=(self.blocks * nt, 1, 1), threadgroup=(nt, 1, 1),
            output_shapes=[(B, n_steps), (scratch,)], output_dtypes=[mx.int32, mx.float32],
            init_value=0.0)
        return toks, scr

    @staticmethod
    def barrier_error(scratch: mx.array) -> bool:
        """True when a grid barrier of that launch timed out (its outputs are garbage)."""
        return bool(scratch[1:2].view(mx.uint32).item() != 0)

