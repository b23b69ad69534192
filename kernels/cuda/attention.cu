// Attention over an f16 KV cache of rows [n_kv * head_dim]: each sequence owns `cells` consecutive
// rows and position j of a sequence lives in row base + j % cells (a ring for sliding-window
// layers, whose cells hold the window plus one batch). Masks are computed here from the token
// positions: key j is visible to a query at position p when j <= p and (window == 0 or
// p - j < window). QK and softmax run in f32.
//
// A Q8_0 cache (the `_q8` kernels) holds each row as GGUF Q8_0 blocks (32 values: f16 scale d,
// 32 i8 q; 34 bytes), head dims multiples of 32 so every head is whole blocks. Its tiles are
// staged into the same f16 shared-memory tiles as the f16 cache's, each value q * d rounded to
// f16, with plain loads instead of cp.async (a block is only 2-byte aligned); everything after
// staging is the f16 kernels' code.

#define Q8_BLOCK 34

// Values o..o+7 (o a multiple of 8) of the Q8_0 block at b as eight f16 (q * d each).
__device__ __forceinline__ uint4 q8_0_unit_h(const u8* b, int o) {
    const float d = h2f(ld16(b));
    const u32 w0 = ld32_a2(b + 2 + o), w1 = ld32_a2(b + 2 + o + 4);
    uint4 r;
    r.x = pack_h2((float)(i8)(w0 & 0xff) * d, (float)(i8)((w0 >> 8) & 0xff) * d);
    r.y = pack_h2((float)(i8)((w0 >> 16) & 0xff) * d, (float)(i8)(w0 >> 24) * d);
    r.z = pack_h2((float)(i8)(w1 & 0xff) * d, (float)(i8)((w1 >> 8) & 0xff) * d);
    r.w = pack_h2((float)(i8)((w1 >> 16) & 0xff) * d, (float)(i8)(w1 >> 24) * d);
    return r;
}

// Values c..c+7 (c a multiple of 8) of a Q8_0 row starting at `row` as eight f16.
__device__ __forceinline__ uint4 q8_0_row_unit_h(const u8* row, int c) {
    return q8_0_unit_h(row + (c >> 5) * Q8_BLOCK, c & 31);
}

#define LOG2E 1.4426950408889634f

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float cap_score(float v, float softcap) {
    return softcap > 0.f ? softcap * tanhf(v / softcap) : v;
}

// Two B fragments (d-tiles dt and dt+1) of V for keys kk*16..+15, read transposed from row-major
// shared memory.
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// Flash-style prefill on tensor cores. Grid (ceil(n_tokens/64), n_head), 128 threads: each warp
// owns 16 query rows; K/V tiles of BKV keys are staged in shared memory by cp.async two stages
// deep (the next tile loads while this one computes), S = QK^T and O += PV use mma.m16n8k16 with
// f32 accumulators (V fragments via ldmatrix.trans), softmax is online (no n^2 buffer).
template <int D, int BKV, bool Q8>
__device__ __forceinline__ void flash_impl(const float* __restrict__ q, int ldq, const void* __restrict__ kcv,
                                           const void* __restrict__ vcv, float* __restrict__ out, int ldo,
                                           const i32* __restrict__ pos, int n_tokens, int n_head, int n_kv,
                                           int kv_base, int cells, float scale, float softcap, int window,
                                           const float* __restrict__ sinks) {
    extern __shared__ __align__(16) u16 smem[];
    const u16* kc = (const u16*)kcv;
    const u16* vc = (const u16*)vcv;
    const int KS = D + 8;
    const int TILE = BKV * KS;
    // Stage s: K at smem + 2*s*TILE, V at smem + (2*s+1)*TILE.
    __shared__ int spos[64];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, kvh = h / (n_head / n_kv);
    const int t0 = blockIdx.x * 64;
    if (threadIdx.x < 64) {
        const int t = t0 + threadIdx.x;
        spos[threadIdx.x] = t < n_tokens ? pos[t] : -1;
    }
    __syncthreads();
    int pmin = 0x7fffffff, pmax = -1;
    for (int i = 0; i < 64; i++) {
        const int p = spos[i];
        if (p >= 0) { pmin = min(pmin, p); pmax = max(pmax, p); }
    }
    const int r0 = t0 + warp * 16 + g, r1 = r0 + 8;
    const int p0 = spos[warp * 16 + g], p1 = spos[warp * 16 + g + 8];

    u32 qa[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        const int c = ks * 16 + 2 * tq;
        const float* q0 = q + (i64)r0 * ldq + h * D + c;
        const float* q1 = q + (i64)r1 * ldq + h * D + c;
        const bool v0 = r0 < n_tokens, v1 = r1 < n_tokens;
        qa[ks][0] = v0 ? pack_h2(q0[0], q0[1]) : 0u;
        qa[ks][1] = v1 ? pack_h2(q1[0], q1[1]) : 0u;
        qa[ks][2] = v0 ? pack_h2(q0[8], q0[9]) : 0u;
        qa[ks][3] = v1 ? pack_h2(q1[8], q1[9]) : 0u;
    }
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    // First key any row sees; tiles start at a multiple of BKV below it, and the keys in front
    // of it are zero-filled, never read: a cache staged from the host holds only visible cells,
    // and a masked score (P = 0) times a stale non-finite V would still poison the sum.
    const int j_vis = (window > 0 && pmax >= 0) ? max(0, pmin - window + 1) : 0;
    int j_lo = j_vis - j_vis % BKV;
    auto load_tile = [&](int stage, int j0) {
        u16* Ks = smem + 2 * stage * TILE;
        u16* Vs = Ks + TILE;
        for (int idx = threadIdx.x; idx < BKV * D / 8; idx += blockDim.x) {
            const int jr = idx / (D / 8), dc = (idx % (D / 8)) * 8;
            const int j = j0 + jr;
            const bool ok = j >= j_vis && j <= pmax;
            if (Q8) {
                uint4 kh = make_uint4(0u, 0u, 0u, 0u), vh = kh;
                if (ok) {
                    const i64 off = ((i64)(kv_base + j % cells) * n_kv + kvh) * (D / 32) * Q8_BLOCK;
                    kh = q8_0_row_unit_h((const u8*)kcv + off, dc);
                    vh = q8_0_row_unit_h((const u8*)vcv + off, dc);
                }
                *(uint4*)(Ks + jr * KS + dc) = kh;
                *(uint4*)(Vs + jr * KS + dc) = vh;
            } else {
                const i64 off = ok ? ((i64)(kv_base + j % cells) * n_kv + kvh) * D + dc : 0;
                cp_async16(Ks + jr * KS + dc, kc + off, ok);
                cp_async16(Vs + jr * KS + dc, vc + off, ok);
            }
        }
    };
    if (j_lo <= pmax) load_tile(0, j_lo);
    cp_async_commit();
    int stage = 0;
    for (int j0 = j_lo; j0 <= pmax; j0 += BKV, stage ^= 1) {
        if (j0 + BKV <= pmax) load_tile(stage ^ 1, j0 + BKV);
        cp_async_commit();
        cp_async_wait1();
        __syncthreads();
        const u16* Ks = smem + 2 * stage * TILE;
        const u16* Vs = Ks + TILE;

        float s[BKV / 8][4];
#pragma unroll
        for (int nt = 0; nt < BKV / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            const u16* kr = Ks + (nt * 8 + g) * KS + 2 * tq;
#pragma unroll
            for (int ks = 0; ks < D / 16; ks++) {
                const u32 b0 = *(const u32*)(kr + ks * 16);
                const u32 b1 = *(const u32*)(kr + ks * 16 + 8);
                mma16816(s[nt], qa[ks], b0, b1);
            }
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < BKV / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + nt * 8 + 2 * tq + (e & 1);
                const int p = e < 2 ? p0 : p1;
                const bool ok = p >= 0 && j <= p && (window <= 0 || p - j < window);
                const float v = ok ? cap_score(s[nt][e] * scale, softcap) : NEG_INF;
                s[nt][e] = v;
                if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float ref0 = mn0 == NEG_INF ? 0.f : mn0, ref1 = mn1 == NEG_INF ? 0.f : mn1;
        const float a0 = exp2f((m0 - ref0) * LOG2E), a1 = exp2f((m1 - ref1) * LOG2E);
        m0 = mn0; m1 = mn1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < BKV / 8; nt++) {
            s[nt][0] = exp2f((s[nt][0] - ref0) * LOG2E);
            s[nt][1] = exp2f((s[nt][1] - ref0) * LOG2E);
            s[nt][2] = exp2f((s[nt][2] - ref1) * LOG2E);
            s[nt][3] = exp2f((s[nt][3] - ref1) * LOG2E);
            sum0 += s[nt][0] + s[nt][1];
            sum1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * a0 + sum0;
        l1 = l1 * a1 + sum1;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            o[dt][0] *= a0; o[dt][1] *= a0;
            o[dt][2] *= a1; o[dt][3] *= a1;
        }
#pragma unroll
        for (int kk = 0; kk < BKV / 16; kk++) {
            u32 a[4];
            a[0] = pack_h2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_h2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_h2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_h2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            // ldmatrix.x4.trans: lanes 0-7 rows kk*16+0..7 / 8-15 rows +8..15 at column dt*8,
            // lanes 16-31 the same rows at column (dt+1)*8.
            const u16* vrow = Vs + (kk * 16 + (lane & 15)) * KS + (lane >> 4) * 8;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                u32 b[4];
                ldmatrix_x4_trans(b, vrow + dt * 8);
                mma16816(o[dt], a, b[0], b[1]);
                mma16816(o[dt + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    if (sinks) {
        // The head's sink joins each row's softmax denominator: rescale to the larger maximum.
        const float sk = sinks[h];
        const float n0 = fmaxf(m0, sk), n1 = fmaxf(m1, sk);
        const float a0 = __expf(m0 - n0), a1 = __expf(m1 - n1);
        l0 = l0 * a0 + __expf(sk - n0);
        l1 = l1 * a1 + __expf(sk - n1);
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            o[dt][0] *= a0; o[dt][1] *= a0;
            o[dt][2] *= a1; o[dt][3] *= a1;
        }
    }
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        const int c = h * D + dt * 8 + 2 * tq;
        if (r0 < n_tokens) *(float2*)(out + (i64)r0 * ldo + c) = make_float2(o[dt][0] * i0, o[dt][1] * i0);
        if (r1 < n_tokens) *(float2*)(out + (i64)r1 * ldo + c) = make_float2(o[dt][2] * i1, o[dt][3] * i1);
    }
}

// flash_attn_D reads an f16 cache, flash_attn_q8_D a Q8_0 one.
#define FLASH_KERNEL(D, BKV)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                               \
        flash_attn_##D(const float* __restrict__ q, int ldq, const u16* __restrict__ kc,            \
                       const u16* __restrict__ vc, float* __restrict__ out, int ldo,                \
                       const i32* __restrict__ pos, int n_tokens, int n_head, int n_kv,             \
                       int kv_base, int cells, float scale, float softcap, int window,              \
                       const float* __restrict__ sinks) {                                           \
        flash_impl<D, BKV, false>(q, ldq, kc, vc, out, ldo, pos, n_tokens, n_head, n_kv, kv_base,   \
                                  cells, scale, softcap, window, sinks);                            \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                               \
        flash_attn_q8_##D(const float* __restrict__ q, int ldq, const u8* __restrict__ kc,          \
                          const u8* __restrict__ vc, float* __restrict__ out, int ldo,              \
                          const i32* __restrict__ pos, int n_tokens, int n_head, int n_kv,          \
                          int kv_base, int cells, float scale, float softcap, int window,           \
                          const float* __restrict__ sinks) {                                        \
        flash_impl<D, BKV, true>(q, ldq, kc, vc, out, ldo, pos, n_tokens, n_head, n_kv, kv_base,    \
                                 cells, scale, softcap, window, sinks);                             \
    }
FLASH_KERNEL(64, 64)
FLASH_KERNEL(128, 64)
FLASH_KERNEL(256, 32)

// ---------------------------------------------------------------------------------------------
// Split-KV attention for few query rows (decode), any even head dims <= 256.
//
// The keys a query at position p sees, [j_lo, j_end), are cut on the device into `live` splits
// of `chunk` keys (a multiple of SPLIT_TILE) so that live <= n_split: the grid is sized once
// for the cache (programs stay fixed per token) and a call over L keys costs ~L bytes of KV, not
// n_ctx. Blocks past `live` exit at once; attn_combine derives the same ranges from pos and only
// reads the live splits. Inside a split, tiles of SPLIT_TILE keys are staged in shared memory
// (K and V copies in flight together), two threads compute one key's score, the tile's softmax
// is merged online, and P·V runs with threads over value dims (and key groups when dv is small).

#define SPLIT_TILE 64

// Visible keys of a query at position p, cut into at most n_split splits of `chunk` keys
// (live = 0: nothing visible, e.g. a padding row with p < 0).
__device__ __forceinline__ void split_range(int p, int window, int n_split, int& j_lo, int& chunk, int& live) {
    j_lo = 0;
    chunk = SPLIT_TILE;
    live = 0;
    if (p < 0) return;
    if (window > 0) j_lo = max(0, p - window + 1);
    const int len = p + 1 - j_lo;
    if (len <= 0) return;
    const int per = (len + n_split - 1) / n_split;
    chunk = (per + SPLIT_TILE - 1) / SPLIT_TILE * SPLIT_TILE;
    live = (len + chunk - 1) / chunk;
}

// Shared-memory row stride (halves) of a staged K or V tile: 16-byte aligned rows whose stride in
// 16-byte units is 2 mod 4, so the score loop's uint4 reads (two threads per row) hit distinct banks.
__device__ __forceinline__ int split_stride(int d) { return ((d + 31) & ~31) + 16; }

__device__ __forceinline__ float dot8(uint4 k, float4 a, float4 b) {
    return a.x * h2f((u16)(k.x & 0xffff)) + a.y * h2f((u16)(k.x >> 16)) + a.z * h2f((u16)(k.y & 0xffff)) +
           a.w * h2f((u16)(k.y >> 16)) + b.x * h2f((u16)(k.z & 0xffff)) + b.y * h2f((u16)(k.z >> 16)) +
           b.z * h2f((u16)(k.w & 0xffff)) + b.w * h2f((u16)(k.w >> 16));
}

// Grid (n_split, n_head, n_tokens), 128 threads, dynamic shared memory
// SPLIT_TILE * (split_stride(dk) + split_stride(dv)) halves. Split s writes (max, sum,
// unnormalised O[dv]) of its keys to part[((t * n_head + h) * n_split + s) * (dv + 2)].
// attn_split reads an f16 cache, attn_split_q8 a Q8_0 one (dk, dv multiples of 32).
template <bool Q8>
__device__ __forceinline__ void attn_split_impl(const float* __restrict__ q, int ldq, const void* __restrict__ kcv,
                                                const void* __restrict__ vcv, float* __restrict__ part,
                                                const i32* __restrict__ pos, const i32* __restrict__ seq, int n_head,
                                                int n_kv, int cells, int dk, int dv, float scale, float softcap,
                                                int window, int n_split) {
    const u16* kc = (const u16*)kcv;
    const u16* vc = (const u16*)vcv;
    extern __shared__ __align__(16) u16 split_smem[];
    __shared__ __align__(16) float sq[256];
    __shared__ float sp[SPLIT_TILE];
    __shared__ float sred[256];
    __shared__ float s_alpha;
    const int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31;
    const int p = pos[t];
    int j_lo, chunk, live;
    split_range(p, window, n_split, j_lo, chunk, live);
    // Uniform per block, before any barrier.
    if (split >= live) return;
    const int a = j_lo + split * chunk;
    const int b = min(a + chunk, p + 1);
    const i64 base = (i64)seq[t] * cells;
    const int kvh = h / (n_head / n_kv);
    const int KS = split_stride(dk), VS = split_stride(dv);
    u16* Ks = split_smem;
    u16* Vs = split_smem + SPLIT_TILE * KS;
    // 16-byte copies need every row start 16-byte aligned (head dims multiples of 8).
    const bool vec16 = ((dk | dv) & 7) == 0;
    const float* qh = q + (i64)t * ldq + (i64)h * dk;
    for (int d = tid; d < dk; d += blockDim.x) sq[d] = qh[d];

    // P·V: thread owns value pair w (dims 2w, 2w+1) over the keys j = grp (mod G).
    const int npair = dv / 2;
    const int G = 128 / npair;
    const int w = tid % npair, grp = tid / npair;
    const bool pv_on = grp < G;
    float o0 = 0.f, o1 = 0.f;
    float m_run = NEG_INF, l_run = 0.f;  // running max / sum (kept by warp 0)

    for (int j0 = a; j0 < b; j0 += SPLIT_TILE) {
        const int n_in = min(SPLIT_TILE, b - j0);
        if (Q8) {
            const int ck = dk / 8, cv = dv / 8;
            const i64 krow = (i64)n_kv * (dk / 32) * Q8_BLOCK, vrow = (i64)n_kv * (dv / 32) * Q8_BLOCK;
            const u8* kq = (const u8*)kcv + (i64)kvh * (dk / 32) * Q8_BLOCK;
            const u8* vq = (const u8*)vcv + (i64)kvh * (dv / 32) * Q8_BLOCK;
            for (int i = tid; i < n_in * ck; i += blockDim.x) {
                const int r = i / ck, c = i % ck;
                *(uint4*)(Ks + r * KS + c * 8) = q8_0_row_unit_h(kq + (base + (j0 + r) % cells) * krow, c * 8);
            }
            for (int i = tid; i < n_in * cv; i += blockDim.x) {
                const int r = i / cv, c = i % cv;
                *(uint4*)(Vs + r * VS + c * 8) = q8_0_row_unit_h(vq + (base + (j0 + r) % cells) * vrow, c * 8);
            }
        } else if (vec16) {
            const int ck = dk / 8, cv = dv / 8;
            for (int i = tid; i < n_in * ck; i += blockDim.x) {
                const int r = i / ck, c = i % ck;
                cp_async16(Ks + r * KS + c * 8, kc + ((base + (j0 + r) % cells) * n_kv + kvh) * dk + c * 8, true);
            }
            cp_async_commit();
            for (int i = tid; i < n_in * cv; i += blockDim.x) {
                const int r = i / cv, c = i % cv;
                cp_async16(Vs + r * VS + c * 8, vc + ((base + (j0 + r) % cells) * n_kv + kvh) * dv + c * 8, true);
            }
            cp_async_commit();
            cp_async_wait1();  // this thread's K copies have landed; V may still be in flight
        } else {
            const int ck = dk / 2, cv = dv / 2;
            for (int i = tid; i < n_in * ck; i += blockDim.x) {
                const int r = i / ck, c = i % ck;
                *(u32*)(Ks + r * KS + c * 2) = *(const u32*)(kc + ((base + (j0 + r) % cells) * n_kv + kvh) * dk + c * 2);
            }
            for (int i = tid; i < n_in * cv; i += blockDim.x) {
                const int r = i / cv, c = i % cv;
                *(u32*)(Vs + r * VS + c * 2) = *(const u32*)(vc + ((base + (j0 + r) % cells) * n_kv + kvh) * dv + c * 2);
            }
        }
        __syncthreads();
        {
            // Scores: threads 2k and 2k+1 split key k's dot product by alternating units.
            const int key = tid >> 1, half = tid & 1;
            float s = 0.f;
            if (key < n_in) {
                const u16* kr = Ks + key * KS;
                if (vec16) {
                    for (int u = half; u < dk / 8; u += 2) {
                        const uint4 k4 = *(const uint4*)(kr + u * 8);
                        s += dot8(k4, *(const float4*)(sq + u * 8), *(const float4*)(sq + u * 8 + 4));
                    }
                } else {
                    for (int u = half; u < dk / 2; u += 2) {
                        const u32 k2 = *(const u32*)(kr + u * 2);
                        s += sq[2 * u] * h2f((u16)(k2 & 0xffff)) + sq[2 * u + 1] * h2f((u16)(k2 >> 16));
                    }
                }
            }
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            if (half == 0) sp[key] = key < n_in ? cap_score(s * scale, softcap) : NEG_INF;
        }
        __syncthreads();
        if (tid < 32) {
            // Online softmax over tiles: rescale what came before by alpha. The tile has at least
            // one key, so mn is finite; exp(-inf) = 0 covers the first tile and unused slots.
            const float v0 = sp[lane], v1 = sp[lane + 32];
            const float mn = fmaxf(m_run, warp_max(fmaxf(v0, v1)));
            const float alpha = __expf(m_run - mn);
            const float e0 = __expf(v0 - mn), e1 = __expf(v1 - mn);
            sp[lane] = e0;
            sp[lane + 32] = e1;
            l_run = l_run * alpha + warp_sum(e0 + e1);
            m_run = mn;
            if (lane == 0) s_alpha = alpha;
        }
        if (vec16 && !Q8) cp_async_wait0();
        __syncthreads();
        if (pv_on) {
            const float al = s_alpha;
            o0 *= al;
            o1 *= al;
            for (int j = grp; j < n_in; j += G) {
                const float pj = sp[j];
                const u32 v2 = *(const u32*)(Vs + j * VS + 2 * w);
                o0 += pj * h2f((u16)(v2 & 0xffff));
                o1 += pj * h2f((u16)(v2 >> 16));
            }
        }
        __syncthreads();  // the next tile overwrites Ks, Vs and sp
    }
    if (pv_on) {
        sred[grp * dv + 2 * w] = o0;
        sred[grp * dv + 2 * w + 1] = o1;
    }
    __syncthreads();
    float* dst = part + (((i64)t * n_head + h) * n_split + split) * (dv + 2);
    if (tid == 0) {
        dst[0] = m_run;
        dst[1] = l_run;
    }
    for (int d = tid; d < dv; d += blockDim.x) {
        float acc = 0.f;
        for (int g2 = 0; g2 < G; g2++) acc += sred[g2 * dv + d];
        dst[2 + d] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(128)
    attn_split(const float* __restrict__ q, int ldq, const u16* __restrict__ kc, const u16* __restrict__ vc,
               float* __restrict__ part, const i32* __restrict__ pos, const i32* __restrict__ seq, int n_head,
               int n_kv, int cells, int dk, int dv, float scale, float softcap, int window, int n_split) {
    attn_split_impl<false>(q, ldq, kc, vc, part, pos, seq, n_head, n_kv, cells, dk, dv, scale, softcap, window,
                           n_split);
}

extern "C" __global__ void __launch_bounds__(128)
    attn_split_q8(const float* __restrict__ q, int ldq, const u8* __restrict__ kc, const u8* __restrict__ vc,
                  float* __restrict__ part, const i32* __restrict__ pos, const i32* __restrict__ seq, int n_head,
                  int n_kv, int cells, int dk, int dv, float scale, float softcap, int window, int n_split) {
    attn_split_impl<true>(q, ldq, kc, vc, part, pos, seq, n_head, n_kv, cells, dk, dv, scale, softcap, window,
                          n_split);
}

// Merges the live splits of attn_split or mla_attn_split (n_split <= 64); each head's sink (sinks:
// n_head f32, or null) joins the denominator. Grid (n_head, n_tokens), 128 threads.
extern "C" __global__ void attn_combine(const float* __restrict__ part, float* __restrict__ out, int ldo,
                                        const i32* __restrict__ pos, int n_head, int dv, int window,
                                        int n_split, const float* __restrict__ sinks) {
    __shared__ float fac[64];
    const int h = blockIdx.x, t = blockIdx.y;
    int j_lo, chunk, live;
    split_range(pos[t], window, n_split, j_lo, chunk, live);
    const i64 stride = dv + 2;
    const float* src = part + ((i64)t * n_head + h) * n_split * stride;
    float M = sinks ? sinks[h] : NEG_INF;
    for (int s = 0; s < live; s++) M = fmaxf(M, src[s * stride]);
    for (int s = threadIdx.x; s < live; s += blockDim.x) {
        const float ms = src[s * stride];
        fac[s] = ms == NEG_INF ? 0.f : __expf(ms - M);
    }
    __syncthreads();
    float L = sinks ? __expf(sinks[h] - M) : 0.f;
    for (int s = 0; s < live; s++) L += fac[s] * src[s * stride + 1];
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int d = threadIdx.x; d < dv; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < live; s++) acc += fac[s] * src[s * stride + 2 + d];
        out[(i64)t * ldo + (i64)h * dv + d] = acc * inv;
    }
}

// ---------------------------------------------------------------------------------------------
// Multi-head latent attention (one KV head whose values are the first dv columns of each K row of
// dk columns, row stride ldk): split-KV over key spans like attn_split, but each block serves
// MLA_HG query heads of one token so a K tile is staged once for all of them. Grid (n_split,
// ceil(n_head / MLA_HG), n_tokens), 256 threads, dynamic shared memory mla_smem(dk) bytes. Writes
// the partials attn_combine merges. dk <= 1024, dv <= MLA_MAX_DV, dk and dv even.
// mla_attn_split reads an f16 cache (ldk in values), mla_attn_split_q8 a Q8_0 one (ldk in values,
// a multiple of 32).

#define MLA_HG 16
#define MLA_TILE 32
#define MLA_MAX_DV 512

template <bool Q8>
__device__ __forceinline__ void mla_attn_split_impl(const float* __restrict__ q, int ldq, const void* __restrict__ kcv,
                                                    int ldk, float* __restrict__ part, const i32* __restrict__ pos,
                                                    const i32* __restrict__ seq, int n_head, int cells, int dk,
                                                    int dv, float scale, int window, int n_split) {
    extern __shared__ __align__(16) float mla_smem[];
    const u16* kc = (const u16*)kcv;
    __shared__ float m_run[MLA_HG], l_run[MLA_HG], alpha[MLA_HG];
    const int split = blockIdx.x, h0 = blockIdx.y * MLA_HG, t = blockIdx.z;
    const int nh = min(MLA_HG, n_head - h0);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int p = pos[t];
    int j_lo, chunk, live;
    split_range(p, window, n_split, j_lo, chunk, live);
    // Uniform per block, before any barrier.
    if (split >= live) return;
    const int a = j_lo + split * chunk;
    const int b = min(a + chunk, p + 1);
    const i64 base = (i64)seq[t] * cells;
    float* sq = mla_smem;                          // nh x dk queries
    u16* ks = (u16*)(sq + MLA_HG * dk);            // MLA_TILE x dk keys
    float* sp = (float*)(ks + MLA_TILE * dk);      // nh x MLA_TILE scores, then weights
    for (int i = tid; i < nh * dk; i += blockDim.x)
        sq[i] = q[(i64)t * ldq + (i64)(h0 + i / dk) * dk + i % dk];
    if (tid < MLA_HG) {
        m_run[tid] = NEG_INF;
        l_run[tid] = 0.f;
    }
    // This thread's outputs: o = tid + 256 k covers head o / dv, value o % dv.
    float acc[MLA_HG * MLA_MAX_DV / 256];
    const int n_out = nh * dv;
#pragma unroll
    for (int k = 0; k < MLA_HG * MLA_MAX_DV / 256; k++) acc[k] = 0.f;
    for (int j0 = a; j0 < b; j0 += MLA_TILE) {
        const int n_in = min(MLA_TILE, b - j0);
        __syncthreads();  // the previous tile's weights and keys are no longer read
        for (int i = tid; i < n_in * (dk / 2); i += blockDim.x) {
            const int r = i / (dk / 2), c = i % (dk / 2);
            if (Q8) {
                const u8* blk = (const u8*)kcv + (base + (j0 + r) % cells) * (ldk / 32) * Q8_BLOCK +
                                (2 * c / 32) * Q8_BLOCK;
                const float d = h2f(ld16(blk));
                const u16 w = ld16(blk + 2 + (2 * c) % 32);
                *(u32*)(ks + r * dk + 2 * c) = pack_h2((float)(i8)(w & 0xff) * d, (float)(i8)(w >> 8) * d);
            } else {
                *(u32*)(ks + r * dk + 2 * c) = *(const u32*)(kc + (base + (j0 + r) % cells) * ldk + 2 * c);
            }
        }
        __syncthreads();
        // Scores: one warp per (head, key) pair.
        for (int idx = warp; idx < nh * MLA_TILE; idx += 8) {
            const int hh = idx / MLA_TILE, r = idx % MLA_TILE;
            float s = 0.f;
            if (r < n_in) {
                const float* qh = sq + hh * dk;
                const u16* kr = ks + r * dk;
                for (int c = lane; c < dk / 2; c += 32) {
                    const u32 k2 = *(const u32*)(kr + 2 * c);
                    s += qh[2 * c] * h2f((u16)(k2 & 0xffff)) + qh[2 * c + 1] * h2f((u16)(k2 >> 16));
                }
            }
            s = warp_sum(s);
            if (lane == 0) {
                const int j = j0 + r;
                const bool ok = r < n_in && j <= p && (window <= 0 || p - j < window);
                sp[hh * MLA_TILE + r] = ok ? s * scale : NEG_INF;
            }
        }
        __syncthreads();
        // Online softmax per head (MLA_TILE == 32: one key per lane). Every tile has a visible
        // key (the span ends at the query's own position), so the new maximum is finite.
        for (int hh = warp; hh < nh; hh += 8) {
            const float v = sp[hh * MLA_TILE + lane];
            const float mn = fmaxf(m_run[hh], warp_max(v));
            const float e = __expf(v - mn);
            sp[hh * MLA_TILE + lane] = e;
            const float l = warp_sum(e);
            if (lane == 0) {
                const float al = __expf(m_run[hh] - mn);
                alpha[hh] = al;
                l_run[hh] = l_run[hh] * al + l;
                m_run[hh] = mn;
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < MLA_HG * MLA_MAX_DV / 256; k++) {
            const int o = tid + 256 * k;
            if (o < n_out) {
                const int hh = o / dv, d = o % dv;
                float v = acc[k] * alpha[hh];
                for (int r = 0; r < n_in; r++) v += sp[hh * MLA_TILE + r] * h2f(ks[r * dk + d]);
                acc[k] = v;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < MLA_HG * MLA_MAX_DV / 256; k++) {
        const int o = tid + 256 * k;
        if (o < n_out) {
            const int hh = o / dv, d = o % dv;
            float* dst = part + (((i64)t * n_head + h0 + hh) * n_split + split) * (dv + 2);
            dst[2 + d] = acc[k];
            if (d == 0) {
                dst[0] = m_run[hh];
                dst[1] = l_run[hh];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    mla_attn_split(const float* __restrict__ q, int ldq, const u16* __restrict__ kc, int ldk,
                   float* __restrict__ part, const i32* __restrict__ pos, const i32* __restrict__ seq,
                   int n_head, int cells, int dk, int dv, float scale, int window, int n_split) {
    mla_attn_split_impl<false>(q, ldq, kc, ldk, part, pos, seq, n_head, cells, dk, dv, scale, window, n_split);
}

extern "C" __global__ void __launch_bounds__(256)
    mla_attn_split_q8(const float* __restrict__ q, int ldq, const u8* __restrict__ kc, int ldk,
                      float* __restrict__ part, const i32* __restrict__ pos, const i32* __restrict__ seq,
                      int n_head, int cells, int dk, int dv, float scale, int window, int n_split) {
    mla_attn_split_impl<true>(q, ldq, kc, ldk, part, pos, seq, n_head, cells, dk, dv, scale, window, n_split);
}
