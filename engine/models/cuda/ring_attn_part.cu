// Decode attention over per-row KV rings, pass 1 of 2 (engine/models/ring_attn.py).
//
// One query per (row, head) against that row's ring of C slots; a slot whose stored position is
// negative is empty and skipped without reading its key or value, so a young conversation costs its
// filled slots only (MLX's masked attention reads the whole ring). Block (row b, head h, chunk j)
// covers slots [j * CH, j * CH + CH): its half-warps ("groups" of G = HD / 8 lanes, 8 channels per
// lane, one 16-byte load of a bf16 key row each) take one slot at a time, keep a running max, sum
// and weighted value sum (online softmax), and the block merges them into one partial
// (max, sum, HD sums) for ring_attn_combine.cu.
// Template: T (the query's dtype), H, HD, C, CH (slots per chunk), NT (threads). Grid: B * H * NCK
// blocks. Inputs: q (B, H, HD) T (after RoPE), k / v (rows >= B, H, C, HD) in the cache's dtype: T,
// or uint8 holding fp8 e4m3 (8 channels per lane: one 8-byte load), pos (B, C) int32, sc (1) float
// (the softmax scale). Output: part (B, H, NCK, HD + 2) float: [max, sum, acc...], max = -inf and
// sum = 0 for a chunk without a stored slot.
constexpr int G = HD / 8;                 // lanes per slot
constexpr int NG = NT / G;                // slot groups per block
constexpr int NCK = (C + CH - 1) / CH;
static_assert(HD % 8 == 0 && 32 % G == 0, "head_dim / 8 must divide 32");
__shared__ float s_m[NG], s_l[NG];
__shared__ float s_acc[NG][HD];
const int item = blockIdx.x;
const int j = item % NCK, bh = item / NCK;
const int b = bh / H;
const int grp = threadIdx.x / G, gl = threadIdx.x % G;
// The lanes of this group: the two groups of one warp may take different branches below.
const unsigned int gmask = G == 32 ? 0xffffffffu : (((1u << G) - 1u) << ((threadIdx.x & 31) / G * G));
const float scale = sc[0] * 1.4426950408889634f;     // exp2 domain
const int s0 = j * CH, s1 = min(C, s0 + CH);
const size_t base = (size_t)bh * C * HD + gl * 8;
float qf[8];
{
  const T* qp = q + (size_t)bh * HD + gl * 8;
#pragma unroll
  for (int i = 0; i < 8; ++i) qf[i] = ppx::tof(qp[i]) * scale;
}
float m = -INFINITY, l = 0.f, acc[8];
#pragma unroll
for (int i = 0; i < 8; ++i) acc[i] = 0.f;
const int* prow = pos + (size_t)b * C;
for (int s = s0 + grp; s < s1; s += NG) {
  if (prow[s] < 0) continue;                      // the whole group skips together (same s)
  float kf[8], vf[8];
  ppx::load8(k + base + (size_t)s * HD, kf);
  ppx::load8(v + base + (size_t)s * HD, vf);
  float d = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) d += qf[i] * kf[i];
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) d += __shfl_xor_sync(gmask, d, o, G);
  const float mn = fmaxf(m, d);
  const float corr = exp2f(m - mn), p = exp2f(d - mn);
  l = l * corr + p;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = acc[i] * corr + p * vf[i];
  m = mn;
}
if (gl == 0) { s_m[grp] = m; s_l[grp] = l; }
__syncthreads();
float M = -INFINITY;
for (int g = 0; g < NG; ++g) M = fmaxf(M, s_m[g]);
const float w = (m == -INFINITY) ? 0.f : exp2f(m - M);
#pragma unroll
for (int i = 0; i < 8; ++i) s_acc[grp][gl * 8 + i] = acc[i] * w;
__syncthreads();
float* out = part + (size_t)item * (HD + 2);
for (int d = threadIdx.x; d < HD; d += NT) {
  float t = 0.f;
  for (int g = 0; g < NG; ++g) t += s_acc[g][d];
  out[2 + d] = t;
}
if (threadIdx.x == 0) {
  float L = 0.f;
  for (int g = 0; g < NG; ++g) L += (s_m[g] == -INFINITY) ? 0.f : s_l[g] * exp2f(s_m[g] - M);
  out[0] = M;
  out[1] = L;
}
