// Body of the fused temporal step (one 12.5 Hz position, batch 1). See engine/models/fused.py.
//
// Template constants: T (model dtype), D, H, HD, L, C (context), HID (gating hidden), TXT (text
// logits), BT / BH (bits of the temporal matrices / text head: 4, 8, 16 = bf16/f16, 32 = float),
// GS (quantization group), NCH (attention chunks per head), NT (threads per block).
// Inputs: x0 (D) T, kv (L, 2, H, C, HD) T, pos (C) int32, offs (1) int32, weights stacked over
// layers (wq/sq/bq: in_proj, wo/so/bo: out_proj, wi/si/bi_: linear_in, wd/sd/bd: linear_out),
// n1 / n2 (L, D), onorm (D), wt/st/bt (text head), fp (eps, rope base).
// Outputs: h (D) float, logits (TXT) float, scratch float (zeroed). This step's K/V rows are written
// straight into kv at slot offs % C (the caller owns kv exclusively: see FusedCache); the attention
// takes them from scratch and skips that slot's old contents.
// Each stage ends with a grid barrier; 5 per layer.
using namespace ppx;
constexpr int R = 4;
extern __shared__ float xs[];
__shared__ float red[32];
unsigned int* sync = reinterpret_cast<unsigned int*>(scratch);
float* resid = scratch + 32;
float* qv = resid + D;
float* kc = qv + D;
float* vc = kc + D;
float* part = vc + D;
float* hid = part + H * NCH * (HD + 2);
unsigned int epoch = 0;
const int t = offs[0];
const int slot = t % C;
const float eps = fp[0];
const float log2_base = log2f(fp[1]);
const int lane = threadIdx.x & 31;
constexpr int CH = (C + 1 + NCH - 1) / NCH;   // keys per attention chunk (index C = this step's key)
const float scale = rsqrtf((float)HD);
using ST_T = T;
T* kvw = const_cast<T*>(kv);   // written in place at this step's slot only

for (int l = 0; l < L; ++l) {
  // ---- S1: norm1 + QKV (+ RoPE on q and k), rows in groups of 4 (two rotation pairs)
  {
    const T* w1 = n1 + (size_t)l * D;
    if (l == 0) {
      float ss = 0.f;
      for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float v = tof(x0[i]);
        xs[xi(i)] = v;
        ss += v * v;
        if (blockIdx.x == 0) resid[i] = v;
      }
      const float inv = rsqrtf(block_sum(ss, red) / (float)D + eps);
      for (int i = threadIdx.x; i < D; i += blockDim.x) xs[xi(i)] = rt<T>(xs[xi(i)] * inv * tof(w1[i]));
      __syncthreads();
    } else {
      rms_to_smem<T>(xs, resid, w1, D, eps, red);
    }
    const auto m = mat_at<BT, GS>(wq, sq, bq, (size_t)l * 3 * D, D);
    mv_stage<BT, GS, ST_T, R>(m, 3 * D / R, xs, Consecutive{}, [&](int g, const float* acc) {
      const int row = g * R + lane;
      const int which = row / D, e = row % D;
      float v = rt<T>(sel4(acc, lane));
      if (which < 2) {
        const float other = rt<T>(sel4(acc, lane ^ 1));
        const int d = e % HD;
        const float inv_freq = exp2f(-(float)(d & ~1) / (float)HD * log2_base);
        float sn, cs;
        sincosf((float)t * inv_freq, &sn, &cs);
        v = (d & 1) ? rt<T>(other * sn + v * cs) : rt<T>(v * cs - other * sn);
      }
      if (which == 0) {
        __stcg(qv + e, v);
      } else if (which == 1) {
        __stcg(kc + e, v);
        kvw[(((size_t)(l * 2 + 0) * H + e / HD) * C + slot) * HD + e % HD] = fromf<T>(v);
      } else {
        __stcg(vc + e, v);
        kvw[(((size_t)(l * 2 + 1) * H + e / HD) * C + slot) * HD + e % HD] = fromf<T>(v);
      }
    });
  }
  grid_sync(sync, epoch);

  // ---- S2: attention partials, one (head, chunk of keys) per block iteration (attn_partial)
  {
    const T* kbase = kv + (size_t)(l * 2 + 0) * H * C * HD;
    const T* vbase = kv + (size_t)(l * 2 + 1) * H * C * HD;
    for (int item = blockIdx.x; item < H * NCH; item += gridDim.x) {
      const int head = item / NCH, c = item % NCH;
      const int j0 = c * CH, j1 = min(C + 1, j0 + CH);
      attn_partial<T, HD, C>(xs, part + (size_t)item * (HD + 2), qv + head * HD, kbase + (size_t)head * C * HD,
                             vbase + (size_t)head * C * HD, kc + head * HD, vc + head * HD, pos, slot, j0, j1,
                             scale);
    }
  }
  grid_sync(sync, epoch);

  // ---- S3: combine the partials (every block, redundantly) + out_proj + residual
  {
    for (int e = threadIdx.x; e < D; e += blockDim.x)
      xs[xi(e)] = rt<T>(attn_combine<HD, NCH>(part + (size_t)(e / HD) * NCH * (HD + 2), e % HD));
    __syncthreads();
    mv_stage<BT, GS, ST_T, R>(mat_at<BT, GS>(wo, so, bo, (size_t)l * D, D), D / R, xs, Consecutive{},
                              ResidEpi<T>{resid});
  }
  grid_sync(sync, epoch);

  // ---- S4: norm2 + gate/up + SiLU gate -> hid
  {
    rms_to_smem<T>(xs, resid, n2 + (size_t)l * D, D, eps, red);
    mv_stage<BT, GS, ST_T, R>(mat_at<BT, GS>(wi, si, bi_, (size_t)l * 2 * HID, D), HID / 2, xs,
                              GatePairs{HID}, GateEpi<T>{hid});
  }
  grid_sync(sync, epoch);

  // ---- S5: linear_out + residual
  {
    load_vec(xs, hid, HID);
    mv_stage<BT, GS, ST_T, R>(mat_at<BT, GS>(wd, sd, bd, (size_t)l * D, HID), D / R, xs, Consecutive{},
                              ResidEpi<T>{resid});
  }
  grid_sync(sync, epoch);
}

// ---- S6: out_norm -> h, text head -> logits
{
  rms_to_smem<T>(xs, resid, onorm, D, eps, red);
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < D; i += blockDim.x) h[i] = xs[xi(i)];
  constexpr int PW = Bits<BH>::per_word;
  Mat<BH, ST_T> m{reinterpret_cast<const uint32_t*>(wt), st, bt, D};
  mv_stage<BH, GS, ST_T, R>(m, TXT / R, xs, Consecutive{}, [&](int g, const float* acc) {
    logits[g * R + lane] = rt<T>(sel4(acc, lane));
  });
  (void)PW;
}
