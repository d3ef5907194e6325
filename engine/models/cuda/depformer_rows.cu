// Body of the fused depformer walk for B conversations at once (the batched server, see
// engine/server/batch.py and FusedLM.depformer_rows in engine/models/fused.py). The same stages as
// depformer.cu (batch 1); every matrix stage runs its rows in chunks of NB (mv_rows: each weight
// vector is decoded once per chunk and dotted with all of the chunk's vectors), so the number of
// grid barriers does not grow with B. A chunk's prologues (norms, attention, embeddings, loads) take
// all its vectors at once: one warp per vector, or the block over every element, so a chunk costs a
// few block barriers whatever NB is. Per row: its own sampling parameters and forced tokens.
//
// Template constants: as depformer.cu (T, D, DD, NH, LD, HIDD, CARD, NS, NSIN, NSL, BD, BE, BHD, GS,
// NSORT, NT) plus NB (vectors per chunk). No TOPK / GREEDY: they are per row here.
// Inputs: h (B, D) float (temporal outputs), meta (1) int32 = B, ttok (B) int32 (step 0's input
// token per row), forced (B, NS) int32 (the token codebook s must take in row b, or -1 to sample),
// temp (B) float (<= 0: greedy row), topk (B) int32 (<= 0 or >= CARD: no top-k), noise (B, NS, CARD)
// float (Gumbel noise; unread for greedy rows), the weights as in depformer.cu, fp (1) = eps.
// Outputs: toks (B, NS) int32, scratch float (zeroed).
using namespace ppx;
constexpr int R = 4;
constexpr int HDD = DD / NH;
constexpr int XIN = NSIN == 1 ? 1 : NS;
extern __shared__ float xs[];
const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
const int B = meta[0];
unsigned int* sync = reinterpret_cast<unsigned int*>(scratch);
float* xin = scratch + 32;                        // (B, XIN, DD)
float* resid = xin + (size_t)B * XIN * DD;        // (B, DD)
float* qv = resid + (size_t)B * DD;               // (B, DD)
float* dk = qv + (size_t)B * DD;                  // (B, LD, NS, DD)
float* dv = dk + (size_t)B * LD * NS * DD;
float* hid = dv + (size_t)B * LD * NS * DD;       // (B, HIDD)
float* lg = hid + (size_t)B * HIDD;               // (B, CARD)
unsigned int epoch = 0;
const float eps = fp[0];
const float scale = rsqrtf((float)HDD);
using ST = T;

// ---- X: depformer_in(h) of every row, for every step this frame
{
  constexpr int XS = xs_size(D);
  Mat<BD, ST> m{reinterpret_cast<const uint32_t*>(win), sin_, bin, D};
  for (int c0 = 0; c0 < B; c0 += NB) {
    const int nb = min(NB, B - c0);
    load_rows(xs, XS, h + (size_t)c0 * D, D, nb, D);
    mv_rows<BD, GS, ST, R, NB>(m, XIN * DD / R, xs, XS, nb, Consecutive{}, [&](int g, int n, const float* acc) {
      float* dst = xin + (size_t)(c0 + n) * XIN * DD + g * R;
#pragma unroll
      for (int r = 0; r < R; ++r) __stcg(dst + r, rt<T>(acc[r]));
    });
    __syncthreads();
  }
}
grid_sync(sync, epoch);

for (int s = 0; s < NS; ++s) {
  const int sw = NSL == 1 ? 0 : s;
  for (int j = 0; j < LD; ++j) {
    // ---- S1: (step input) + norm1 + QKV
    {
      constexpr int XS = xs_size(DD);
      const auto m = mat_at<BD, GS>(qw, qs, qb, ((size_t)j * NSL + sw) * 3 * DD, DD);
      for (int c0 = 0; c0 < B; c0 += NB) {
        const int nb = min(NB, B - c0);
        if (j == 0) {
          for (int n = warp; n < nb; n += nw) {     // one warp per row
            const int b = c0 + n;
            const int prev = s == 0 ? ttok[b] : __ldcg(toks + (size_t)b * NS + s - 1);
            dep_step_input_warp<T, BE, GS, DD, CARD>(xs + n * XS, resid + (size_t)b * DD,
                                                     xin + ((size_t)b * XIN + (NSIN == 1 ? 0 : s)) * DD, prev, s,
                                                     tew, tes, teb, ew, es, eb, dn1, eps);
          }
          __syncthreads();
        } else {
          rms_rows_to_smem<T>(xs, XS, resid + (size_t)c0 * DD, DD, nb, dn1 + (size_t)j * DD, DD, eps);
        }
        mv_rows<BD, GS, ST, R, NB>(m, 3 * DD / R, xs, XS, nb, Consecutive{}, [&](int g, int n, const float* acc) {
          const int b = c0 + n;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int row = g * R + r;
            const int which = row / DD, e = row % DD;
            float* dst = which == 0 ? qv + (size_t)b * DD + e
                                    : (which == 1 ? dk : dv) + (((size_t)b * LD + j) * NS + s) * DD + e;
            __stcg(dst, rt<T>(acc[r]));
          }
        });
        __syncthreads();
      }
    }
    grid_sync(sync, epoch);

    // ---- S2: attention over this frame's steps 0..s (every block, redundantly) + out_proj
    {
      constexpr int XS = xs_size(DD);
      float* sm = xs + NB * XS;                    // NB x (NH x NS + DD)
      for (int c0 = 0; c0 < B; c0 += NB) {
        const int nb = min(NB, B - c0);
        const size_t kv0 = ((size_t)c0 * LD + j) * NS * DD;
        dep_attention_rows<T, DD, NH, NS>(xs, XS, sm, qv + (size_t)c0 * DD, dk + kv0, dv + kv0,
                                          (size_t)LD * NS * DD, nb, s, scale);
        mv_rows<BD, GS, ST, R, NB>(mat_at<BD, GS>(ow, os, ob, ((size_t)j * NSL + sw) * DD, DD), DD / R, xs, XS, nb,
                                   Consecutive{}, ResidRowsEpi<T, R>{resid + (size_t)c0 * DD, DD});
        __syncthreads();
      }
    }
    grid_sync(sync, epoch);

    // ---- S3: norm2 + gate/up + SiLU gate -> hid
    {
      constexpr int XS = xs_size(DD);
      const auto m = mat_at<BD, GS>(iw, is, ib, ((size_t)j * NSL + sw) * 2 * HIDD, DD);
      for (int c0 = 0; c0 < B; c0 += NB) {
        const int nb = min(NB, B - c0);
        rms_rows_to_smem<T>(xs, XS, resid + (size_t)c0 * DD, DD, nb, dn2 + (size_t)j * DD, DD, eps);
        mv_rows<BD, GS, ST, R, NB>(m, HIDD / 2, xs, XS, nb, GatePairs{HIDD},
                                   GateRowsEpi<T>{hid + (size_t)c0 * HIDD, HIDD});
        __syncthreads();
      }
    }
    grid_sync(sync, epoch);

    // ---- S4: linear_out + residual
    {
      constexpr int XS = xs_size(HIDD);
      const auto m = mat_at<BD, GS>(dw, ds, db, ((size_t)j * NSL + sw) * DD, HIDD);
      for (int c0 = 0; c0 < B; c0 += NB) {
        const int nb = min(NB, B - c0);
        load_rows(xs, XS, hid + (size_t)c0 * HIDD, HIDD, nb, HIDD);
        mv_rows<BD, GS, ST, R, NB>(m, DD / R, xs, XS, nb, Consecutive{}, ResidRowsEpi<T, R>{resid + (size_t)c0 * DD, DD});
        __syncthreads();
      }
    }
    grid_sync(sync, epoch);
  }

  // ---- S5: this step's head -> logits of every row
  {
    constexpr int XS = xs_size(DD);
    constexpr int PW = Bits<BHD>::per_word;
    const size_t lrow = (size_t)s * CARD;
    Mat<BHD, ST> m{reinterpret_cast<const uint32_t*>(lw) + lrow * (DD / PW), ls + lrow * (DD / GS),
                   lb + lrow * (DD / GS), DD};
    for (int c0 = 0; c0 < B; c0 += NB) {
      const int nb = min(NB, B - c0);
      load_rows(xs, XS, resid + (size_t)c0 * DD, DD, nb, DD);
      mv_rows<BHD, GS, ST, R, NB>(m, CARD / R, xs, XS, nb, Consecutive{}, [&](int g, int n, const float* acc) {
        float* dst = lg + (size_t)(c0 + n) * CARD + g * R;
#pragma unroll
        for (int r = 0; r < R; ++r) __stcg(dst + r, rt<T>(acc[r]));
      });
      __syncthreads();
    }
  }
  grid_sync(sync, epoch);

  // ---- S6: row b sampled by block b (rows past the grid: by block b % grid); forced tokens win
  for (int b = blockIdx.x; b < B; b += gridDim.x) {
    const float tb = temp[b];
    const int tok = sample_row<NSORT>(lg + (size_t)b * CARD, noise + ((size_t)b * NS + s) * CARD, CARD, tb <= 0.f,
                                      tb, topk[b], xs);
    const int f = forced[(size_t)b * NS + s];
    if (threadIdx.x == 0) __stcg(toks + (size_t)b * NS + s, f >= 0 ? f : tok);
  }
  if (s + 1 < NS) grid_sync(sync, epoch);
}
