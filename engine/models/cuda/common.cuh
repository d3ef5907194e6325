// Device helpers shared by the fused LM step kernels (engine/models/fused.py).
//
// The kernels are "persistent": one launch of G blocks (G <= what the GPU keeps resident at once)
// walks through every stage of a step, with a software grid barrier between stages. That turns the
// ~1100 MLX kernel launches of one LM step into two launches, which is what bounds MLX on CUDA
// (the host spends ~7 us per launch; the GPU work itself is ~1-3 ms).
//
// Conventions
// - Matrices are MLX layouts: y = W x with W (rows, K) row-major; either dense (float / bf16) or
//   MLX affine-quantized (uint32 words holding 32/BITS values, lowest bits first; per group of GS
//   values along K a scale and a bias: w = scale * q + bias).
// - Vectors travel between blocks through a float32 scratch buffer (global memory). A stage reads
//   them only after the grid barrier that follows the stage that wrote them.
// - Every value the MLX graph would round to the model dtype T is rounded here too (rt<T>), so the
//   fused step tracks the MLX step closely in bf16 and matches it in float32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ppx {

constexpr int kWarp = 32;

__device__ __forceinline__ float tof(float v) { return v; }
__device__ __forceinline__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float tof(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T fromf(float v);
template <> __device__ __forceinline__ float fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half fromf<__half>(float v) { return __float2half(v); }

// Eight consecutive T values (16-byte aligned for bf16 / half, 32 for float) as floats.
__device__ __forceinline__ void load8(const float* p, float* f) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) { const float2 t = __bfloat1622float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}
__device__ __forceinline__ void load8(const __half* p, float* f) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) { const float2 t = __half22float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}

// One fp8 e4m3 value (the OCP "fn" format mx.to_fp8 stores: exponent bias 7, no infinities,
// 0x7f / 0xff NaN, which mx.to_fp8 never writes: it saturates at +-448) as a float. Normal
// numbers: the 7 exponent and mantissa bits moved to a float's positions, times 2^(127 - 7);
// subnormals (exponent 0): mantissa * 2^-9, so a flush-to-zero build decodes them too.
__device__ __forceinline__ float fp8e4m3_to_float(unsigned int b) {
  const float mag = (b & 0x78u) ? __uint_as_float((b & 0x7fu) << 20) * 1.329227995784916e36f
                                : (float)(b & 7u) * 0.001953125f;
  return (b & 0x80u) ? -mag : mag;
}
// Eight consecutive fp8 e4m3 values (8-byte aligned) as floats.
__device__ __forceinline__ void load8(const uint8_t* p, float* f) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[i] = fp8e4m3_to_float((u.x >> (8 * i)) & 0xffu);
    f[4 + i] = fp8e4m3_to_float((u.y >> (8 * i)) & 0xffu);
  }
}

// Round a float to the precision of T (identity for float).
template <typename T> __device__ __forceinline__ float rt(float v) { return tof(fromf<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// a[i] for a 4-element register array and a runtime i (no local-memory indexing).
__device__ __forceinline__ float sel4(const float* a, int i) {
  return i == 0 ? a[0] : (i == 1 ? a[1] : (i == 2 ? a[2] : a[3]));
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Grid-wide barrier for a launch whose blocks are all resident. `sync` points at two zeroed
// uint32 words: [0] arrival counter, [1] error flag. `epoch` counts the barriers this block has
// passed (the same in every block). A barrier that waits over 2 s sets the error flag and lets
// the block go on (garbage out, flagged) instead of hanging the GPU.
__device__ __forceinline__ void grid_sync(unsigned int* sync, unsigned int& epoch) {
  __syncthreads();
  epoch += 1;
  if (threadIdx.x == 0) {
    const unsigned int target = epoch * gridDim.x;
    __threadfence();
    atomicAdd(sync, 1u);
    const unsigned long long t0 = global_ns();
    while (true) {
      unsigned int v = *((volatile unsigned int*)sync);
      if (v >= target) break;
      if (*((volatile unsigned int*)(sync + 1))) break;
      if (global_ns() - t0 > 2000000000ull) {
        atomicExch(sync + 1, 1u);
        break;
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// Block-wide sum (every thread gets the result). `red` is >= 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  t = warp_sum(t);
  return t;
}

// ---------------------------------------------------------------- matrices
// One matrix: BITS 4 / 8 = MLX affine quantized (ST = scale/bias dtype), 16 / 32 = dense ST.
template <int BITS, typename ST>
struct Mat {
  const uint32_t* w;   // row-major words
  const ST* s;         // (rows, K / GS) scales (quantized only)
  const ST* b;         // (rows, K / GS) biases (quantized only)
  int K;               // input width
  int ld = 0;          // mv_rows: the row length w, s and b are laid out with (0: K); more when this
                       // Mat is a column slice of a wider matrix
};

template <int BITS> struct Bits {
  static constexpr int per_word = 32 / BITS;   // values per uint32 word
};

// Index of vector element i in shared memory: 4 floats of padding after every 32, so that the
// 16-byte x fragments the lanes of a warp read (32, 16, 8 or 4 floats apart) hit distinct banks.
__device__ __forceinline__ int xi(int i) { return i + ((i >> 5) << 2); }

// Shared-memory floats needed for an n-element vector in that layout.
__host__ __device__ constexpr int xs_size(int n) { return n + ((n + 31) / 32) * 4; }

// Value k (0..3) of the byte lanes of `bytes` as a float: 0x4B0000bb is 2^23 + bb exactly, so one
// byte permute and one add replace the (quarter-rate) integer-to-float conversion.
__device__ __forceinline__ float byte_f(uint32_t bytes, int k) {
  return __uint_as_float(__byte_perm(bytes, 0x4B000000u, 0x7440u | (unsigned)k)) - 8388608.0f;
}

// Decode one word into per_word floats (the integer codes for quantized formats).
template <int BITS, typename ST>
__device__ __forceinline__ void decode(uint32_t w, float* out) {
  if constexpr (BITS == 4) {
    const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = byte_f(lo, k);
      out[2 * k + 1] = byte_f(hi, k);
    }
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = byte_f(w, k);
  } else if constexpr (BITS == 16) {
    const ST* p = reinterpret_cast<const ST*>(&w);
    out[0] = tof(p[0]);
    out[1] = tof(p[1]);
  } else {
    out[0] = __uint_as_float(w);
  }
}

// Warps that share one row group of a matrix-vector stage: enough that every lane loads about one
// of the nvec 16-byte vectors of a row per round (at most the block's nw warps).
__device__ __forceinline__ int mv_warps_per_group(int nvec, int nw) {
  int ks = 1;
  while (ks < nw && ks * 32 * 2 <= nvec) ks <<= 1;
  return ks;
}

// One matrix-vector stage over the whole grid: for row groups g < ngroups (R rows each, row
// indices from rowmap(g, rows)), acc = W[rows] . x, then epi(g, acc) in lanes 0..R-1 of one warp.
// The 16-byte vectors of a row are split over KS warps of a block (KS chosen so every lane loads
// about one vector per row per round), which keeps ~32 KB of loads in flight per SM whatever the
// matrix shape; the KS partial sums meet in shared memory.
template <int BITS, int GS, typename ST, int R, typename RowMap, typename Epi>
__device__ __forceinline__ void mv_stage(const Mat<BITS, ST>& m, int ngroups, const float* xs, RowMap rowmap,
                                         Epi epi) {
  constexpr int PW = Bits<BITS>::per_word;
  constexpr int VV = 4 * PW;
  constexpr bool quant = BITS == 4 || BITS == 8;
  __shared__ float part_sums[32 * R];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int nvec = m.K / VV;
  const int ks = mv_warps_per_group(nvec, nw);
  const int gpr = nw / ks;                               // row groups per block round
  const int gi = warp / ks, kk = warp % ks;
  const int words = m.K / PW, groups = m.K / GS;
  for (int base = blockIdx.x * gpr; base < ngroups; base += gridDim.x * gpr) {
    const int g = base + gi;
    float a[R];
#pragma unroll
    for (int r = 0; r < R; ++r) a[r] = 0.f;
    if (g < ngroups) {
      int rows[R];
      rowmap(g, rows);
      for (int v = kk * 32 + lane; v < nvec; v += ks * 32) {
        uint4 wv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) wv[r] = __ldg(reinterpret_cast<const uint4*>(m.w + (size_t)rows[r] * words) + v);
        const int b0 = v * VV;
        const float* xp = xs + xi(b0);
        float xsum = 0.f;
        if constexpr (quant) {
#pragma unroll
          for (int i = 0; i < VV; i += 4) {
            const float4 f = *reinterpret_cast<const float4*>(xp + i);
            xsum += (f.x + f.y) + (f.z + f.w);
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t ws[4] = {wv[r].x, wv[r].y, wv[r].z, wv[r].w};
          float d = 0.f;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            float q[PW];
            decode<BITS, ST>(ws[k], q);
#pragma unroll
            for (int i = 0; i < PW; i += 4 > PW ? PW : 4) {
              if constexpr (PW >= 4) {
                const float4 f = *reinterpret_cast<const float4*>(xp + k * PW + i);
                d = fmaf(q[i], f.x, d);
                d = fmaf(q[i + 1], f.y, d);
                d = fmaf(q[i + 2], f.z, d);
                d = fmaf(q[i + 3], f.w, d);
              } else {
#pragma unroll
                for (int j = 0; j < PW; ++j) d = fmaf(q[j], xp[k * PW + j], d);
              }
            }
          }
          if constexpr (quant) {
            const int gq = b0 / GS;
            const float sc = tof(m.s[(size_t)rows[r] * groups + gq]);
            const float bi = tof(m.b[(size_t)rows[r] * groups + gq]);
            a[r] = fmaf(sc, d, fmaf(bi, xsum, a[r]));
          } else {
            a[r] += d;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) a[r] = warp_sum(a[r]);
    if (ks > 1) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) part_sums[warp * R + r] = a[r];
      }
      __syncthreads();
      if (kk == 0 && g < ngroups && lane < R) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float t = 0.f;
          for (int k = 0; k < ks; ++k) t += part_sums[(warp + k) * R + r];
          a[r] = t;
        }
      }
    }
    if (kk == 0 && g < ngroups && lane < R) epi(g, a);
    if (ks > 1) __syncthreads();
  }
}

// Rows g*R .. g*R+R-1.
struct Consecutive {
  __device__ __forceinline__ void operator()(int g, int* rows) const {
#pragma unroll
    for (int r = 0; r < 4; ++r) rows[r] = g * 4 + r;
  }
};

// SiLU-gate pairs: rows 2g, 2g+1 (gate) and hidden+2g, hidden+2g+1 (up).
struct GatePairs {
  int hidden;
  __device__ __forceinline__ void operator()(int g, int* rows) const {
    rows[0] = 2 * g;
    rows[1] = 2 * g + 1;
    rows[2] = hidden + 2 * g;
    rows[3] = hidden + 2 * g + 1;
  }
};

// The Mat of rows [row0, ...) of a (stacked) matrix with K inputs.
template <int BITS, int GS, typename ST, typename WT>
__device__ __forceinline__ Mat<BITS, ST> mat_at(const WT* w, const ST* s, const ST* b, size_t row0, int K) {
  return Mat<BITS, ST>{reinterpret_cast<const uint32_t*>(w) + row0 * (K / Bits<BITS>::per_word),
                       s + row0 * (K / GS), b + row0 * (K / GS), K};
}

// Epilogue of a SiLU-gating stage (GatePairs rows): hid[2g + i] = silu(gate) * up, rounded where
// the MLX graph rounds.
template <typename T>
struct GateEpi {
  float* hid;
  __device__ __forceinline__ void operator()(int g, const float* acc) const {
    const int lane = threadIdx.x & 31;
    if (lane < 2) {
      const float a = rt<T>(sel4(acc, lane)), b = rt<T>(sel4(acc, lane + 2));
      const float sg = rt<T>(1.f / (1.f + __expf(-a)));
      __stcg(hid + 2 * g + lane, rt<T>(rt<T>(a * sg) * b));
    }
  }
};

// Epilogue of a projection into the residual stream (Consecutive rows): resid += W x.
template <typename T>
struct ResidEpi {
  float* resid;
  __device__ __forceinline__ void operator()(int g, const float* acc) const {
    const int lane = threadIdx.x & 31;
    const int row = g * 4 + lane;
    __stcg(resid + row, rt<T>(__ldcg(resid + row) + rt<T>(sel4(acc, lane))));
  }
};

// q . row for one attention key: q in shared memory (float, HD), row HD values of T in global memory
// (16-byte loads, all issued before use).
template <typename T, int HD>
__device__ __forceinline__ float dot_q(const float* qs, const T* row) {
  float p = 0.f;
  if constexpr (sizeof(T) == 2) {
    uint4 raw[HD / 8];
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) raw[i] = __ldcg(reinterpret_cast<const uint4*>(row) + i);
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) {
      const T* h = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
      for (int k = 0; k < 8; ++k) p = fmaf(qs[8 * i + k], tof(h[k]), p);
    }
  } else {
    float4 raw[HD / 4];
#pragma unroll
    for (int i = 0; i < HD / 4; ++i) raw[i] = __ldcg(reinterpret_cast<const float4*>(row) + i);
#pragma unroll
    for (int i = 0; i < HD / 4; ++i) {
      p = fmaf(qs[4 * i], tof(raw[i].x), p);
      p = fmaf(qs[4 * i + 1], tof(raw[i].y), p);
      p = fmaf(qs[4 * i + 2], tof(raw[i].z), p);
      p = fmaf(qs[4 * i + 3], tof(raw[i].w), p);
    }
  }
  return p;
}

// Dequantize/convert row `row` (K values) of a table into float out[] (block-cooperative).
template <int BITS, int GS, typename ST>
__device__ __forceinline__ float table_value(const Mat<BITS, ST>& m, int row, int j) {
  constexpr int PW = Bits<BITS>::per_word;
  const int words = m.K / PW;
  const uint32_t w = __ldg(m.w + (size_t)row * words + j / PW);
  float q[PW];
  decode<BITS, ST>(w, q);
  float v = q[j % PW];
  if constexpr (BITS == 4 || BITS == 8) {
    const int g = j / GS;
    v = tof(m.s[(size_t)row * (m.K / GS) + g]) * v + tof(m.b[(size_t)row * (m.K / GS) + g]);
  }
  return v;
}


// Copy n floats (n % 4 == 0) from global scratch into shared memory, `xi` layout (block-cooperative,
// 16-byte L2 reads, all issued before any is used).
__device__ __forceinline__ void load_vec(float* dst, const float* src, int n) {
  for (int i = 4 * threadIdx.x; i < n; i += 4 * blockDim.x) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(src + i));
    *reinterpret_cast<float4*>(dst + xi(i)) = v;
  }
  __syncthreads();
}

// dst = rt<T>(rms_norm(src) * w) in the `xi` layout: src global float (n, n % 4 == 0), w (n) of
// dtype WT. `red` >= 32 floats.
template <typename T, typename WT>
__device__ __forceinline__ void rms_to_smem(float* dst, const float* src, const WT* w, int n, float eps,
                                            float* red) {
  float ss = 0.f;
  for (int i = 4 * threadIdx.x; i < n; i += 4 * blockDim.x) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(src + i));
    *reinterpret_cast<float4*>(dst + xi(i)) = v;
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  const float tot = block_sum(ss, red);
  const float inv = rsqrtf(tot / (float)n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[xi(i)] = rt<T>(dst[xi(i)] * inv * tof(w[i]));
  __syncthreads();
}

// (best, best_i) <- the warp's largest value, lowest index on ties (every lane gets it).
__device__ __forceinline__ void warp_argmax(float& best, int& best_i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (ov > best || (ov == best && oi < best_i)) {
      best = ov;
      best_i = oi;
    }
  }
}

// Sampling of one row of logits by one block (the reference's top-k + Gumbel race, as MLX's
// `_sample_with_noise`): x = logits / temp; keep x >= the k-th largest; argmax(x + g), first index
// on ties. greedy: argmax(logits). `buf` >= 2 * N floats of shared memory, N a power of two >= n.
template <int N>
__device__ int sample_row(const float* logits, const float* noise, int n, bool greedy, float temp, int top_k,
                          float* buf) {
  float* srt = buf;
  __shared__ float bv[32];
  __shared__ int bi[32];
  const int tid = threadIdx.x, nt = blockDim.x;
  float kth = -INFINITY;
  if (!greedy && top_k > 0 && top_k < n) {
    for (int i = tid; i < N; i += nt) srt[i] = i < n ? __ldcg(logits + i) / temp : -INFINITY;
    __syncthreads();
    // Bitonic sort, descending.
    for (int k = 2; k <= N; k <<= 1) {
      for (int j = k >> 1; j > 0; j >>= 1) {
        for (int i = tid; i < N; i += nt) {
          const int p = i ^ j;
          if (p > i) {
            const bool desc = (i & k) == 0;
            const float a = srt[i], b = srt[p];
            if (desc ? (a < b) : (a > b)) {
              srt[i] = b;
              srt[p] = a;
            }
          }
        }
        __syncthreads();
      }
    }
    kth = srt[top_k - 1];
    __syncthreads();
  }
  float best = -INFINITY;
  int best_i = 0x7fffffff;
  for (int i = tid; i < n; i += nt) {
    float v;
    if (greedy) {
      v = __ldcg(logits + i);
    } else {
      const float x = __ldcg(logits + i) / temp;
      v = x >= kth ? x + __ldg(noise + i) : -INFINITY;
    }
    if (v > best || (v == best && i < best_i)) {
      best = v;
      best_i = i;
    }
  }
  warp_argmax(best, best_i);
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) {
    bv[warp] = best;
    bi[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = nt >> 5;
    best = lane < nw ? bv[lane] : -INFINITY;
    best_i = lane < nw ? bi[lane] : 0x7fffffff;
    warp_argmax(best, best_i);
    if (lane == 0) bi[0] = best_i == 0x7fffffff ? 0 : best_i;
  }
  __syncthreads();
  const int r = bi[0];
  __syncthreads();
  return r;
}

}  // namespace ppx

// ---------------------------------------------------------------- temporal attention
namespace ppx {

// One query head's attention over ring keys j0..j1-1 (block-cooperative): index C stands for this
// step's key and value (kcur / vcur, float), the ring `slot` it will overwrite holds an older key and
// is skipped, and slots with pos[j] < 0 are empty. Writes the partial (max, sum, acc[HD]) to out.
// Each warp takes 32 keys at a time, one per lane (all key rows load at once), then accumulates
// their values with lanes over the head dims. q: the head's query (global, unscaled); kh / vh: the
// head's (C, HD) ring. Shared memory: xs >= HD + 64 + warps * HD floats.
template <typename T, int HD, int C>
__device__ __forceinline__ void attn_partial(float* xs, float* out, const float* q, const T* kh, const T* vh,
                                             const float* kcur, const float* vcur, const int* pos, int slot,
                                             int j0, int j1, float scale) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float* qs = xs;                       // HD
  float* wm = xs + HD;                  // nw (max) + nw (sum)
  float* wacc = wm + 2 * 32;            // nw * HD
  constexpr int DPL = HD / 32;          // value dims per lane (contiguous)
  for (int d = threadIdx.x; d < HD; d += blockDim.x) qs[d] = __ldcg(q + d) * scale;
  __syncthreads();
  float m = -INFINITY, ssum = 0.f;
  float acc[DPL];
#pragma unroll
  for (int k = 0; k < DPL; ++k) acc[k] = 0.f;
  for (int jb = j0 + warp * 32; jb < j1; jb += nw * 32) {
    const int j = jb + lane;
    const bool valid = j < j1 && (j == C || (j != slot && pos[j] >= 0));
    float p = -INFINITY;
    if (valid) p = j == C ? dot_q<float, HD>(qs, kcur) : dot_q<T, HD>(qs, kh + (size_t)j * HD);
    const float mb = warp_max(p);
    const float mn = fmaxf(m, mb);
    if (mn == -INFINITY) continue;    // no valid key yet (warp-uniform)
    const float corr = __expf(m - mn);
    const float e = valid ? __expf(p - mn) : 0.f;
    ssum = ssum * corr + warp_sum(e);
#pragma unroll
    for (int k = 0; k < DPL; ++k) acc[k] *= corr;
    const int nt = min(32, j1 - jb);
#pragma unroll 8
    for (int tt = 0; tt < nt; ++tt) {
      const float et = __shfl_sync(0xffffffffu, e, tt);
      const int jt = jb + tt;
      if (jt == C) {
#pragma unroll
        for (int k = 0; k < DPL; ++k) acc[k] += et * __ldcg(vcur + lane * DPL + k);
      } else {
        const T* vr = vh + (size_t)jt * HD + lane * DPL;
#pragma unroll
        for (int k = 0; k < DPL; ++k) acc[k] += et * tof(vr[k]);
      }
    }
    m = mn;
  }
  if (lane == 0) {
    wm[warp] = m;
    wm[32 + warp] = ssum;
  }
#pragma unroll
  for (int k = 0; k < DPL; ++k) wacc[warp * HD + lane * DPL + k] = acc[k];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < nw; ++w) M = fmaxf(M, wm[w]);
  if (M == -INFINITY) {
    for (int d = threadIdx.x; d < HD; d += blockDim.x) __stcg(out + 2 + d, 0.f);
    if (threadIdx.x == 0) {
      __stcg(out, -INFINITY);
      __stcg(out + 1, 0.f);
    }
  } else {
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
      float a = 0.f;
      for (int w = 0; w < nw; ++w) a += wm[w] == -INFINITY ? 0.f : wacc[w * HD + d] * __expf(wm[w] - M);
      __stcg(out + 2 + d, a);
    }
    if (threadIdx.x == 0) {
      float S = 0.f;
      for (int w = 0; w < nw; ++w) S += wm[w] == -INFINITY ? 0.f : wm[32 + w] * __expf(wm[w] - M);
      __stcg(out, M);
      __stcg(out + 1, S);
    }
  }
  __syncthreads();
}

// Dimension d of one head's attention output from its NCH partials (HD + 2 floats each, at p0).
template <int HD, int NCH>
__device__ __forceinline__ float attn_combine(const float* p0, int d) {
  float M = -INFINITY;
  for (int c = 0; c < NCH; ++c) M = fmaxf(M, __ldcg(p0 + c * (HD + 2)));
  float S = 0.f, A = 0.f;
  for (int c = 0; c < NCH; ++c) {
    const float mc = __ldcg(p0 + c * (HD + 2));
    if (mc == -INFINITY) continue;
    const float f = __expf(mc - M);
    S += __ldcg(p0 + c * (HD + 2) + 1) * f;
    A += __ldcg(p0 + c * (HD + 2) + 2 + d) * f;
  }
  return A / S;
}

}  // namespace ppx

// ---------------------------------------------------------------- depformer attention
namespace ppx {

// The input of depformer step s for one conversation, normalised for layer 0 (block-cooperative):
// x = rt(depformer_in(h, s) + E_s(prev)) (a negative token embeds as zeros, the reference's -1),
// written to `resid` by block 0, and rms_norm(x) * w1 into xb (xi layout). E_0 is the text table
// (te*), E_s for s >= 1 row (s - 1) * (CARD + 1) + prev of the stacked audio tables (ea*).
template <typename T, int BE, int GS, int DD, int CARD, typename ST, typename WT>
__device__ __forceinline__ void dep_step_input(float* xb, float* resid, const float* xin_s, int prev, int s,
                                               const WT* tew, const ST* tes, const ST* teb, const WT* eaw,
                                               const ST* eas, const ST* eab, const T* w1, float eps, float* red) {
  const int row = s == 0 ? prev : prev + (s - 1) * (CARD + 1);
  Mat<BE, ST> te{reinterpret_cast<const uint32_t*>(s == 0 ? tew : eaw), s == 0 ? tes : eas, s == 0 ? teb : eab, DD};
  float ss = 0.f;
  for (int i = threadIdx.x; i < DD; i += blockDim.x) {
    const float e = prev >= 0 ? rt<T>(table_value<BE, GS, ST>(te, row, i)) : 0.f;
    const float v = rt<T>(__ldcg(xin_s + i) + e);
    xb[xi(i)] = v;
    ss += v * v;
    if (blockIdx.x == 0) __stcg(resid + i, v);
  }
  const float inv = rsqrtf(block_sum(ss, red) / (float)DD + eps);
  for (int i = threadIdx.x; i < DD; i += blockDim.x) xb[xi(i)] = rt<T>(xb[xi(i)] * inv * tof(w1[i]));
  __syncthreads();
}

// Attention of one depformer query over this frame's steps 0..s, per head (block-cooperative; the
// kernels compute it in every block, redundantly): a[xi(e)] = rt<T>(sum_t softmax_t(q.k_t * scale) v_t[e]).
// q (DD), kb / vb (NS, DD) in global memory; sc >= NH * NS floats of shared memory. Ends synchronised.
template <typename T, int DD, int NH, int NS>
__device__ __forceinline__ void dep_attention(float* a, float* sc, const float* q, const float* kb, const float* vb,
                                              int s, float scale) {
  constexpr int HDD = DD / NH;
  if (s == 0) {
    for (int e = threadIdx.x; e < DD; e += blockDim.x) a[xi(e)] = __ldcg(vb + e);  // one key: weight 1
  } else {
    for (int idx = threadIdx.x; idx < NH * (s + 1); idx += blockDim.x) {
      const int hh = idx / (s + 1), tt = idx % (s + 1);
      float p = 0.f;
      for (int d = 0; d < HDD; ++d)
        p += (__ldcg(q + hh * HDD + d) * scale) * __ldcg(kb + (size_t)tt * DD + hh * HDD + d);
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
}

}  // namespace ppx

// ---------------------------------------------------------------- several vectors at once
namespace ppx {

// mv_stage for NB input vectors at once (the batched server's depformer): xs holds nb <= NB vectors
// in the `xi` layout, `xstride` floats apart. Each weight vector is loaded and decoded once and
// dotted with every input vector. epi(g, n, acc) runs in lane n of one warp for each vector
// n < nb, acc = the R row sums of that vector.
template <int BITS, int GS, typename ST, int R, int NB, typename RowMap, typename Epi>
__device__ __forceinline__ void mv_rows(const Mat<BITS, ST>& m, int ngroups, const float* xs, int xstride, int nb,
                                        RowMap rowmap, Epi epi) {
  constexpr int PW = Bits<BITS>::per_word;
  constexpr int VV = 4 * PW;
  constexpr bool quant = BITS == 4 || BITS == 8;
  static_assert(NB <= 32, "one lane per input vector");
  __shared__ float part_rows[32 * R * NB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int nvec = m.K / VV;
  const int ks = mv_warps_per_group(nvec, nw);
  const int gpr = nw / ks;                               // row groups per block round
  const int gi = warp / ks, kk = warp % ks;
  const int ldk = m.ld ? m.ld : m.K;
  const int words = ldk / PW, groups = ldk / GS;
  for (int base = blockIdx.x * gpr; base < ngroups; base += gridDim.x * gpr) {
    const int g = base + gi;
    float a[R][NB];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int n = 0; n < NB; ++n) a[r][n] = 0.f;
    if (g < ngroups) {
      int rows[R];
      rowmap(g, rows);
      for (int v = kk * 32 + lane; v < nvec; v += ks * 32) {
        uint4 wv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) wv[r] = __ldg(reinterpret_cast<const uint4*>(m.w + (size_t)rows[r] * words) + v);
        const int b0 = v * VV;
        float xsum[NB];
#pragma unroll
        for (int n = 0; n < NB; ++n) {
          xsum[n] = 0.f;
          if constexpr (quant) {
            if (n < nb) {
              const float* xp = xs + n * xstride + xi(b0);
#pragma unroll
              for (int i = 0; i < VV; i += 4) {
                const float4 f = *reinterpret_cast<const float4*>(xp + i);
                xsum[n] += (f.x + f.y) + (f.z + f.w);
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t ws[4] = {wv[r].x, wv[r].y, wv[r].z, wv[r].w};
          float d[NB];
#pragma unroll
          for (int n = 0; n < NB; ++n) d[n] = 0.f;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            float q[PW];
            decode<BITS, ST>(ws[k], q);
#pragma unroll
            for (int n = 0; n < NB; ++n) {
              if (n < nb) {
                // a word's PW (<= 8) values lie inside one 32-float run of the padded layout
                const float* xp = xs + n * xstride + xi(b0 + k * PW);
                if constexpr (PW >= 4) {   // 16-byte aligned (xstride % 4 == 0): vector reads
#pragma unroll
                  for (int j = 0; j < PW; j += 4) {
                    const float4 f = *reinterpret_cast<const float4*>(xp + j);
                    d[n] = fmaf(q[j], f.x, d[n]);
                    d[n] = fmaf(q[j + 1], f.y, d[n]);
                    d[n] = fmaf(q[j + 2], f.z, d[n]);
                    d[n] = fmaf(q[j + 3], f.w, d[n]);
                  }
                } else {
#pragma unroll
                  for (int j = 0; j < PW; ++j) d[n] = fmaf(q[j], xp[j], d[n]);
                }
              }
            }
          }
          if constexpr (quant) {
            const int gq = b0 / GS;
            const float sc = tof(m.s[(size_t)rows[r] * groups + gq]);
            const float bi = tof(m.b[(size_t)rows[r] * groups + gq]);
#pragma unroll
            for (int n = 0; n < NB; ++n) a[r][n] = fmaf(sc, d[n], fmaf(bi, xsum[n], a[r][n]));
          } else {
#pragma unroll
            for (int n = 0; n < NB; ++n) a[r][n] += d[n];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int n = 0; n < NB; ++n) a[r][n] = warp_sum(a[r][n]);
    float mine[R];
    if (ks > 1) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int n = 0; n < NB; ++n) part_rows[(warp * R + r) * NB + n] = a[r][n];
      }
      __syncthreads();
      if (kk == 0 && g < ngroups && lane < nb) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float t = 0.f;
          for (int k = 0; k < ks; ++k) t += part_rows[((warp + k) * R + r) * NB + lane];
          mine[r] = t;
        }
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        mine[r] = 0.f;
#pragma unroll
        for (int n = 0; n < NB; ++n)
          if (n == lane) mine[r] = a[r][n];
      }
    }
    if (kk == 0 && g < ngroups && lane < nb) epi(g, lane, mine);
    if (ks > 1) __syncthreads();
  }
}

// ---- per-chunk prologues: all nb vectors of a chunk at once (one warp per vector, or the whole
// block over every element), so a chunk costs one block barrier whatever nb is. Each vector's
// arithmetic is the batch-1 helpers' (same expressions); only the norms sum in another order.

// dst + n * dstride = the n-th vector of src (n * sstride floats apart), `xi` layout (block-cooperative).
__device__ __forceinline__ void load_rows(float* dst, int dstride, const float* src, size_t sstride, int nb, int n) {
  const int per = n / 4;
#pragma unroll 4
  for (int i = threadIdx.x; i < nb * per; i += blockDim.x) {
    const int r = i / per, e = 4 * (i % per);
    const float4 v = __ldcg(reinterpret_cast<const float4*>(src + r * sstride + e));
    *reinterpret_cast<float4*>(dst + r * dstride + xi(e)) = v;
  }
  __syncthreads();
}

// As rms_to_smem for nb vectors: each vector gets warps / nb warps (at least one), which sum their
// parts of it in shared memory. Each lane rescales only the elements it loaded itself.
template <typename T, typename WT>
__device__ __forceinline__ void rms_rows_to_smem(float* dst, int dstride, const float* src, size_t sstride, int nb,
                                                 const WT* w, int n, float eps) {
  __shared__ float rs[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int wpr = nb >= nw ? 1 : nw / nb;               // warps per vector
  const int at_once = nw / wpr, p = warp % wpr;
  for (int r = warp / wpr; r < nb; r += at_once) {
    float* d = dst + r * dstride;
    const float* sp = src + r * sstride;
    float ss = 0.f;
#pragma unroll 8
    for (int i = 4 * (p * 32 + lane); i < n; i += 128 * wpr) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(sp + i));
      *reinterpret_cast<float4*>(d + xi(i)) = v;
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = warp_sum(ss);
    if (lane == 0) rs[r * wpr + p] = ss;                  // r * wpr + p < 32: nb <= 32, wpr * nb <= nw
  }
  __syncthreads();
  for (int r = warp / wpr; r < nb; r += at_once) {
    float* d = dst + r * dstride;
    float tot = 0.f;
    for (int q = 0; q < wpr; ++q) tot += rs[r * wpr + q];
    const float inv = rsqrtf(tot / (float)n + eps);
    for (int i = 4 * (p * 32 + lane); i < n; i += 128 * wpr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) d[xi(i + k)] = rt<T>(d[xi(i + k)] * inv * tof(w[i + k]));
    }
  }
  __syncthreads();
}

// dep_step_input for one vector by one warp (the caller gives each warp its own vector; no barrier).
template <typename T, int BE, int GS, int DD, int CARD, typename ST, typename WT>
__device__ __forceinline__ void dep_step_input_warp(float* xb, float* resid, const float* xin_s, int prev, int s,
                                                    const WT* tew, const ST* tes, const ST* teb, const WT* eaw,
                                                    const ST* eas, const ST* eab, const T* w1, float eps) {
  const int lane = threadIdx.x & 31;
  const int row = s == 0 ? prev : prev + (s - 1) * (CARD + 1);
  Mat<BE, ST> te{reinterpret_cast<const uint32_t*>(s == 0 ? tew : eaw), s == 0 ? tes : eas, s == 0 ? teb : eab, DD};
  float ss = 0.f;
#pragma unroll 8
  for (int i = lane; i < DD; i += 32) {
    const float e = prev >= 0 ? rt<T>(table_value<BE, GS, ST>(te, row, i)) : 0.f;
    const float v = rt<T>(__ldcg(xin_s + i) + e);
    xb[xi(i)] = v;
    ss += v * v;
    if (blockIdx.x == 0) __stcg(resid + i, v);
  }
  const float inv = rsqrtf(warp_sum(ss) / (float)DD + eps);
  for (int i = lane; i < DD; i += 32) xb[xi(i)] = rt<T>(xb[xi(i)] * inv * tof(w1[i]));
}

// dep_attention for nb vectors at once (block-cooperative, 4 barriers for the whole chunk): vector
// n's query at q0 + n * DD, its keys / values (NS, DD) at k0 / v0 + n * kvstride, its output at
// a0 + n * astride (`xi` layout). sm >= nb * (NH * NS + DD) floats of shared memory (scores, then the
// scaled queries). Every thread issues all the loads of an item before using them (16-byte key
// rows; one value per step held in registers), so an item costs one L2 round trip, not one per
// element. The sums run in dep_attention's order. Ends synchronised.
template <typename T, int DD, int NH, int NS>
__device__ __forceinline__ void dep_attention_rows(float* a0, int astride, float* sm, const float* q0, const float* k0,
                                                   const float* v0, size_t kvstride, int nb, int s, float scale) {
  constexpr int HDD = DD / NH;
  static_assert(HDD % 4 == 0 && DD % 4 == 0, "16-byte rows");
  if (s == 0) {
    for (int i = threadIdx.x; i < nb * DD / 4; i += blockDim.x) {
      const int n = i / (DD / 4), e = 4 * (i % (DD / 4));
      *reinterpret_cast<float4*>(a0 + n * astride + xi(e)) =
          __ldcg(reinterpret_cast<const float4*>(v0 + n * kvstride + e));   // one key: weight 1
    }
    __syncthreads();
    return;
  }
  float* sc = sm;                      // (nb, NH, NS)
  float* qs = sm + nb * NH * NS;       // (nb, DD) queries * scale
  for (int i = threadIdx.x; i < nb * DD; i += blockDim.x) qs[i] = __ldcg(q0 + i) * scale;
  __syncthreads();
  const int per = NH * (s + 1);
  for (int idx = threadIdx.x; idx < nb * per; idx += blockDim.x) {
    const int n = idx / per, hh = (idx % per) / (s + 1), tt = (idx % per) % (s + 1);
    float4 kr[HDD / 4];
    const float4* kp = reinterpret_cast<const float4*>(k0 + n * kvstride + (size_t)tt * DD + hh * HDD);
#pragma unroll
    for (int i = 0; i < HDD / 4; ++i) kr[i] = __ldcg(kp + i);
    const float* q = qs + n * DD + hh * HDD;
    float p = 0.f;
#pragma unroll
    for (int i = 0; i < HDD / 4; ++i) {
      p += q[4 * i] * kr[i].x;
      p += q[4 * i + 1] * kr[i].y;
      p += q[4 * i + 2] * kr[i].z;
      p += q[4 * i + 3] * kr[i].w;
    }
    sc[(n * NH + hh) * NS + tt] = p;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nb * NH; i += blockDim.x) {
    float* r = sc + i * NS;
    float m = -INFINITY;
    for (int tt = 0; tt <= s; ++tt) m = fmaxf(m, r[tt]);
    float sum = 0.f;
    for (int tt = 0; tt <= s; ++tt) {
      const float e = __expf(r[tt] - m);
      r[tt] = e;
      sum += e;
    }
    for (int tt = 0; tt <= s; ++tt) r[tt] /= sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nb * DD; i += blockDim.x) {
    const int n = i / DD, e = i % DD;
    const float* vb = v0 + n * kvstride + e;
    const float* r = sc + (n * NH + e / HDD) * NS;
    float vv[NS];
#pragma unroll
    for (int tt = 0; tt < NS; ++tt) vv[tt] = tt <= s ? __ldcg(vb + (size_t)tt * DD) : 0.f;
    float acc = 0.f;
#pragma unroll
    for (int tt = 0; tt < NS; ++tt)
      if (tt <= s) acc += r[tt] * vv[tt];
    a0[n * astride + xi(e)] = rt<T>(acc);
  }
  __syncthreads();
}

// mv_rows epilogue of a SiLU-gating stage (GatePairs rows) for a chunk: hid[n * stride + 2g + i] =
// silu(gate) * up, rounded where the MLX graph rounds (as GateEpi).
template <typename T>
struct GateRowsEpi {
  float* hid;          // the chunk's first row
  int stride;
  __device__ __forceinline__ void operator()(int g, int n, const float* acc) const {
    float* hb = hid + (size_t)n * stride + 2 * g;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float ga = rt<T>(acc[i]), up = rt<T>(acc[i + 2]);
      const float sg = rt<T>(1.f / (1.f + __expf(-ga)));
      __stcg(hb + i, rt<T>(rt<T>(ga * sg) * up));
    }
  }
};

// mv_rows epilogue of a projection into the residual streams of a chunk (Consecutive rows):
// resid[n * stride + row] += W x_n.
template <typename T, int R>
struct ResidRowsEpi {
  float* resid;        // the chunk's first row
  int stride;
  __device__ __forceinline__ void operator()(int g, int n, const float* acc) const {
    float* rs = resid + (size_t)n * stride + g * R;
#pragma unroll
    for (int r = 0; r < R; ++r) __stcg(rs + r, rt<T>(__ldcg(rs + r) + rt<T>(acc[r])));
  }
};

}  // namespace ppx
