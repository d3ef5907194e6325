"""Mimi's streaming encoder step as ONE persistent CUDA kernel (MLX CUDA backend, batch 1, float32).

The compiled MLX encode step is ~290 kernel launches; on MLX CUDA the host spends ~14 us on each,
so one 80 ms frame's encode costs ~4 ms of host time for well under 1 ms of GPU work, and it sits
on the critical path of every live frame (the LM step cannot start before the codes exist). Here
the whole step (SEANet convolutions, the 8-layer transformer on the frame's 2 tokens, the
downsampling conv and the split residual VQ) is one `mx.fast.cuda_kernel` launch walking ~60
stages with the software grid barrier of cuda/common.cuh.

- The kernel source is generated for the model's layer plan (`_Plan`): buffer offsets and layer
  shapes are compile-time constants, the weights one packed float32 buffer.
- State (`FusedEncState`): one float32 buffer the kernel updates IN PLACE (conv tails, the
  transformer's K/V as a 256-slot ring per layer, the position offset, the first-frame flag), so
  a step allocates nothing but its outputs. It converts to and from the fixed-shape MLX state
  (`Mimi.make_state(mode="compiled")`): the fused and MLX steps can alternate on one stream.
- Same arithmetic as the MLX step in float32 (summation order differs): tests/test_fused.py
  compares latents and codes on the GPU.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mlx.core as mx

from .fused import NT, FusedUnavailable, cuda_backend, sm_count

_SRC = Path(__file__).with_name("cuda")
RING = 256                # K/V ring slots per layer (>= context + tokens per frame)


def _align(n: int) -> int:
    return (n + 3) // 4 * 4


class _Layout:
    """Offsets (in floats, 16-byte aligned) of named regions in one flat buffer."""

    def __init__(self, start: int = 0):
        self.size = start
        self.at: dict[str, int] = {}

    def add(self, name: str, n: int) -> int:
        self.at[name] = self.size
        self.size = _align(self.size + int(n))
        return self.at[name]


@dataclass
class _Conv:
    mod: object          # mimi_modules.Conv1d
    cin: int
    cout: int
    k: int
    stride: int
    tail: int
    tin: int             # input frames per step
    elu_in: bool         # ELU applied to the input (by the stage that writes P)
    resid: int | None    # node whose raw output is added (ResBlock skip)
    raw: bool = False    # raw output kept (a later skip reads it)

    @property
    def tout(self) -> int:
        return self.tin // self.stride

    @property
    def L(self) -> int:
        return self.k * self.cin


class FusedEncState:
    """The fused encoder's streaming state: `buf` (float32) is written in place by the kernel, so a
    state owns its buffer exclusively (never share it between streams)."""

    def __init__(self, buf: mx.array, frames: int, owner: "FusedMimiEncoder"):
        self.buf, self.frames, self.owner = buf, frames, owner

    def to_flat(self) -> list:
        return self.owner.state_to_flat(self)


class FusedMimiEncoder:
    """Packs a `Mimi`'s encoder side and runs its streaming step as one kernel."""

    def __init__(self, mimi, blocks: int | None = None, check: bool = True):
        reason = self.unsupported(mimi) if check else None
        if reason:
            raise FusedUnavailable(reason)
        self.mimi = mimi
        self.blocks = int(blocks or sm_count() or 64)
        cfg = mimi.config
        self.frame = cfg.frame_size
        tr = mimi.encoder_transformer
        att = tr.layers[0].self_attn
        self.D = att.in_proj.weight.shape[1]
        self.H = att._heads
        self.HD = self.D // self.H
        self.CTX = att._context
        self.FF = tr.layers[0].linear1.weight.shape[0]
        self.NL = len(tr.layers)
        self.NTOK = self.frame // int(np.prod(cfg.ratios))
        self.eps = float(tr.layers[0].norm1.eps)
        self.base = float(att._base)
        q = mimi.quantizer
        self.QD = q.rvq_first.input_proj.weight.shape[0]
        self.BINS = q.rvq_first.embedding.shape[1]
        self.K = mimi.num_codebooks
        self.NS = 1
        self.NA = self.K - 1
        self._plan()
        self._pack()
        self._source()

    # ------------------------------------------------------------------ checks
    @staticmethod
    def unsupported(mimi) -> str | None:
        if not cuda_backend():
            return "the fused Mimi step needs MLX's CUDA backend with the GPU as default device"
        if mimi.dtype != mx.float32:
            return f"Mimi dtype {mimi.dtype} (the fused encoder runs float32)"
        for m in mimi.encoder.model:
            convs = [m] if hasattr(m, "_stride") else [b for b in getattr(m, "block", []) if hasattr(b, "_stride")]
            for c in convs:
                if c._dilation != 1:
                    return "a SEANet conv with dilation > 1"
        tr = mimi.encoder_transformer
        att = tr.layers[0].self_attn
        d = att.in_proj.weight.shape[1]
        if d % 128 or (d // att._heads) % 2 or att._context + 4 > RING:
            return f"transformer width {d} / context {att._context} outside the kernel's limits"
        if mimi.quantizer.rvq_first.embedding.shape[0] != 1:
            return "more than one semantic codebook"
        if mimi.quantizer.rvq_first.input_proj.weight.shape[0] % 128:
            return "quantizer dimension not a multiple of 128"
        if mimi.config.frame_size // int(np.prod(mimi.config.ratios)) != 2:
            return "the kernel expects 2 transformer tokens per frame"
        return None

    # ------------------------------------------------------------------ plan
    def _plan(self):
        """The SEANet encoder as a list of convs (ELUs folded into the next conv's input)."""
        nodes: list[_Conv] = []
        elu_next = False
        t = self.frame
        cin = self.mimi.config.channels

        def conv(mod, elu, resid):
            cout, k, ci = mod.weight.shape
            n = _Conv(mod, ci, cout, k, mod._stride, mod._tail, t, elu, resid)
            nodes.append(n)
            return n

        for m in self.mimi.encoder.model:
            kind = type(m).__name__
            if kind == "ELU":
                elu_next = True
            elif kind == "Conv1d":
                n = conv(m, elu_next, None)
                elu_next = False
                t = n.tout
            elif kind == "ResBlock":
                if not nodes:
                    raise FusedUnavailable("a SEANet that starts with a residual block")
                skip = len(nodes) - 1
                nodes[skip].raw = True
                a = conv(m.block[1], True, None)
                conv(m.block[3], True, skip)
                if a.stride != 1 or m.block[3]._stride != 1:
                    raise FusedUnavailable("a strided conv inside a residual block")
            else:
                raise FusedUnavailable(f"unknown SEANet layer {kind}")
        if nodes[0].elu_in or nodes[0].cin != cin:
            raise FusedUnavailable("unexpected first SEANet conv")
        if nodes[-1].cout != self.D or nodes[-1].tout != self.NTOK:
            raise FusedUnavailable("SEANet output does not match the transformer")
        self.nodes = nodes
        ds = self.mimi.downsample
        self.ds_k, self.ds_stride, self.ds_tail = ds.weight.shape[1], ds._stride, ds._tail
        if self.ds_tail + self.NTOK != self.ds_k or self.NTOK // self.ds_stride != 1:
            raise FusedUnavailable("the downsampling conv must emit one latent per frame")

    # ------------------------------------------------------------------ packing
    def _pack(self):
        mimi, tr = self.mimi, self.mimi.encoder_transformer
        parts: list = []
        W = _Layout()

        def put(name, a):
            a = mx.array(a, mx.float32) if not isinstance(a, mx.array) else a.astype(mx.float32)
            a = a.reshape(-1)
            off = W.add(name, a.size)
            pad = W.size - off - a.size
            parts.append(a)
            if pad:
                parts.append(mx.zeros((pad,), mx.float32))
            return off

        for i, n in enumerate(self.nodes):
            put(f"w{i}", n.mod.weight)
            if "bias" in n.mod:
                put(f"b{i}", n.mod.bias)
        for kind, get in (("qkv", lambda l: l.self_attn.in_proj.weight), ("out", lambda l: l.self_attn.out_proj.weight),
                          ("l1", lambda l: l.linear1.weight), ("l2", lambda l: l.linear2.weight),
                          ("n1w", lambda l: l.norm1.weight), ("n1b", lambda l: l.norm1.bias),
                          ("n2w", lambda l: l.norm2.weight), ("n2b", lambda l: l.norm2.bias),
                          ("ls1", lambda l: l.layer_scale_1.scale), ("ls2", lambda l: l.layer_scale_2.scale)):
            put(kind, mx.stack([get(l) for l in tr.layers]))
        put("ds", mimi.downsample.weight)
        q = mimi.quantizer
        put("rin", mx.concatenate([q.rvq_first.input_proj.weight, q.rvq_rest.input_proj.weight], axis=0))
        emb = [q.rvq_first.embedding[0]] + [q.rvq_rest.embedding[i] for i in range(self.NA)]
        put("emb", mx.stack(emb))
        put("norm", mx.stack([mx.sum(e * e, axis=-1) for e in emb]))
        self.w = mx.concatenate(parts)
        mx.eval(self.w)
        self.W = W

        # State buffer: [offset (int32 bits), first flag, pad] tails..., ds tail, K/V rings.
        S = _Layout(4)
        for i, n in enumerate(self.nodes):
            if n.tail:
                S.add(f"t{i}", n.tail * n.cin)
        S.add("dst", self.ds_tail * self.D)
        S.add("kv", self.NL * 2 * RING * self.D)
        self.S = S

        # Scratch: barrier words, padded conv inputs P_i, raw outputs R_i, transformer buffers, RVQ.
        X = _Layout(32)
        for i, n in enumerate(self.nodes):
            X.add(f"P{i}", (n.tail + n.tin) * n.cin)
            if n.raw:
                X.add(f"R{i}", n.tout * n.cout)
        X.add("xres", self.NTOK * self.D)
        X.add("qb", self.NTOK * self.D)
        X.add("ao", self.NTOK * self.D)
        X.add("hid", self.NTOK * self.FF)
        X.add("rq", 2 * self.QD)
        for lvl in range(max(self.NA, 1) + 1):
            X.add(f"pv{lvl}", self.blocks)
            X.add(f"pi{lvl}", self.blocks)
        self.X = X

    # ------------------------------------------------------------------ source
    def _source(self):
        W, S, X = self.W.at, self.S.at, self.X.at
        nodes = self.nodes
        L = []
        a = L.append
        a("using namespace ppx;")
        a("extern __shared__ float sm[];")
        a("__shared__ float red[32];")
        a("unsigned int* sync = reinterpret_cast<unsigned int*>(scratch);")
        a("unsigned int epoch = 0;")
        a("float* st = const_cast<float*>(state);")
        a("const int off = reinterpret_cast<const int*>(state)[0];")
        a("const bool first = state[1] != 0.f;")
        a("float* X = scratch;")
        # stage 0: this frame's pcm and every conv tail into the padded inputs
        n0 = nodes[0]
        a(f"gcopy(X + {X['P0'] + n0.tail * n0.cin}, pcm, {self.frame * n0.cin});")
        for i, n in enumerate(nodes):
            if n.tail:
                a(f"gcopy(X + {X[f'P{i}']}, st + {S[f't{i}']}, {n.tail * n.cin});")
        a("grid_sync(sync, epoch);")
        for i, n in enumerate(nodes):
            bias = f"w + {W[f'b{i}']}" if f"b{i}" in W else "nullptr"
            resid = f"X + {X[f'R{n.resid}']}" if n.resid is not None else "nullptr"
            raw = f"X + {X[f'R{i}']}" if n.raw else "nullptr"
            if i + 1 < len(nodes):
                nx = nodes[i + 1]
                nxt, elu = f"X + {X[f'P{i + 1}'] + nx.tail * nx.cin}", "true" if nx.elu_in else "false"
            else:
                nxt, elu = f"X + {X['xres']}", "false"
            vec = n.cin % 4 == 0
            warp = vec and (n.L >= 1024 or n.tout * n.cout < 16384)
            a(f"conv_stage<{'true' if warp else 'false'}, {'true' if vec else 'false'}>(w + {W[f'w{i}']}, "
              f"X + {X[f'P{i}']}, {n.L}, {n.stride * n.cin}, {n.tout}, {n.cout}, "
              f"ConvOut{{{bias}, {resid}, {raw}, {nxt}, {elu}, {n.cout}}});")
            a("grid_sync(sync, epoch);")
        D, H, HD, FF, NTOK = self.D, self.H, self.HD, self.FF, self.NTOK
        a(f"constexpr int D = {D}, H = {H}, HD = {HD}, FF = {FF}, NTOK = {NTOK}, CTX = {self.CTX}, RING = {RING};")
        a(f"const float eps = {self.eps!r}f, log2_base = {float(np.log2(self.base))!r}f;")
        a(f"float* xres = X + {X['xres']}; float* qb = X + {X['qb']}; float* ao = X + {X['ao']}; "
          f"float* hid = X + {X['hid']};")
        a(f"float* kv = st + {S['kv']};")
        a(f"const int NL = {self.NL};")
        a("const float " + ", ".join(f"*W{k} = w + {W[k]}" for k in
                                     ("qkv", "out", "l1", "l2", "n1w", "n1b", "n2w", "n2b", "ls1", "ls2")) + ";")
        a((_SRC / "mimi_enc.cu").read_text())
        # downsampling conv: one output from [tail | 2 transformer tokens] (replicate on the first frame)
        a(f"""{{
  const float* dsw = w + {W['ds']};
  const float* dtail = st + {S['dst']};
  const int lane = threadIdx.x & 31;
  for (int co = gwarp(); co < D; co += gwarps()) {{
    float acc = 0.f;
    for (int r = lane; r < {self.ds_k} * D; r += 32) {{
      const int row = r / D, c = r % D;
      const float x = row < {self.ds_tail} ? (first ? __ldcg(xres + c) : __ldg(dtail + row * D + c))
                                          : __ldcg(xres + (row - {self.ds_tail}) * D + c);
      acc = fmaf(__ldg(dsw + (size_t)co * {self.ds_k} * D + r), x, acc);
    }}
    acc = warp_sum(acc);
    if (lane == 0) lat[co] = acc;
  }}
}}""")
        a("grid_sync(sync, epoch);")
        # new state: conv tails from the padded inputs, ds tail, offset, first flag
        for i, n in enumerate(nodes):
            if n.tail:
                a(f"gcopy(st + {S[f't{i}']}, X + {X[f'P{i}'] + n.tin * n.cin}, {n.tail * n.cin});")
        a(f"gcopy(st + {S['dst']}, xres + {(NTOK - self.ds_tail) * D}, {self.ds_tail * D});")
        a(f"if (gthread() == 0) {{ reinterpret_cast<int*>(st)[0] = off + NTOK; st[1] = 0.f; }}")
        # residual VQ: input projections, then one grid pass per level
        QD, BINS = self.QD, self.BINS
        a(f"""{{
  float* rq = X + {X['rq']};
  for (int i = threadIdx.x; i < D; i += blockDim.x) sm[i] = __ldcg(lat + i);
  __syncthreads();
  mv_tok<1, 1>(w + {W['rin']}, {2 * QD}, D, sm, [&](int row, float (&acc)[1][1]) {{
    if ((threadIdx.x & 31) == 0) __stcg(rq + row, acc[0][0]);
  }});
  grid_sync(sync, epoch);
  float* rs = sm;
  float* ra = sm + {QD};
  for (int i = threadIdx.x; i < {2 * QD}; i += blockDim.x) sm[i] = __ldcg(rq + i);
  __syncthreads();
  const float* emb = w + {W['emb']};
  const float* nrm = w + {W['norm']};""")
        a(f"  vq_scores<{QD}>(emb, nrm, {BINS}, rs, X + {X['pv0']}, reinterpret_cast<int*>(X + {X['pi0']}));")
        for lvl in range(self.NA):
            e = f"emb + {(1 + lvl) * BINS * QD}"
            nrm = f"nrm + {(1 + lvl) * BINS}"
            pv, pi = X[f"pv{lvl + 1}"], X[f"pi{lvl + 1}"]
            a(f"  vq_scores<{QD}>({e}, {nrm}, {BINS}, ra, X + {pv}, reinterpret_cast<int*>(X + {pi}));")
            a("  grid_sync(sync, epoch);")
            if lvl == 0:
                a(f"  {{ const int c = vq_pick(X + {X['pv0']}, reinterpret_cast<const int*>(X + {X['pi0']}));"
                  f" if (gthread() == 0) codes[0] = c; }}")
            a(f"  {{ const int c = vq_pick(X + {pv}, reinterpret_cast<const int*>(X + {pi}));"
              f" if (gthread() == 0) codes[{1 + lvl}] = c;")
            if lvl + 1 < self.NA:
                a(f"    const float* ec = {e} + (size_t)c * {QD};")
                a(f"    for (int i = threadIdx.x; i < {QD}; i += blockDim.x) ra[i] -= __ldg(ec + i);")
                a("    __syncthreads();")
            a("  }")
        if self.NA == 0:
            a("  grid_sync(sync, epoch);")
            a(f"  {{ const int c = vq_pick(X + {X['pv0']}, reinterpret_cast<const int*>(X + {X['pi0']}));"
              f" if (gthread() == 0) codes[0] = c; }}")
        a("}")
        body = "\n".join(L)
        hdr = (_SRC / "common.cuh").read_text() + "\n" + (_SRC / "mimi.cuh").read_text()
        tag = hashlib.sha1((hdr + body).encode()).hexdigest()[:12]
        smem = 4 * max(NTOK * FF, NTOK * D, 2 * QD, HD + self.CTX + 8 + (NT // HD) * HD)
        self.smem, self.body, self.header, self.kernel_name = smem, body, hdr, f"pp_mimi_enc_{tag}"
        self._kernel = None

    def _build(self):
        if self._kernel is None:
            self._kernel = mx.fast.cuda_kernel(
                name=self.kernel_name, input_names=["pcm", "state", "w"],
                output_names=["codes", "lat", "scratch"], source=self.body, header=self.header,
                shared_memory=self.smem)
        return self._kernel

    # ------------------------------------------------------------------ state
    def init_state(self) -> FusedEncState:
        buf = mx.zeros((self.S.size,), mx.float32)
        buf[1] = 1.0                                   # first frame: replicate padding
        mx.eval(buf)
        return FusedEncState(buf, 0, self)

    def state_from_flat(self, flat: list, frames: int) -> FusedEncState:
        """From a fixed-shape MLX encoder state (`MimiState.enc_flat`, batch 1)."""
        mimi = self.mimi
        spec = mimi._spec("enc")
        by = {}
        tails = []
        for (name, kind), arr in zip(spec, flat):
            if kind == "tail":
                tails.append(arr)
            by.setdefault(kind, []).append(arr)
        first = float(np.array(flat[0]).reshape(-1)[0])
        off = int(np.array(by["offset"][0]).reshape(-1)[0])
        buf = np.zeros(self.S.size, np.float32)
        buf[:1] = np.array([off], np.int32).view(np.float32)
        buf[1] = first
        conv_tails = [i for i, n in enumerate(self.nodes) if n.tail]
        if len(tails) != len(conv_tails) + 1:
            raise FusedUnavailable("encoder state layout does not match the fused plan")
        for i, arr in zip(conv_tails, tails[:-1]):
            o = self.S.at[f"t{i}"]
            a = np.array(arr, np.float32).reshape(-1)
            buf[o:o + a.size] = a
        a = np.array(tails[-1], np.float32).reshape(-1)
        buf[self.S.at["dst"]:self.S.at["dst"] + a.size] = a
        kv = buf[self.S.at["kv"]:self.S.at["kv"] + self.NL * 2 * RING * self.D].reshape(self.NL, 2, RING, self.D)
        w = self.CTX - 1
        slots = (off - w + np.arange(w)) % RING
        for l, (k, v) in enumerate(zip(by["k"], by["v"])):
            for j, arr in enumerate((k, v)):
                rows = np.array(arr, np.float32)[0].transpose(1, 0, 2).reshape(w, self.D)   # (W, H*hd)
                kv[l, j, slots] = rows
        out = mx.array(buf)
        mx.eval(out)
        return FusedEncState(out, frames, self)

    def state_to_flat(self, st: FusedEncState) -> list:
        """The fixed-shape MLX encoder state of the same stream."""
        buf = np.array(st.buf)
        off = int(buf[:1].view(np.int32)[0])
        first = buf[1] != 0
        out = [mx.array(np.full((1, 1, 1), first))]
        spec = self.mimi._spec("enc")[1:]
        conv_tails = [i for i, n in enumerate(self.nodes) if n.tail]
        ti = 0
        kv = buf[self.S.at["kv"]:self.S.at["kv"] + self.NL * 2 * RING * self.D].reshape(self.NL, 2, RING, self.D)
        w = self.CTX - 1
        pos = off - w + np.arange(w)
        slots = pos % RING
        li = 0
        pending = None
        for name, kind in spec:
            if kind == "tail":
                if ti < len(conv_tails):
                    n = self.nodes[conv_tails[ti]]
                    o = self.S.at[f"t{conv_tails[ti]}"]
                    out.append(mx.array(buf[o:o + n.tail * n.cin].reshape(1, n.tail, n.cin)))
                else:
                    o = self.S.at["dst"]
                    out.append(mx.array(buf[o:o + self.ds_tail * self.D].reshape(1, self.ds_tail, self.D)))
                ti += 1
            elif kind == "offset":
                out.append(mx.array([off], mx.int32))
            elif kind in ("k", "v"):
                j = 0 if kind == "k" else 1
                rows = kv[li, j, slots].copy()
                rows[pos < 0] = 0.0
                out.append(mx.array(rows.reshape(w, self.H, self.HD).transpose(1, 0, 2)[None]))
                if kind == "v":
                    li += 1
        return out

    # ------------------------------------------------------------------ step
    def step(self, pcm: mx.array, st: FusedEncState):
        """pcm (frame,) float32 -> (codes (K,) int32, latent (D,) float32, scratch). Updates
        `st.buf` IN PLACE (the caller must hold no other reference to it)."""
        codes, lat, scr = self._build()(
            inputs=[pcm.reshape(-1).astype(mx.float32), st.buf, self.w],
            grid=(self.blocks * NT, 1, 1), threadgroup=(NT, 1, 1),
            output_shapes=[(self.K,), (self.D,), (self.X.size,)],
            output_dtypes=[mx.int32, mx.float32, mx.float32], init_value=0.0)
        st.buf = mx.depends(st.buf, codes) if hasattr(mx, "depends") else st.buf
        st.frames += 1
        return codes, lat, scr

    @staticmethod
    def barrier_error(scratch: mx.array) -> bool:
        return bool(scratch[1:2].view(mx.uint32).item() != 0)
