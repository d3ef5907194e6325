// The encoder transformer of the fused Mimi step (spliced into the generated kernel body by
// engine/models/fused_mimi.py, which defines D, H, HD, FF, NTOK, CTX, RING, NL, eps, log2_base,
// the buffers xres / qb / ao / hid / kv and the stacked weights Wqkv ... Wls2).
// Per layer, 5 grid stages over the frame's NTOK tokens at positions off .. off+NTOK-1:
//   S1 LayerNorm + QKV with interleaved RoPE; K/V go into the ring slot pos % RING (in place)
//   S2 causal attention over the last CTX positions, one block per (token, head)
//   S3 out_proj, x += layer_scale_1 * y
//   S4 LayerNorm + linear1 + exact GELU
//   S5 linear2, x += layer_scale_2 * y
for (int l = 0; l < NL; ++l) {
  float* kr = kv + (size_t)l * 2 * RING * D;      // K ring (RING, D); V ring follows
  float* vr = kr + (size_t)RING * D;
  // ---- S1
  ln_to_smem<NTOK, D>(sm, xres, Wn1w + l * D, Wn1b + l * D, eps, red);
  mv_tok<NTOK, 2>(Wqkv + (size_t)l * 3 * D * D, 3 * D, D, sm, [&](int row, float (&acc)[NTOK][2]) {
    if ((threadIdx.x & 31) != 0) return;
    const int which = row / D, e = row % D;
#pragma unroll
    for (int t = 0; t < NTOK; ++t) {
      float a0 = acc[t][0], a1 = acc[t][1];
      const int p = off + t;
      if (which < 2) {
        const int j = (e % HD) >> 1;
        const float inv = exp2f(-((float)j / (float)(HD / 2)) * log2_base);
        float sn, cs;
        sincosf((float)p * inv, &sn, &cs);
        const float r0 = a0 * cs - a1 * sn, r1 = a0 * sn + a1 * cs;
        a0 = r0;
        a1 = r1;
      }
      float* dst = which == 0 ? qb + t * D : (which == 1 ? kr : vr) + (size_t)(p & (RING - 1)) * D;
      __stcg(dst + e, a0);
      __stcg(dst + e + 1, a1);
    }
  });
  grid_sync(sync, epoch);
  // ---- S2
  for (int task = blockIdx.x; task < NTOK * H; task += gridDim.x) {
    const int t = task / H, h = task % H;
    const int p = off + t;
    const int nk = p + 1 < CTX ? p + 1 : CTX;
    const int k0 = p - nk + 1;
    float* qs = sm;
    float* sc = sm + HD;
    float* part = sc + CTX + 8;
    const float scale = rsqrtf((float)HD);
    for (int d = threadIdx.x; d < HD; d += blockDim.x) qs[d] = __ldcg(qb + t * D + h * HD + d) * scale;
    __syncthreads();
    float mx_ = -INFINITY;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
      const float* kp = kr + (size_t)((k0 + j) & (RING - 1)) * D + h * HD;
      float s = 0.f;
      for (int d = 0; d < HD; d += 4) {
        const float4 kk = __ldcg(reinterpret_cast<const float4*>(kp + d));
        s = fmaf(qs[d], kk.x, fmaf(qs[d + 1], kk.y, fmaf(qs[d + 2], kk.z, fmaf(qs[d + 3], kk.w, s))));
      }
      sc[j] = s;
      mx_ = fmaxf(mx_, s);
    }
    // block max
    mx_ = warp_max(mx_);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx_;
    __syncthreads();
    {
      const int nw = blockDim.x >> 5;
      float m = (threadIdx.x & 31) < nw ? red[threadIdx.x & 31] : -INFINITY;
      mx_ = warp_max(m);
    }
    __syncthreads();
    float s = 0.f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
      const float e = __expf(sc[j] - mx_);
      sc[j] = e;
      s += e;
    }
    const float tot = block_sum(s, red);
    __syncthreads();
    const int NG = blockDim.x / HD;
    const int g = threadIdx.x / HD, d = threadIdx.x % HD;
    if (g < NG) {
      float acc = 0.f;
      for (int j = g; j < nk; j += NG) acc = fmaf(sc[j], __ldcg(vr + (size_t)((k0 + j) & (RING - 1)) * D + h * HD + d), acc);
      part[g * HD + d] = acc;
    }
    __syncthreads();
    if (threadIdx.x < HD) {
      float acc = 0.f;
      for (int k = 0; k < NG; ++k) acc += part[k * HD + threadIdx.x];
      __stcg(ao + t * D + h * HD + threadIdx.x, acc / tot);
    }
    __syncthreads();
  }
  grid_sync(sync, epoch);
  // ---- S3
  to_smem(sm, ao, NTOK * D);
  mv_tok<NTOK, 1>(Wout + (size_t)l * D * D, D, D, sm, [&](int row, float (&acc)[NTOK][1]) {
    if ((threadIdx.x & 31) != 0) return;
    const float g = __ldg(Wls1 + l * D + row);
#pragma unroll
    for (int t = 0; t < NTOK; ++t) __stcg(xres + t * D + row, __ldcg(xres + t * D + row) + g * acc[t][0]);
  });
  grid_sync(sync, epoch);
  // ---- S4
  ln_to_smem<NTOK, D>(sm, xres, Wn2w + l * D, Wn2b + l * D, eps, red);
  mv_tok<NTOK, 1>(Wl1 + (size_t)l * FF * D, FF, D, sm, [&](int row, float (&acc)[NTOK][1]) {
    if ((threadIdx.x & 31) != 0) return;
#pragma unroll
    for (int t = 0; t < NTOK; ++t) __stcg(hid + t * FF + row, gelu_erf(acc[t][0]));
  });
  grid_sync(sync, epoch);
  // ---- S5
  to_smem(sm, hid, NTOK * FF);
  mv_tok<NTOK, 1>(Wl2 + (size_t)l * D * FF, D, FF, sm, [&](int row, float (&acc)[NTOK][1]) {
    if ((threadIdx.x & 31) != 0) return;
    const float g = __ldg(Wls2 + l * D + row);
#pragma unroll
    for (int t = 0; t < NTOK; ++t) __stcg(xres + t * D + row, __ldcg(xres + t * D + row) + g * acc[t][0]);
  });
  grid_sync(sync, epoch);
}
