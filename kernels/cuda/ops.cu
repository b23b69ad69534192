// Row and elementwise ops on f32 activations: norms, rotary embedding, GLU, add, soft-cap,
// conversions, KV writes by position, row selection and MoE routing.

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

// y[r] = x[r] / rms(x[r]) * w. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int cols, float eps) {
    __shared__ float red[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    float* yr = y + (i64)blockIdx.x * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] * inv * w[c];
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

// Rotates pair i of one head at position p (already scaled): mode 0 pairs (2i, 2i+1), mode 1
// (i, i + n_dims/2); angle p * base^(-2i/n_dims) / freq_factors[i].
__device__ __forceinline__ void rope_pair(float* __restrict__ xh, int i, float p, int n_dims,
                                          int mode, float base,
                                          const float* __restrict__ freq_factors) {
    const int half = n_dims / 2;
    float inv_freq = powf(base, -2.0f * (float)i / (float)n_dims);
    if (freq_factors) inv_freq /= freq_factors[i];
    float s, c;
    sincosf(p * inv_freq, &s, &c);
    const int a = mode == 0 ? 2 * i : i;
    const int b = mode == 0 ? 2 * i + 1 : i + half;
    const float x0 = xh[a], x1 = xh[b];
    xh[a] = x0 * c - x1 * s;
    xh[b] = x0 * s + x1 * c;
}

// In place: each head_dim slice of each row normalised and scaled by w[head_dim]. One warp per head.
extern "C" __global__ void head_rms_norm(float* __restrict__ x, const float* __restrict__ w,
                                         int n_heads_total, int head_dim, float eps) {
    const int lane = threadIdx.x & 31;
    const i64 h = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (h >= n_heads_total) return;
    head_norm_warp(x + h * head_dim, w, head_dim, eps, lane);
}

// Rotary embedding in place. x: [n_tokens, n_heads * head_dim]; one thread per rotated pair.
// mode 0: adjacent pairs (2i, 2i+1); mode 1: NEOX halves (i, i + n_dims/2).
// theta = pos[t] * pos_scale * base^(-2i/n_dims) / freq_factors[i].
extern "C" __global__ void rope(float* __restrict__ x, const i32* __restrict__ pos, int n_tokens,
                                int n_heads, int head_dim, int n_dims, int mode, float base,
                                float pos_scale, const float* __restrict__ freq_factors) {
    const int half = n_dims / 2;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 total = (i64)n_tokens * n_heads * half;
    if (idx >= total) return;
    const int i = (int)(idx % half);
    const i64 th = idx / half;
    const int t = (int)(th / n_heads);
    rope_pair(x + th * head_dim, i, (float)pos[t] * pos_scale, n_dims, mode, base, freq_factors);
}

// The q and k heads of a batch in one launch, one warp per head: optional per-head RMSNorm (weights
// qw / kw; null: none), then the rotary embedding — the same device functions as head_rms_norm and
// rope above, so the results are identical. q: [n_tokens, n_q * head_dim], k: [n_tokens,
// n_k * head_dim].
extern "C" __global__ void qk_norm_rope(float* __restrict__ q, float* __restrict__ k,
                                        const float* __restrict__ qw, const float* __restrict__ kw,
                                        float eps, const i32* __restrict__ pos, int n_tokens,
                                        int n_q, int n_k, int head_dim, int n_dims, int mode,
                                        float base, float pos_scale,
                                        const float* __restrict__ freq_factors) {
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
    const float p = (float)pos[t] * pos_scale;
    for (int i = lane; i < n_dims / 2; i += 32) rope_pair(xh, i, p, n_dims, mode, base, freq_factors);
}

// Context shift of one sequence's KV rows in place (f16, `cols` per row): cell moves in runs
// (moves[2m] = source cell, moves[2m + 1] = destination; run r covers moves run_start[r] ..
// run_start[r + 1]; when cyclic[r], its last move's source is read before anything is written).
// Block x = run, block y and thread = a pair of values of a row, so each thread does the moves
// of its run in order on its own values and reads nothing another thread writes. Pairs the rope
// rotates (j < n_dims/2 in each head of head_dim; n_dims = 0: none, V) turn by delta positions
// with rope_pair's angles; the other values are copied.
extern "C" __global__ void kv_shift(u16* __restrict__ rows, int cols, const i32* __restrict__ moves,
                                    const i32* __restrict__ run_start,
                                    const i32* __restrict__ cyclic, int head_dim, int n_dims,
                                    int mode, float base, float pos_scale,
                                    const float* __restrict__ freq_factors, float delta) {
    const int u = blockIdx.y * blockDim.x + threadIdx.x;
    if (u >= cols / 2) return;
    const int r = blockIdx.x;
    const int m0 = run_start[r], m1 = run_start[r + 1];
    if (m1 <= m0) return;
    const int per_head = head_dim / 2, h = u / per_head, j = u % per_head;
    const bool rot = j < n_dims / 2;
    int a = h * head_dim + 2 * j, b = a + 1;
    float s = 0.f, c = 1.f;
    if (rot) {
        if (mode == 1) {
            a = h * head_dim + j;
            b = a + n_dims / 2;
        }
        float inv_freq = powf(base, -2.0f * (float)j / (float)n_dims);
        if (freq_factors) inv_freq /= freq_factors[j];
        sincosf(delta * pos_scale * inv_freq, &s, &c);
    }
    u16 sa = 0, sb = 0;
    if (cyclic[r]) {
        const i64 src = moves[2 * (m1 - 1)];
        sa = rows[src * cols + a];
        sb = rows[src * cols + b];
    }
    for (int m = m0; m < m1; m++) {
        const i64 src = moves[2 * m], dst = moves[2 * m + 1];
        const bool saved = cyclic[r] && m + 1 == m1;
        const float x0 = h2f(saved ? sa : rows[src * cols + a]);
        const float x1 = h2f(saved ? sb : rows[src * cols + b]);
        rows[dst * cols + a] = f2h(x0 * c - x1 * s);
        rows[dst * cols + b] = f2h(x0 * s + x1 * c);
    }
}

// out = act(gate) * up. act 0: SiLU; 1: GELU (tanh approximation).
extern "C" __global__ void glu(const float* __restrict__ gate, const float* __restrict__ up,
                               float* __restrict__ out, i64 n, int act) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
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

// out[i, :] = x[rows[i], :]. Grid (ceil(cols/256), n_out).
extern "C" __global__ void select_rows(const float* __restrict__ x, const i32* __restrict__ rows,
                                       float* __restrict__ out, int cols) {
    const int i = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) out[(i64)i * cols + c] = x[(i64)rows[i] * cols + c];
}

// MoE router, one warp per token: softmax over n_expert logits, top n_used (ties: lowest id),
// optional renormalisation. route row: n_used expert ids (u32) then n_used f32 weights.
extern "C" __global__ void moe_route(const float* __restrict__ logits, int n_tokens, int n_expert,
                                     int n_used, int normalize, u32* __restrict__ route) {
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
    // Experts already chosen, one bit per lane-local index j (expert lane + 32 j; n_expert <= 1024).
    u32 taken = 0;
    float wsum = 0.f;
    for (int k = 0; k < n_used; k++) {
        float best = NEG_INF;
        int bi = 0x7fffffff;
        for (int e = lane, j = 0; e < n_expert; e += 32, j++) {
            const float v = l[e];
            if (!((taken >> j) & 1) && (v > best || (v == best && e < bi))) { best = v; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        const float p = expf(best - mx) / sum;
        wsum += p;
        if (lane == 0) { out[k] = (u32)bi; wout[k] = p; }
    }
    if (normalize) {
        __syncwarp();
        if (lane == 0)
            for (int k = 0; k < n_used; k++) wout[k] /= wsum;
    }
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

// Gathers rows for grouped expert matmuls: out[i, :] = f16(x[rows[i] / x_div, :]).
extern "C" __global__ void gather_rows_f16(const float* __restrict__ x, const i32* __restrict__ rows,
                                           int x_div, u16* __restrict__ out, int cols) {
    const int i = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) out[(i64)i * cols + c] = f2h(x[(i64)(rows[i] / x_div) * cols + c]);
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
