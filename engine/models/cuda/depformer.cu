// Body of the fused depformer walk of one frame (batch 1): NS codebook steps, each 6 small layers
// with its own weight slot, its logits, and its token sampled on the GPU. See engine/models/fused.py.
//
// Template constants: T, D (temporal dim), DD (depformer dim), NH (heads), LD (layers), HIDD
// (gating hidden), CARD, NS (steps run), NSIN (depformer_in slots: 1 or dep_q), NSL (layer weight
// slots: 1 or dep_q), BD / BE / BHD (bits of the layer matrices / embedding tables / heads), GS,
// TOPK, GREEDY, NSORT (power of two >= CARD), NT.
// Inputs: h (D) float (the temporal output), ttok (1) int32 (step 0's input token), noise (NS, CARD)
// float (Gumbel noise; unused when GREEDY), win/sin_/bin (depformer_in), tew/tes/teb (the
// depformer's text table), ew/es/eb (its audio tables, (dep_q-1) x (CARD+1) rows), qw.. (in_proj),
// ow.. (out_proj), iw.. (linear_in), dw.. (linear_out) stacked over layers and slots, dn1 / dn2 (LD,
// DD), lw/ls/lb (the per-step heads), fp (eps, temperature).
// Outputs: toks (NS) int32, scratch float (zeroed). 4 barriers per layer, 2 per step for the head
// and the sampling.
using namespace ppx;
constexpr int R = 4;
constexpr int HDD = DD / NH;
extern __shared__ float xs[];
__shared__ float red[32];
unsigned int* sync = reinterpret_cast<unsigned int*>(scratch);
float* xin = scratch + 32;                    // (NSIN == 1 ? 1 : NS) * DD
float* resid = xin + (NSIN == 1 ? 1 : NS) * DD;
float* qv = resid + DD;
float* dk = qv + DD;                          // LD * NS * DD
float* dv = dk + LD * NS * DD;
float* hid = dv + LD * NS * DD;               // HIDD
float* lg = hid + HIDD;                       // CARD
unsigned int epoch = 0;
const float eps = fp[0], temp = fp[1];
const int lane = threadIdx.x & 31;
const float scale = rsqrtf((float)HDD);
using ST = T;

// ---- X: depformer_in(h) for every step this frame (one pass over the stacked matrix)
{
  load_vec(xs, h, D);
  constexpr int ROWS = (NSIN == 1 ? 1 : NS) * DD;
  constexpr int PW = Bits<BD>::per_word;
  Mat<BD, ST> m{reinterpret_cast<const uint32_t*>(win), sin_, bin, D};
  mv_stage<BD, GS, ST, R>(m, ROWS / R, xs, Consecutive{}, [&](int g, const float* acc) {
    __stcg(xin + g * R + lane, rt<T>(sel4(acc, lane)));
  });
  (void)PW;
}
grid_sync(sync, epoch);

for (int s = 0; s < NS; ++s) {
  const int sw = NSL == 1 ? 0 : s;
  const int prev = s == 0 ? ttok[0] : __ldcg(toks + s - 1);
  for (int j = 0; j < LD; ++j) {
    // ---- S1: (step input) + norm1 + QKV
    {
      if (j == 0) {
        // x = depformer_in(h, s) + E_s(prev); a negative token embeds as zeros (the reference's -1).
        const float* xin_s = xin + (NSIN == 1 ? 0 : s) * DD;
        constexpr int PWE = Bits<BE>::per_word;
        const int rows_per_table = s == 0 ? 0 : CARD + 1;
        const int row = s == 0 ? prev : prev + (s - 1) * rows_per_table;
        Mat<BE, ST> te{reinterpret_cast<const uint32_t*>(s == 0 ? tew : ew), s == 0 ? tes : es,
                       s == 0 ? teb : eb, DD};
        float ss = 0.f;
        for (int i = threadIdx.x; i < DD; i += blockDim.x) {
          const float e = prev >= 0 ? rt<T>(table_value<BE, GS, ST>(te, row, i)) : 0.f;
          const float v = rt<T>(__ldcg(xin_s + i) + e);
          xs[xi(i)] = v;
          ss += v * v;
          if (blockIdx.x == 0) __stcg(resid + i, v);
        }
        const float inv = rsqrtf(block_sum(ss, red) / (float)DD + eps);
        const T* w1 = dn1;
        for (int i = threadIdx.x; i < DD; i += blockDim.x) xs[xi(i)] = rt<T>(xs[xi(i)] * inv * tof(w1[i]));
        __syncthreads();
        (void)PWE;
      } else {
        rms_to_smem<T>(xs, resid, dn1 + (size_t)j * DD, DD, eps, red);
      }
      const auto m = mat_at<BD, GS>(qw, qs, qb, ((size_t)j * NSL + sw) * 3 * DD, DD);
      mv_stage<BD, GS, ST, R>(m, 3 * DD / R, xs, Consecutive{}, [&](int g, const float* acc) {
        const int row = g * R + lane;
        const int which = row / DD, e = row % DD;
        const float v = rt<T>(sel4(acc, lane));
        float* dst = which == 0 ? qv + e : (which == 1 ? dk : dv) + ((size_t)j * NS + s) * DD + e;
        __stcg(dst, v);
      });
    }
    grid_sync(sync, epoch);

    // ---- S2: attention over this frame's steps 0..s (every block, redundantly) + out_proj
    {
      float* a = xs;              // DD
      float* sc = xs + xs_size(DD); // NH * NS
      const float* kb = dk + (size_t)j * NS * DD;
      const float* vb = dv + (size_t)j * NS * DD;
      if (s == 0) {
        for (int e = threadIdx.x; e < DD; e += blockDim.x) a[xi(e)] = __ldcg(vb + e);  // one key: weight 1
      } else {
        for (int idx = threadIdx.x; idx < NH * (s + 1); idx += blockDim.x) {
          const int hh = idx / (s + 1), tt = idx % (s + 1);
          float p = 0.f;
          for (int d = 0; d < HDD; ++d)
            p += (__ldcg(qv + hh * HDD + d) * scale) * __ldcg(kb + (size_t)tt * DD + hh * HDD + d);
          sc[hh * NS + tt] = p;
        }
        __syncthreads();
        for (int hh = threadIdx.x; hh < NH; hh += blockDim.x) {
          float m = -INFINITY;
          for (int tt = 0; tt <= s; ++tt) m = fmaxf(m, sc[hh * NS + tt]);
          float sum = 0.f;
          for (int tt = 0; tt <= s; ++tt) {
            const float e = __expf(sc[hh * NS + tt] - m);
            sc[hh * NS + tt] = e;
            sum += e;
          }
          for (int tt = 0; tt <= s; ++tt) sc[hh * NS + tt] /= sum;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < DD; e += blockDim.x) {
          const int hh = e / HDD;
          float acc = 0.f;
          for (int tt = 0; tt <= s; ++tt) acc += sc[hh * NS + tt] * __ldcg(vb + (size_t)tt * DD + e);
          a[xi(e)] = rt<T>(acc);
        }
      }
      __syncthreads();
      mv_stage<BD, GS, ST, R>(mat_at<BD, GS>(ow, os, ob, ((size_t)j * NSL + sw) * DD, DD), DD / R, a,
                              Consecutive{}, ResidEpi<T>{resid});
    }
    grid_sync(sync, epoch);

    // ---- S3: norm2 + gate/up + SiLU gate -> hid
    {
      rms_to_smem<T>(xs, resid, dn2 + (size_t)j * DD, DD, eps, red);
      mv_stage<BD, GS, ST, R>(mat_at<BD, GS>(iw, is, ib, ((size_t)j * NSL + sw) * 2 * HIDD, DD), HIDD / 2,
                              xs, GatePairs{HIDD}, GateEpi<T>{hid});
    }
    grid_sync(sync, epoch);

    // ---- S4: linear_out + residual
    {
      load_vec(xs, hid, HIDD);
      mv_stage<BD, GS, ST, R>(mat_at<BD, GS>(dw, ds, db, ((size_t)j * NSL + sw) * DD, HIDD), DD / R, xs,
                              Consecutive{}, ResidEpi<T>{resid});
    }
    grid_sync(sync, epoch);
  }

  // ---- S5: this step's head -> logits
  {
    load_vec(xs, resid, DD);
    constexpr int PW = Bits<BHD>::per_word;
    const size_t lrow = (size_t)s * CARD;
    Mat<BHD, ST> m{reinterpret_cast<const uint32_t*>(lw) + lrow * (DD / PW), ls + lrow * (DD / GS),
                   lb + lrow * (DD / GS), DD};
    mv_stage<BHD, GS, ST, R>(m, CARD / R, xs, Consecutive{}, [&](int g, const float* acc) {
      __stcg(lg + g * R + lane, rt<T>(sel4(acc, lane)));
    });
  }
  grid_sync(sync, epoch);

  // ---- S6: sample (block 0); every block reads the token after the barrier
  if (blockIdx.x == 0) {
    const int tok = sample_row<NSORT>(lg, noise + (size_t)s * CARD, CARD, GREEDY, temp, TOPK, xs);
    if (threadIdx.x == 0) __stcg(toks + s, tok);
  }
  if (s + 1 < NS) grid_sync(sync, epoch);
}
