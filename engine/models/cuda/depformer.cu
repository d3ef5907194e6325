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
        dep_step_input<T, BE, GS, DD, CARD>(xs, resid, xin + (NSIN == 1 ? 0 : s) * DD, prev, s, tew, tes, teb,
                                            ew, es, eb, dn1, eps, red);
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
      dep_attention<T, DD, NH, NS>(a, sc, qv, kb, vb, s, scale);
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
