// Body of the fused temporal step for B conversations at once (the batched server, see
// engine/server/batch.py and FusedLM.temporal_rows in engine/models/fused.py). The stages of
// temporal.cu (batch 1); every matrix stage runs the rows in chunks of NB vectors (mv_rows: each
// weight vector decoded once per chunk), so the grid barriers do not grow with B.
//
// Template constants: as temporal.cu (T, D, H, HD, L, C, HID, TXT, BT, BH, GS, NCH, NT) plus NB, KS5
// (linear_out's input in KS5 column parts of HID / KS5, 1 or 2: NB vectors of the whole gating
// hidden may not fit the shared memory) and SKIP (0; for bench/rows_probe.py's time split only: bit
// 0 skips the attention, bit 1 the matrices). NCH must be 1: each (row, head) is one attention item
// (B x H items keep the grid busy from a few rows on), so its output needs no combining.
// Inputs: x (B, D) T (summed input embeddings), meta (1) int32 = B, pos (B, C) int32 (each row's
// ring slot positions before this step, -1 = empty), offs (B) int32 (each row's position now),
// k0..k{L-1} / v0..v{L-1}: layer l's keys / values (cap >= B, H, C, HD) T, the weights as in
// temporal.cu, fp (eps, rope base). FusedLM prepends `KP[L]` / `VP[L]`, the tables of the k / v
// pointers (see FusedLM.temporal_rows_source).
// Outputs: h (B, D) float, logits (B, TXT) float, scratch float (zeroed). Row b's K/V of this
// step are written straight into k_l / v_l at slot offs[b] % C, in place (the batch engine owns
// those arrays); the attention takes them from scratch and skips that slot's old contents.
using namespace ppx;
constexpr int R = 4;
extern __shared__ float xs[];
const int B = meta[0];
unsigned int* sync = reinterpret_cast<unsigned int*>(scratch);
float* resid = scratch + 32;                     // (B, D)
float* qv = resid + (size_t)B * D;               // (B, D)
float* kc = qv + (size_t)B * D;                  // (B, D)
float* vc = kc + (size_t)B * D;                  // (B, D)
float* part = vc + (size_t)B * D;                // (B, H, NCH, HD + 2)
float* hid = part + (size_t)B * H * NCH * (HD + 2);   // (B, HID)
unsigned int epoch = 0;
const float eps = fp[0];
const float log2_base = log2f(fp[1]);
const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
constexpr int CH = (C + 1 + NCH - 1) / NCH;   // keys per attention chunk (index C = this step's key)
constexpr int XD = xs_size(D);
static_assert(NCH == 1, "one attention item per (row, head)");
const float scale = rsqrtf((float)HD);
using ST_T = T;

for (int l = 0; l < L; ++l) {
  // ---- S1: norm1 + QKV (+ RoPE on q and k at each row's position)
  {
    const T* w1 = n1 + (size_t)l * D;
    const auto m = mat_at<BT, GS>(wq, sq, bq, (size_t)l * 3 * D, D);
    for (int c0 = 0; c0 < B; c0 += NB) {
      const int nb = min(NB, B - c0);
      if (l == 0) {
        for (int n = warp; n < nb; n += nw) {      // one warp per row: the residual stream starts as x
          const int b = c0 + n;
          float* xb = xs + n * XD;
          float ss = 0.f;
          for (int i = lane; i < D; i += 32) {
            const float v = tof(x[(size_t)b * D + i]);
            xb[xi(i)] = v;
            ss += v * v;
            if (blockIdx.x == 0) __stcg(resid + (size_t)b * D + i, v);
          }
          const float inv = rsqrtf(warp_sum(ss) / (float)D + eps);
          for (int i = lane; i < D; i += 32) xb[xi(i)] = rt<T>(xb[xi(i)] * inv * tof(w1[i]));
        }
        __syncthreads();
      } else {
        rms_rows_to_smem<T>(xs, XD, resid + (size_t)c0 * D, D, nb, w1, D, eps);
      }
      if constexpr ((SKIP & 2) == 0)
      mv_rows<BT, GS, ST_T, R, NB>(m, 3 * D / R, xs, XD, nb, Consecutive{}, [&](int g, int n, const float* acc) {
        const int b = c0 + n;
        const int t = offs[b];
        const int slot = t % C;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int row = g * R + r;
          const int which = row / D, e = row % D;
          float v = rt<T>(acc[r]);
          if (which < 2) {                           // rows (2i, 2i+1) are one rotation pair
            const float other = rt<T>(acc[r ^ 1]);
            const int d = e % HD;
            const float inv_freq = exp2f(-(float)(d & ~1) / (float)HD * log2_base);
            float sn, cs;
            sincosf((float)t * inv_freq, &sn, &cs);
            v = (d & 1) ? rt<T>(other * sn + v * cs) : rt<T>(v * cs - other * sn);
          }
          __stcg((which == 0 ? qv : (which == 1 ? kc : vc)) + (size_t)b * D + e, v);
          if (which > 0) {
            T* cache = const_cast<T*>(which == 1 ? KP[l] : VP[l]);
            cache[(((size_t)b * H + e / HD) * C + slot) * HD + e % HD] = fromf<T>(v);
          }
        }
      });
      __syncthreads();
    }
  }
  grid_sync(sync, epoch);

  // ---- S2: attention partials, one (row, head, chunk of keys) per block iteration
  for (int item = blockIdx.x; item < ((SKIP & 1) ? 0 : B * H * NCH); item += gridDim.x) {
    const int b = item / (H * NCH), head = (item / NCH) % H, c = item % NCH;
    const int j0 = c * CH, j1 = min(C + 1, j0 + CH);
    const size_t ring = ((size_t)b * H + head) * C * HD;
    const size_t at = (size_t)b * D + head * HD;
    attn_partial<T, HD, C>(xs, part + (size_t)item * (HD + 2), qv + at, KP[l] + ring, VP[l] + ring, kc + at,
                           vc + at, pos + (size_t)b * C, offs[b] % C, j0, j1, scale);
  }
  grid_sync(sync, epoch);

  // ---- S3: combine the partials (every block, redundantly) + out_proj + residual
  {
    const auto m = mat_at<BT, GS>(wo, so, bo, (size_t)l * D, D);
    for (int c0 = 0; c0 < B; c0 += NB) {
      const int nb = min(NB, B - c0);
      // one partial per (row, head): acc / sum (its max is finite: index C always counts)
      for (int i = threadIdx.x; i < nb * D / 4; i += blockDim.x) {
        const int n = i / (D / 4), e = 4 * (i % (D / 4));
        const float* p0 = part + ((size_t)(c0 + n) * H + e / HD) * (HD + 2);
        const float S = __ldcg(p0 + 1);
        float a[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) a[k] = __ldcg(p0 + 2 + e % HD + k);
#pragma unroll
        for (int k = 0; k < 4; ++k) xs[n * XD + xi(e + k)] = rt<T>(a[k] / S);
      }
      __syncthreads();
      if constexpr ((SKIP & 2) == 0)
        mv_rows<BT, GS, ST_T, R, NB>(m, D / R, xs, XD, nb, Consecutive{}, ResidRowsEpi<T, R>{resid + (size_t)c0 * D, D});
      __syncthreads();
    }
  }
  grid_sync(sync, epoch);

  // ---- S4: norm2 + gate/up + SiLU gate -> hid
  {
    const auto m = mat_at<BT, GS>(wi, si, bi_, (size_t)l * 2 * HID, D);
    for (int c0 = 0; c0 < B; c0 += NB) {
      const int nb = min(NB, B - c0);
      rms_rows_to_smem<T>(xs, XD, resid + (size_t)c0 * D, D, nb, n2 + (size_t)l * D, D, eps);
      if constexpr ((SKIP & 2) == 0)
        mv_rows<BT, GS, ST_T, R, NB>(m, HID / 2, xs, XD, nb, GatePairs{HID}, GateRowsEpi<T>{hid + (size_t)c0 * HID, HID});
      __syncthreads();
    }
  }
  grid_sync(sync, epoch);

  // ---- S5: linear_out + residual, its input in KS5 column parts (the first parts' sums wait in qv,
  // free by now, unrounded: the residual is rounded once, as in the MLX graph)
  {
    constexpr int KP = HID / KS5;
    constexpr int XH = xs_size(KP);
    constexpr int PW = Bits<BT>::per_word;
    const auto full = mat_at<BT, GS>(wd, sd, bd, (size_t)l * D, HID);
    for (int c0 = 0; c0 < B; c0 += NB) {
      const int nb = min(NB, B - c0);
      for (int q = 0; q < KS5; ++q) {
        load_rows(xs, XH, hid + (size_t)c0 * HID + q * KP, HID, nb, KP);
        const Mat<BT, ST_T> m{full.w + q * (KP / PW), full.s + q * (KP / GS), full.b + q * (KP / GS), KP, HID};
        if constexpr ((SKIP & 2) == 0)
          mv_rows<BT, GS, ST_T, R, NB>(m, D / R, xs, XH, nb, Consecutive{}, [&](int g, int n, const float* acc) {
            float* rs = resid + (size_t)(c0 + n) * D + g * R;
            float* ps = qv + (size_t)(c0 + n) * D + g * R;
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const float sum = q == 0 ? acc[r] : __ldcg(ps + r) + acc[r];
              if (q + 1 < KS5) __stcg(ps + r, sum);
              else __stcg(rs + r, rt<T>(__ldcg(rs + r) + rt<T>(sum)));
            }
          });
        __syncthreads();
      }
    }
  }
  grid_sync(sync, epoch);
}

// ---- S6: out_norm -> h, text head -> logits
{
  Mat<BH, ST_T> m{reinterpret_cast<const uint32_t*>(wt), st, bt, D};
  for (int c0 = 0; c0 < B; c0 += NB) {
    const int nb = min(NB, B - c0);
    rms_rows_to_smem<T>(xs, XD, resid + (size_t)c0 * D, D, nb, onorm, D, eps);
    if (blockIdx.x == 0)
      for (int i = threadIdx.x; i < nb * D; i += blockDim.x) h[(size_t)c0 * D + i] = xs[(i / D) * XD + xi(i % D)];
    if constexpr ((SKIP & 2) == 0)
    mv_rows<BH, GS, ST_T, R, NB>(m, TXT / R, xs, XD, nb, Consecutive{}, [&](int g, int n, const float* acc) {
      float* dst = logits + (size_t)(c0 + n) * TXT + g * R;
#pragma unroll
      for (int r = 0; r < R; ++r) dst[r] = rt<T>(acc[r]);
    });
    __syncthreads();
  }
}
