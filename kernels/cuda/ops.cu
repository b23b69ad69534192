// Row and elementwise ops on f32 activations: norms, rotary embedding (YaRN included), GLUs, add,
// soft-cap, conversions, KV writes by position, row selection, MoE routing and expert biases,
// multi-head latent attention's K row, query rope and head routes.

// Block-wide sum for blockDim.x <= 1024 (multiple of 32).
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    const int nw = blockDim.x >> 5;
    float s = 0.f;
    for (int i = 0; i < nw; i++) s += red[i];
    return s;
}

// yr = xr / rms(xr) * w over cols values, by the whole block.
__device__ __forceinline__ void block_rms_norm(const float* __restrict__ xr, const float* __restrict__ w,
                                               float* __restrict__ yr, int cols, float eps, float* red) {
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] * inv * w[c];
}

// y[r] = x[r] / rms(x[r]) * w. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int cols, float eps) {
    __shared__ float red[32];
    block_rms_norm(x + (i64)blockIdx.x * cols, w, y + (i64)blockIdx.x * cols, cols, eps, red);
}

// One head normalised in place and scaled by w[head_dim], by the 32 lanes of a warp.
__device__ __forceinline__ void head_norm_warp(float* __restrict__ xh, const float* __restrict__ w,
                                               int head_dim, float eps, int lane) {
    float ss = 0.f;
    for (int c = lane; c < head_dim; c += 32) ss += xh[c] * xh[c];
    ss = warp_sum(ss);
    const float inv = rsqrtf(ss / (float)head_dim + eps);
    for (int c = lane; c < head_dim; c += 32) xh[c] = xh[c] * inv * w[c];
}

// YaRN of a rope launch (see pshard_model::graph::RopeYarn): pair i's angle rate is multiplied by
// pos_scale (1 - r) + r with r = (1 - clamp((i - low) / max(0.001, high - low), 0, 1)) * ext, and
// the rotated values by mscale. ext = 0, mscale = 1: plain rope scaled by pos_scale.
struct RopeYarn {
    float low, high, ext, mscale;
};

// A rope launch's parameters, passed by value (RopeKArg in kernels.rs, same layout): rotated
// dimensions per head, pairing (0: adjacent pairs (2i, 2i+1); 1: NEOX halves (i, i + n_dims/2)),
// frequency base, position scale, per-pair frequency divisors (or null), YaRN.
struct RopeP {
    int n_dims;
    int mode;
    float base;
    float pos_scale;
    const float* freq_factors;
    RopeYarn y;
};

// Pair i's angle per unit of (unscaled) position: base^(-2i/n_dims) / freq_factors[i] *
// (pos_scale, or YaRN's mix).
__device__ __forceinline__ float rope_rate(int i, const RopeP& r) {
    float inv_freq = powf(r.base, -2.0f * (float)i / (float)r.n_dims);
    if (r.freq_factors) inv_freq /= r.freq_factors[i];
    float factor = r.pos_scale;
    if (r.y.ext != 0.f) {
        const float m =
            (1.f - fminf(1.f, fmaxf(0.f, ((float)i - r.y.low) / fmaxf(0.001f, r.y.high - r.y.low)))) * r.y.ext;
        factor = r.pos_scale * (1.f - m) + m;
    }
    return inv_freq * factor;
}

// sin and cos of pair i at position pos (unscaled), both times the YaRN magnitude.
__device__ __forceinline__ void rope_sincos(int i, float pos, const RopeP& r, float* s, float* c) {
    sincosf(pos * rope_rate(i, r), s, c);
    *s *= r.y.mscale;
    *c *= r.y.mscale;
}

// Rotates pair i of one head from src into dst (they may be the same).
__device__ __forceinline__ void rope_pair_to(const float* src, float* dst, int i, float pos, const RopeP& r) {
    float s, c;
    rope_sincos(i, pos, r, &s, &c);
    const int a = r.mode == 0 ? 2 * i : i;
    const int b = r.mode == 0 ? 2 * i + 1 : i + r.n_dims / 2;
    const float x0 = src[a], x1 = src[b];
    dst[a] = x0 * c - x1 * s;
    dst[b] = x0 * s + x1 * c;
}

// In place: each head_dim slice of each row normalised and scaled by w[head_dim]. One warp per head.
extern "C" __global__ void head_rms_norm(float* __restrict__ x, const float* __restrict__ w,
                                         int n_heads_total, int head_dim, float eps) {
    const int lane = threadIdx.x & 31;
    const i64 h = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (h >= n_heads_total) return;
    head_norm_warp(x + h * head_dim, w, head_dim, eps, lane);
}

// Rotary embedding in place (see RopeP). x: [n_tokens, n_heads * head_dim]; one thread per rotated
// pair.
extern "C" __global__ void rope(float* __restrict__ x, const i32* __restrict__ pos, int n_tokens,
                                int n_heads, int head_dim, RopeP r) {
    const int half = r.n_dims / 2;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 total = (i64)n_tokens * n_heads * half;
    if (idx >= total) return;
    const int i = (int)(idx % half);
    const i64 th = idx / half;
    const int t = (int)(th / n_heads);
    float* xh = x + th * head_dim;
    rope_pair_to(xh, xh, i, (float)pos[t], r);
}

// Rope of n_heads heads per row from src into dst (multi-head latent attention's query and key
// parts): head h reads src[t * ld_src + h * src_stride + src_off ..][..n_dims] and writes
// dst[t * ld_dst + h * dst_stride + dst_off ..]. One thread per rotated pair.
extern "C" __global__ void rope_heads(const float* __restrict__ src, int ld_src, int src_stride, int src_off,
                                      float* __restrict__ dst, int ld_dst, int dst_stride, int dst_off,
                                      int n_heads, const i32* __restrict__ pos, int n_tokens, RopeP r) {
    const int half = r.n_dims / 2;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)n_tokens * n_heads * half) return;
    const int i = (int)(idx % half);
    const i64 th = idx / half;
    const int t = (int)(th / n_heads), h = (int)(th % n_heads);
    rope_pair_to(src + (i64)t * ld_src + h * src_stride + src_off, dst + (i64)t * ld_dst + h * dst_stride + dst_off,
                 i, (float)pos[t], r);
}

// Multi-head latent attention's K row, one block per token: out[..kv_lora] = x[..kv_lora] /
// rms · w (eps), out[kv_lora ..][..r.n_dims] = x[kv_lora ..] roped (one head). Rows: x with stride
// ldx, out with stride ldo.
extern "C" __global__ void mla_kv(const float* __restrict__ x, int ldx, const float* __restrict__ w,
                                  float* __restrict__ out, int ldo, int kv_lora, float eps,
                                  const i32* __restrict__ pos, RopeP r) {
    __shared__ float red[32];
    const float* xr = x + (i64)blockIdx.x * ldx;
    float* yr = out + (i64)blockIdx.x * ldo;
    block_rms_norm(xr, w, yr, kv_lora, eps, red);
    for (int i = threadIdx.x; i < r.n_dims / 2; i += blockDim.x)
        rope_pair_to(xr + kv_lora, yr + kv_lora, i, (float)pos[blockIdx.x], r);
}

// Every pair of a latent-attention head matmul is routed to its head: route[t] = (0, 1, ...,
// n_heads - 1, then n_heads weights of 1), the routes moe_gemv and moe_sort read.
extern "C" __global__ void head_route(u32* __restrict__ route, int n_tokens, int n_heads) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)n_tokens * 2 * n_heads) return;
    const int j = (int)(i % (2 * n_heads));
    route[i] = j < n_heads ? (u32)j : __float_as_uint(1.f);
}

// The q and k heads of a batch in one launch, one warp per head: optional per-head RMSNorm (weights
// qw / kw; null: none), then the rotary embedding — the same device functions as head_rms_norm and
// rope above, so the results are identical. q: [n_tokens, n_q * head_dim], k: [n_tokens,
// n_k * head_dim].
extern "C" __global__ void qk_norm_rope(float* __restrict__ q, float* __restrict__ k,
                                        const float* __restrict__ qw, const float* __restrict__ kw,
                                        float eps, const i32* __restrict__ pos, int n_tokens,
                                        int n_q, int n_k, int head_dim, RopeP r) {
    const int lane = threadIdx.x & 31;
    const i64 h = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int per_token = n_q + n_k;
    if (h >= (i64)n_tokens * per_token) return;
    const int t = (int)(h / per_token);
    const int j = (int)(h % per_token);
    float* xh = j < n_q ? q + ((i64)t * n_q + j) * head_dim : k + ((i64)t * n_k + (j - n_q)) * head_dim;
    const float* w = j < n_q ? qw : kw;
    if (w) {
        head_norm_warp(xh, w, head_dim, eps, lane);
        // The rotation pairs values written by other lanes.
        __syncwarp();
    }
    const float p = (float)pos[t];
    for (int i = lane; i < r.n_dims / 2; i += 32) rope_pair_to(xh, xh, i, p, r);
}

// Context shift of one sequence's KV rows in place (f16, `cols` per row): cell moves in runs
// (moves[2m] = source cell, moves[2m + 1] = destination; run r covers moves run_start[r] ..
// run_start[r + 1]; when cyclic[r], its last move's source is read before anything is written).
// Block x = run, block y and thread = a pair of values of a row, so each thread does the moves
// of its run in order on its own values and reads nothing another thread writes. In each head of
// head_dim, the r.n_dims values from rope_off on (r.n_dims = 0: none, V) turn by delta positions
// with rope_rate's angles and without the YaRN magnitude (the cached K carries it already); the
// other values are copied.
extern "C" __global__ void kv_shift(u16* __restrict__ rows, int cols, const i32* __restrict__ moves,
                                    const i32* __restrict__ run_start, const i32* __restrict__ cyclic,
                                    int head_dim, int rope_off, float delta, RopeP r) {
    const int u = blockIdx.y * blockDim.x + threadIdx.x;
    if (u >= cols / 2) return;
    const int run = blockIdx.x;
    const int m0 = run_start[run], m1 = run_start[run + 1];
    if (m1 <= m0) return;
    const int per_head = head_dim / 2, h = u / per_head, j = u % per_head - rope_off / 2;
    int a = h * head_dim + 2 * (u % per_head), b = a + 1;
    float s = 0.f, c = 1.f;
    if (j >= 0 && j < r.n_dims / 2) {
        a = h * head_dim + rope_off + (r.mode == 0 ? 2 * j : j);
        b = r.mode == 0 ? a + 1 : a + r.n_dims / 2;
        sincosf(delta * rope_rate(j, r), &s, &c);
    }
    u16 sa = 0, sb = 0;
    if (cyclic[run]) {
        const i64 src = moves[2 * (m1 - 1)];
        sa = rows[src * cols + a];
        sb = rows[src * cols + b];
    }
    for (int m = m0; m < m1; m++) {
        const i64 src = moves[2 * m], dst = moves[2 * m + 1];
        const bool saved = cyclic[run] && m + 1 == m1;
        const float x0 = h2f(saved ? sa : rows[src * cols + a]);
        const float x1 = h2f(saved ? sb : rows[src * cols + b]);
        rows[dst * cols + a] = f2h(x0 * c - x1 * s);
        rows[dst * cols + b] = f2h(x0 * s + x1 * c);
    }
}

// Stores lane's value v of a 32-value block as GGUF Q8_0 at b (34 bytes, 2-byte aligned), one
// warp per block: d = max|x| / 127 as f16, q = round-to-nearest-even(x * (1 / d)) — the CPU's
// Q8_0 quantizer, bit for bit.
__device__ __forceinline__ void q8_0_store_warp(float v, int lane, u8* __restrict__ b) {
    const float amax = warp_max(fabsf(v));
    const float d = __fdiv_rn(amax, 127.f);
    const float id = d != 0.f ? __fdiv_rn(1.f, d) : 0.f;
    b[2 + lane] = (u8)(i8)__float2int_rn(__fmul_rn(v, id));
    if (lane == 0) *(u16*)b = f2h(d);
}

// kv_shift for a Q8_0 cache (rows of cols / 32 blocks of 34 bytes). Block x = run, block y = one
// head of head_dim values (a multiple of 32, so whole blocks), 256 threads; dynamic shared memory
// head_dim f32 + the head's bytes. Per move: without rope (r.n_dims = 0) the head's bytes are
// copied; with rope the head is dequantized into shared memory, its pairs turned as kv_shift
// turns them, and quantized afresh (one warp per block), barriers between the phases and moves.
extern "C" __global__ void kv_shift_q8_0(u8* __restrict__ rows, int cols, const i32* __restrict__ moves,
                                         const i32* __restrict__ run_start, const i32* __restrict__ cyclic,
                                         int head_dim, int rope_off, float delta, RopeP r) {
    extern __shared__ __align__(16) float shx[];
    u8* saved = (u8*)(shx + head_dim);
    const int run = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31, nw = blockDim.x >> 5;
    const int m0 = run_start[run], m1 = run_start[run + 1];
    if (m1 <= m0) return;
    const int nb = head_dim / 32, hb = nb * 34;
    const i64 rowb = (i64)(cols / 32) * 34, hoff = (i64)h * hb;
    const bool cyc = cyclic[run] != 0;
    if (cyc) {
        const i64 src = moves[2 * (m1 - 1)];
        for (int i = tid; i < hb; i += blockDim.x) saved[i] = rows[src * rowb + hoff + i];
    }
    __syncthreads();
    for (int m = m0; m < m1; m++) {
        const i64 src = moves[2 * m], dst = moves[2 * m + 1];
        const u8* from = cyc && m + 1 == m1 ? saved : rows + src * rowb + hoff;
        u8* to = rows + dst * rowb + hoff;
        if (r.n_dims == 0) {
            for (int i = tid; i < hb; i += blockDim.x) to[i] = from[i];
            __syncthreads();
            continue;
        }
        for (int i = tid; i < head_dim; i += blockDim.x) {
            const u8* b = from + (i >> 5) * 34;
            shx[i] = (float)(i8)b[2 + (i & 31)] * h2f(ld16(b));
        }
        __syncthreads();
        for (int j = tid; j < r.n_dims / 2; j += blockDim.x) {
            const int a = rope_off + (r.mode == 0 ? 2 * j : j);
            const int b = r.mode == 0 ? a + 1 : a + r.n_dims / 2;
            float sn, cs;
            sincosf(delta * rope_rate(j, r), &sn, &cs);
            const float x0 = shx[a], x1 = shx[b];
            shx[a] = x0 * cs - x1 * sn;
            shx[b] = x0 * sn + x1 * cs;
        }
        __syncthreads();
        for (int blk = warp; blk < nb; blk += nw) q8_0_store_warp(shx[blk * 32 + lane], lane, to + blk * 34);
        __syncthreads();
    }
}

// out = act(gate, up). act 0: SiLU(gate) * up; 1: GELU(gate) (tanh approximation) * up; 2: gpt-oss's
// clamped SwiGLU, g = min(gate, limit), u = clamp(up, -limit, limit), g * sigmoid(alpha g) * (u + 1).
extern "C" __global__ void glu(const float* __restrict__ gate, const float* __restrict__ up,
                               float* __restrict__ out, i64 n, int act, float alpha, float limit) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    if (act == 2) {
        const float x = fminf(g, limit);
        const float u = fminf(fmaxf(up[i], -limit), limit);
        out[i] = x / (1.f + expf(-alpha * x)) * (u + 1.f);
        return;
    }
    float a;
    if (act == 0) {
        a = g / (1.f + expf(-g));
    } else {
        const float k = 0.7978845608028654f;  // sqrt(2/pi)
        a = 0.5f * g * (1.f + tanhf(k * (g + 0.044715f * g * g * g)));
    }
    out[i] = a * up[i];
}

extern "C" __global__ void add(const float* __restrict__ a, const float* __restrict__ b,
                               float* __restrict__ out, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

// x = cap * tanh(x / cap), in place.
extern "C" __global__ void softcap(float* __restrict__ x, i64 n, float cap) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}

extern "C" __global__ void scale(float* __restrict__ x, i64 n, float s) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ x, u16* __restrict__ y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i]);
}

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, u16* __restrict__ y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2bf(x[i]);
}

// KV write by index: the cell of token t is seq[t] * cells + pos[t] % cells (each sequence owns
// `cells` consecutive cells, a ring for sliding-window layers); cache[cell, :] = f16(src[t, :]).
// Grid (ceil(row/256), n_tokens). Positions < 0 (padding rows) are skipped.
extern "C" __global__ void kv_write(const float* __restrict__ src, int ld_src, u16* __restrict__ cache,
                                    int row, const i32* __restrict__ pos, const i32* __restrict__ seq,
                                    int cells) {
    const int t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int p = pos[t];
    if (c >= row || p < 0) return;
    const i64 cell = (i64)seq[t] * cells + p % cells;
    cache[cell * row + c] = f2h(src[(i64)t * ld_src + c]);
}

// kv_write for a Q8_0 cache: cell rows of row / 32 blocks of 34 bytes (row a multiple of 32), each
// block quantized by one warp (q8_0_store_warp). Grid (ceil(row / 32 / 8), n_tokens), 256 threads.
extern "C" __global__ void kv_write_q8_0(const float* __restrict__ src, int ld_src, u8* __restrict__ cache,
                                         int row, const i32* __restrict__ pos, const i32* __restrict__ seq,
                                         int cells) {
    const int t = blockIdx.y;
    const int blk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const int p = pos[t];
    // Uniform per warp.
    if (blk >= row / 32 || p < 0) return;
    const i64 cell = (i64)seq[t] * cells + p % cells;
    u8* b = cache + cell * (row / 32) * 34 + (i64)blk * 34;
    q8_0_store_warp(src[(i64)t * ld_src + blk * 32 + lane], lane, b);
}

// out[i, :] = x[rows[i], :]. Grid (ceil(cols/256), n_out).
extern "C" __global__ void select_rows(const float* __restrict__ x, const i32* __restrict__ rows,
                                       float* __restrict__ out, int cols) {
    const int i = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) out[(i64)i * cols + c] = x[(i64)rows[i] * cols + c];
}

// The gated value of logit v: gating 0 softmax (v - mx, over sum), 1 sigmoid, 2 the raw logit.
__device__ __forceinline__ float gate_value(float v, int gating, float mx, float sum) {
    return gating == 0 ? expf(v - mx) / sum : gating == 1 ? 1.f / (1.f + expf(-v)) : v;
}

// MoE router, one warp per token, as llama.cpp's build_moe_ffn: gated values (gating above),
// `sel_bias` (n_expert f32, or null) added for choosing only, group limit (n_groups > 1: groups of
// n_expert / n_groups experts score the sum of their two best, all but the n_groups_used best are
// masked; n_groups <= 32), the top n_used (ties: lowest id), their gated values as weights —
// softmaxed among themselves for gating 2 —, renormalised (sum clamped at 2^-14) when `normalize`
// and scaled by `scale`. `forced` (n_tokens x n_used expert ids, or null): a token whose row does
// not start with ROUTE_FREE takes those experts instead of choosing (ids checked < n_expert by the
// host), weighted by the same steps. route row: n_used expert ids (u32) then n_used f32 weights.
#define ROUTE_FREE 0xffffffffu
extern "C" __global__ void moe_route(const float* __restrict__ logits, int n_tokens, int n_expert,
                                     int n_used, int gating, const float* __restrict__ sel_bias,
                                     int n_groups, int n_groups_used, int normalize, float scale,
                                     const u32* __restrict__ forced, u32* __restrict__ route) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= n_tokens) return;
    const float* l = logits + (i64)t * n_expert;
    float mx = NEG_INF;
    for (int e = lane; e < n_expert; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < n_expert; e += 32) sum += expf(l[e] - mx);
    sum = warp_sum(sum);
    u32* out = route + (i64)t * 2 * n_used;
    float* wout = (float*)(out + n_used);
    // One row per warp: the branch is uniform across the warp's lanes.
    const u32* f = forced ? forced + (i64)t * n_used : nullptr;
    if (f && f[0] != ROUTE_FREE) {
        if (lane == 0)
            for (int k = 0; k < n_used; k++) {
                out[k] = f[k];
                wout[k] = gate_value(l[f[k]], gating, mx, sum);
            }
    } else {
        // Allowed groups, one bit each (all when there is no group limit).
        u32 groups_ok = 0xffffffffu;
        if (n_groups > 1) {
            const int per = n_expert / n_groups;
            float score_mine = NEG_INF;  // lane g keeps group g's score
            for (int g = 0; g < n_groups; g++) {
                float b0 = NEG_INF, b1 = NEG_INF;
                for (int e = g * per + lane; e < (g + 1) * per; e += 32) {
                    const float v = gate_value(l[e], gating, mx, sum) + (sel_bias ? sel_bias[e] : 0.f);
                    if (v > b0) { b1 = b0; b0 = v; } else if (v > b1) { b1 = v; }
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const float o0 = __shfl_xor_sync(0xffffffffu, b0, o);
                    const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
                    const float hi = fmaxf(b0, o0);
                    b1 = fmaxf(fminf(b0, o0), fmaxf(b1, o1));
                    b0 = hi;
                }
                if (lane == g) score_mine = per < 2 ? b0 : b0 + b1;
            }
            groups_ok = 0;
            for (int k = 0; k < n_groups_used; k++) {
                float best = lane < n_groups && !((groups_ok >> lane) & 1) ? score_mine : NEG_INF;
                int bi = lane < n_groups && !((groups_ok >> lane) & 1) ? lane : 0x7fffffff;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
                    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                    if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
                }
                groups_ok |= 1u << bi;
            }
        }
        const int per = n_groups > 1 ? n_expert / n_groups : n_expert;
        // Experts already chosen, one bit per lane-local index j (expert lane + 32 j; n_expert <= 1024).
        u32 taken = 0;
        for (int k = 0; k < n_used; k++) {
            float best = NEG_INF;
            int bi = 0x7fffffff;
            for (int e = lane, j = 0; e < n_expert; e += 32, j++) {
                if ((taken >> j) & 1 || !((groups_ok >> (e / per)) & 1)) continue;
                const float v = gate_value(l[e], gating, mx, sum) + (sel_bias ? sel_bias[e] : 0.f);
                if (v > best || (v == best && e < bi)) { best = v; bi = e; }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ob = __shfl_xor_sync(0xffffffffu, best, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
            }
            if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
            if (lane == 0) { out[k] = (u32)bi; wout[k] = gate_value(l[bi], gating, mx, sum); }
        }
    }
    __syncwarp();
    if (lane == 0) {
        if (gating == 2) {
            float m = NEG_INF, s = 0.f;
            for (int k = 0; k < n_used; k++) m = fmaxf(m, wout[k]);
            for (int k = 0; k < n_used; k++) s += (wout[k] = expf(wout[k] - m));
            for (int k = 0; k < n_used; k++) wout[k] /= s;
        }
        if (normalize) {
            float s = 0.f;
            for (int k = 0; k < n_used; k++) s += wout[k];
            s = fmaxf(s, 6.103515625e-5f);
            for (int k = 0; k < n_used; k++) wout[k] /= s;
        }
        if (scale != 1.f)
            for (int k = 0; k < n_used; k++) wout[k] *= scale;
    }
}

// Per-expert biases of expert FFN rows: h[i, :cols] += bias[e(i) * cols ..], where row i is pair
// p = order ? order[i] : row0 + i (token p / n_used, slot p % n_used) and e(i) its routed expert.
// Grid (ceil(cols/256), n_rows).
extern "C" __global__ void moe_add_bias(float* __restrict__ h, int ldh, const u32* __restrict__ route, int n_used,
                                        const i32* __restrict__ order, int row0, const float* __restrict__ bias,
                                        int cols) {
    const int i = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const int p = order ? order[i] : row0 + i;
    const u32 e = route[(i64)(p / n_used) * 2 * n_used + p % n_used];
    h[(i64)i * ldh + c] += bias[(i64)e * cols + c];
}

// out[t, :] = sum_s w[t, s] * h[t * n_used + s, :]. Grid (ceil(cols/256), n_tokens).
extern "C" __global__ void moe_combine(const float* __restrict__ h, const u32* __restrict__ route,
                                       int n_used, float* __restrict__ out, int cols) {
    const int t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const float* w = (const float*)(route + (i64)t * 2 * n_used + n_used);
    float acc = 0.f;
    for (int s = 0; s < n_used; s++) acc += w[s] * h[((i64)t * n_used + s) * cols + c];
    out[(i64)t * cols + c] = acc;
}

// Gathers rows for grouped expert matmuls: out[i, :cols] = f16(x[rows[i] / x_div, :cols]), x with
// row stride ldx.
extern "C" __global__ void gather_rows_f16(const float* __restrict__ x, int ldx, const i32* __restrict__ rows,
                                           int x_div, u16* __restrict__ out, int cols) {
    const int i = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) out[(i64)i * cols + c] = f2h(x[(i64)(rows[i] / x_div) * ldx + c]);
}

// Scatters rows back: y[rows[i], :] = x[i, :].
extern "C" __global__ void scatter_rows(const float* __restrict__ x, const i32* __restrict__ rows,
                                        float* __restrict__ y, int cols) {
    const int i = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) y[(i64)rows[i] * cols + c] = x[(i64)i * cols + c];
}

// y[t, r] += bias[r] for n_total = rows_y * cols values (row stride ldy >= cols).
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias, int cols, int ldy,
                                    i64 n_total) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_total) return;
    const i64 t = i / cols;
    const int r = (int)(i - t * cols);
    y[t * ldy + r] += bias[r];
}
