// Device helpers of the fused Mimi encoder step (engine/models/fused_mimi.py). Included after
// common.cuh (grid_sync, warp_sum, block_sum, warp_argmax).
//
// Everything is float32 and channels-last, as the MLX modules: a conv input is a (T, C) row-major
// buffer, a conv weight (cout, k, cin) row-major, so with dilation 1 output t of a stride-s conv is
// the dot product of weight row co (k*cin values) with the contiguous input span starting at
// t*s*cin. Each conv reads a "padded input" buffer P = [streaming tail | this frame's input], with
// the ELU that precedes it (if any) already applied by the stage that wrote P.
#pragma once

namespace ppx {

__device__ __forceinline__ float elu1(float v) { return v > 0.f ? v : expm1f(v); }

__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

__device__ __forceinline__ int gthread() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int gthreads() { return gridDim.x * blockDim.x; }
__device__ __forceinline__ int gwarp() { return blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); }
__device__ __forceinline__ int gwarps() { return gridDim.x * (blockDim.x >> 5); }

// dst[i] = src[i] for i < n over the whole grid.
__device__ __forceinline__ void gcopy(float* dst, const float* src, int n) {
  for (int i = gthread(); i < n; i += gthreads()) dst[i] = __ldcg(src + i);
}

// Epilogue of one conv output (t, co): v = acc + bias (+ resid[t, co]); raw[t, co] = v if raw;
// next[t, co] = (elu ? ELU(v) : v) if next (`next` points past the next conv's tail rows).
struct ConvOut {
  const float* bias;
  const float* resid;
  float* raw;
  float* next;
  bool elu;
  int cout;
  __device__ __forceinline__ void operator()(int t, int co, float acc) const {
    float v = acc + (bias ? __ldg(bias + co) : 0.f);
    const int i = t * cout + co;
    if (resid) v += __ldcg(resid + i);
    if (raw) __stcg(raw + i, v);
    if (next) __stcg(next + i, elu ? elu1(v) : v);
  }
};

// One causal conv over the grid: tout x cout outputs, each the dot of weight row co (L = k*cin
// values) with P[t*step .. t*step + L) (step = stride*cin).
// WARP = true: a warp per output, lanes over L in float4 (needs L % 4 == 0 and step % 4 == 0).
// WARP = false: a thread per output, consecutive threads on consecutive t (the weight row is
// shared by the warp); float4 when VEC.
template <bool WARP, bool VEC>
__device__ __forceinline__ void conv_stage(const float* w, const float* P, int L, int step, int tout, int cout,
                                           const ConvOut& epi) {
  const int total = tout * cout;
  if constexpr (WARP) {
    const int lane = threadIdx.x & 31;
    for (int o = gwarp(); o < total; o += gwarps()) {
      const int co = o / tout, t = o % tout;
      const float4* wr = reinterpret_cast<const float4*>(w + (size_t)co * L);
      const float4* xr = reinterpret_cast<const float4*>(P + (size_t)t * step);
      float acc = 0.f;
      for (int r = lane; r < L / 4; r += 32) {
        const float4 a = __ldg(wr + r);
        const float4 b = __ldcg(xr + r);
        acc = fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
      }
      acc = warp_sum(acc);
      if (lane == 0) epi(t, co, acc);
    }
  } else {
    for (int o = gthread(); o < total; o += gthreads()) {
      const int co = o / tout, t = o % tout;
      const float* wr = w + (size_t)co * L;
      const float* xr = P + (size_t)t * step;
      float acc = 0.f;
      if constexpr (VEC) {
        for (int r = 0; r < L; r += 4) {
          const float4 a = __ldg(reinterpret_cast<const float4*>(wr + r));
          const float4 b = __ldcg(reinterpret_cast<const float4*>(xr + r));
          acc = fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
        }
      } else {
        for (int r = 0; r < L; ++r) acc = fmaf(__ldg(wr + r), __ldcg(xr + r), acc);
      }
      epi(t, co, acc);
    }
  }
}

// LayerNorm of NTOK rows of width D (global, float) into shared memory (NTOK x D, plain layout),
// every block for itself. `red` >= 32 floats.
template <int NTOK, int D>
__device__ __forceinline__ void ln_to_smem(float* dst, const float* src, const float* w, const float* b, float eps,
                                           float* red) {
  for (int i = threadIdx.x; i < NTOK * D; i += blockDim.x) dst[i] = __ldcg(src + i);
  __syncthreads();
#pragma unroll
  for (int t = 0; t < NTOK; ++t) {
    float s = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) s += dst[t * D + i];
    const float mean = block_sum(s, red) / (float)D;
    __syncthreads();
    float q = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      const float d = dst[t * D + i] - mean;
      q += d * d;
    }
    const float inv = rsqrtf(block_sum(q, red) / (float)D + eps);
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x)
      dst[t * D + i] = (dst[t * D + i] - mean) * inv * __ldg(w + i) + __ldg(b + i);
    __syncthreads();
  }
}

// Load n floats from global into shared memory (block-cooperative).
__device__ __forceinline__ void to_smem(float* dst, const float* src, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = __ldcg(src + i);
  __syncthreads();
}

// Dense matrix (rows, K) times NTOK vectors held in shared memory (NTOK x K): a warp per RP
// consecutive rows, lanes over K in float4. epi(row0, acc[NTOK][RP]) runs in every lane of the warp.
template <int NTOK, int RP, typename Epi>
__device__ __forceinline__ void mv_tok(const float* W, int rows, int K, const float* xs, Epi epi) {
  const int lane = threadIdx.x & 31;
  for (int g = gwarp(); g * RP < rows; g += gwarps()) {
    float acc[NTOK][RP];
#pragma unroll
    for (int t = 0; t < NTOK; ++t)
#pragma unroll
      for (int r = 0; r < RP; ++r) acc[t][r] = 0.f;
    for (int k4 = lane; k4 < K / 4; k4 += 32) {
      float4 wv[RP];
#pragma unroll
      for (int r = 0; r < RP; ++r) wv[r] = __ldg(reinterpret_cast<const float4*>(W + (size_t)(g * RP + r) * K) + k4);
#pragma unroll
      for (int t = 0; t < NTOK; ++t) {
        const float4 x = reinterpret_cast<const float4*>(xs + t * K)[k4];
#pragma unroll
        for (int r = 0; r < RP; ++r)
          acc[t][r] = fmaf(wv[r].x, x.x, fmaf(wv[r].y, x.y, fmaf(wv[r].z, x.z, fmaf(wv[r].w, x.w, acc[t][r]))));
      }
    }
#pragma unroll
    for (int t = 0; t < NTOK; ++t)
#pragma unroll
      for (int r = 0; r < RP; ++r) acc[t][r] = warp_sum(acc[t][r]);
    epi(g * RP, acc);
  }
}

// (best, best_i) <- the warp's smallest value, lowest index on ties (every lane gets it).
__device__ __forceinline__ void warp_argmin(float& best, int& best_i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (ov < best || (ov == best && oi < best_i)) {
      best = ov;
      best_i = oi;
    }
  }
}

// One residual-VQ level over the grid: score(c) = norm[c] - 2 r.e[c] for c < bins (e (bins, DIM)
// row-major, r in shared memory); each block's best (lowest score, lowest index on ties) goes to
// pv[blockIdx] / pi[blockIdx].
template <int DIM>
__device__ __forceinline__ void vq_scores(const float* e, const float* norm, int bins, const float* r, float* pv,
                                          int* pi) {
  __shared__ float bv[32];
  __shared__ int bi[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float best = INFINITY;
  int best_i = 0x7fffffff;
  for (int c = blockIdx.x * nw + warp; c < bins; c += gridDim.x * nw) {
    const float4* er = reinterpret_cast<const float4*>(e + (size_t)c * DIM);
    float d = 0.f;
    for (int k4 = lane; k4 < DIM / 4; k4 += 32) {
      const float4 a = __ldg(er + k4);
      const float4 x = reinterpret_cast<const float4*>(r)[k4];
      d = fmaf(a.x, x.x, fmaf(a.y, x.y, fmaf(a.z, x.z, fmaf(a.w, x.w, d))));
    }
    d = warp_sum(d);
    const float s = __ldg(norm + c) - 2.f * d;
    if (s < best) {   // c grows within a warp: the first minimum stays on ties
      best = s;
      best_i = c;
    }
  }
  if (lane == 0) {
    bv[warp] = best;
    bi[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < nw ? bv[lane] : INFINITY;
    best_i = lane < nw ? bi[lane] : 0x7fffffff;
    warp_argmin(best, best_i);
    if (lane == 0) {
      __stcg(pv + blockIdx.x, best);
      __stcg(pi + blockIdx.x, best_i);
    }
  }
  __syncthreads();
}

// The grid-wide winner of a vq_scores pass (every block computes it; every thread gets it).
__device__ __forceinline__ int vq_pick(const float* pv, const int* pi) {
  __shared__ int win;
  if (threadIdx.x < 32) {
    float best = INFINITY;
    int best_i = 0x7fffffff;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += 32) {
      const float v = __ldcg(pv + b);
      const int i = __ldcg(pi + b);
      if (v < best || (v == best && i < best_i)) {
        best = v;
        best_i = i;
      }
    }
    warp_argmin(best, best_i);
    if (threadIdx.x == 0) win = best_i == 0x7fffffff ? 0 : best_i;
  }
  __syncthreads();
  const int r = win;
  __syncthreads();
  return r;
}

}  // namespace ppx
