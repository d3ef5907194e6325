// Decode attention over per-row KV rings, pass 2 of 2 (engine/models/ring_attn.py): merge the NCK
// chunk partials of ring_attn_part.cu into one output row per (row, head).
// Template: T, HD, NCK. Grid: B * H blocks of HD threads. Input: part (B, H, NCK, HD + 2) float.
// Output: o (B, H, HD) T.
const int bh = blockIdx.x, d = threadIdx.x;
const float* p = part + (size_t)bh * NCK * (HD + 2);
float M = -INFINITY;
for (int j = 0; j < NCK; ++j) M = fmaxf(M, p[j * (HD + 2)]);
float L = 0.f, acc = 0.f;
for (int j = 0; j < NCK; ++j) {
  const float mj = p[j * (HD + 2)];
  if (mj == -INFINITY) continue;
  const float w = exp2f(mj - M);
  L += p[j * (HD + 2) + 1] * w;
  acc += p[j * (HD + 2) + 2 + d] * w;
}
o[(size_t)bh * HD + d] = ppx::fromf<T>(L > 0.f ? acc / L : 0.f);
