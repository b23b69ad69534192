// MoE prefill on the device: the (token, slot) pairs of a batch are sorted by expert
// (`moe_sort`), and every expert's rows are multiplied by its weight matrix in one grouped GEMM
// launch per matrix (`moe_gemm_*`), the weights decoded from their GGUF blocks into shared memory
// on the fly (no f16 copy of the experts). Nothing is read back to the host, and the number of
// launches does not depend on how many experts the batch uses, so the path can be captured.
//
// Pair p = token * n_used + slot; its expert is route[token * 2 * n_used + slot] (route rows as
// moe_route writes them: n_used u32 ids, then n_used f32 weights).

// ---------------------------------------------------------------------------------------------
// Sort
// ---------------------------------------------------------------------------------------------

#define SORT_THREADS 1024
#define SORT_MAX_BUCKETS 1025  // n_expert <= 1024 (moe_route's limit) plus the invalid bucket

// Token tile of the grouped GEMM (every variant's BN): moe_sort numbers the tiles of each bucket.
#define MG_BN 64

// Block-wide scan of one int per thread (SORT_THREADS threads); `tot` is scratch of
// SORT_THREADS / 32 ints. Returns the exclusive prefix sum of `v` over the threads.
__device__ __forceinline__ int sort_excl_scan(int v, int* tot) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += u;
    }
    __syncthreads();
    if (lane == 31) tot[wid] = incl;
    __syncthreads();
    if (wid == 0) {
        const int t0 = tot[lane];
        int t = t0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int u = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += u;
        }
        tot[lane] = t - t0;
    }
    __syncthreads();
    return tot[wid] + incl - v;
}

// One block of SORT_THREADS threads. Buckets 0..n_expert-1 are the experts; bucket n_expert
// collects pairs whose id is >= n_expert (the router never writes one; the GEMM fills their output
// rows with NaN so a corrupt route shows in the results instead of being clamped silently).
// offsets[b] = first sorted position of bucket b (exclusive prefix sum of the counts),
// offsets[n_expert + 1] = n_pairs; tiles[b] = first MG_BN-row tile of bucket b (exclusive prefix
// sum of ceil(count / MG_BN)), tiles[n_expert + 1] = all tiles; order[offsets[b] ..] = the pairs
// of bucket b (in no particular order within a bucket: shared-memory atomics hand out the
// positions).
extern "C" __global__ void __launch_bounds__(SORT_THREADS)
    moe_sort(const u32* __restrict__ route, int n_tokens, int n_used, int n_expert,
             i32* __restrict__ offsets, i32* __restrict__ tiles, i32* __restrict__ order) {
    __shared__ int cnt[SORT_MAX_BUCKETS];
    __shared__ int tot[SORT_THREADS / 32];
    const int tid = threadIdx.x;
    const int nb = n_expert + 1;
    const int pairs = n_tokens * n_used;
    for (int i = tid; i < nb; i += SORT_THREADS) cnt[i] = 0;
    __syncthreads();
    for (int p = tid; p < pairs; p += SORT_THREADS) {
        const int t = p / n_used, s = p - t * n_used;
        const u32 e = route[(i64)t * 2 * n_used + s];
        atomicAdd(&cnt[e < (u32)n_expert ? (int)e : n_expert], 1);
    }
    __syncthreads();
    // Exclusive scans of the bucket counts and tile counts: each thread owns a run of `per`
    // buckets.
    const int per = (nb + SORT_THREADS - 1) / SORT_THREADS;
    const int b0 = min(tid * per, nb), b1 = min(b0 + per, nb);
    int lc = 0, lt = 0;
    for (int b = b0; b < b1; b++) {
        lc += cnt[b];
        lt += (cnt[b] + MG_BN - 1) / MG_BN;
    }
    int run = sort_excl_scan(lc, tot);
    int trun = sort_excl_scan(lt, tot);
    // Counts become cursors (each thread touches only its own buckets here).
    for (int b = b0; b < b1; b++) {
        const int c = cnt[b];
        offsets[b] = run;
        tiles[b] = trun;
        cnt[b] = run;
        run += c;
        trun += (c + MG_BN - 1) / MG_BN;
    }
    if (tid == SORT_THREADS - 1) {
        offsets[nb] = run;
        tiles[nb] = trun;
    }
    __syncthreads();
    for (int p = tid; p < pairs; p += SORT_THREADS) {
        const int t = p / n_used, s = p - t * n_used;
        const u32 e = route[(i64)t * 2 * n_used + s];
        order[atomicAdd(&cnt[e < (u32)n_expert ? (int)e : n_expert], 1)] = p;
    }
}

// ---------------------------------------------------------------------------------------------
// Grouped GEMM
// ---------------------------------------------------------------------------------------------

// K tile: one 256-element K-quant block, or 8 blocks of 32, or 32 float pseudo-blocks, so every
// tile holds whole blocks. Rows in shared memory are padded to 264 halves (528 bytes = 33 16-byte
// units): the 8 rows an ldmatrix phase reads fall in 8 different bank groups.
#define MG_BK 256
#define MG_LD (MG_BK + 8)

__device__ __forceinline__ void mg_ldm4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mg_mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class A, class B> struct mg_same { static const bool value = false; };
template <class A> struct mg_same<A, A> { static const bool value = true; };

// Two f32 values as one f16x2 word (lo in the low half), one instruction.
__device__ __forceinline__ u32 mg_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Decodes the W tile (BM rows x 256 columns starting at wt, row stride row_bytes) into f16 shared
// memory with the generic unit decoders; units of blocks past kn columns are zero. Fully unrolled
// so each thread has all its units' loads in flight at once.
template <class T, int BM, int NTH>
__device__ __forceinline__ void mg_decode_tile(const u8* __restrict__ wt, i64 row_bytes, int m0, int rows,
                                               int kn, u16* ws, int tid) {
    constexpr int UPT = MG_BK / 8;
#pragma unroll
    for (int i = tid; i < BM * UPT; i += NTH) {
        const int r = i / UPT, uu = i - r * UPT;
        const int blk = uu / T::U, u = uu - blk * T::U;
        u16* dst = ws + r * MG_LD + blk * T::QK;
        if (blk * T::QK < kn) {
            const u8* bp = wt + (i64)min(m0 + r, rows - 1) * row_bytes + (i64)blk * T::BYTES;
            float v[8];
            int o0, o1;
            T::unit(bp, u, v, o0, o1);
            uint2 a, b;
            a.x = mg_pack(v[0], v[1]); a.y = mg_pack(v[2], v[3]);
            b.x = mg_pack(v[4], v[5]); b.y = mg_pack(v[6], v[7]);
            *(uint2*)(dst + o0) = a;
            *(uint2*)(dst + o1) = b;
        } else {
            *(uint4*)(dst + u * 8) = make_uint4(0, 0, 0, 0);
        }
    }
}

// Q4_K (the experts of q4_k models): the decode dominates this kernel's instruction count, so a
// lean version of TQ4_K::unit with the same thread layout (one warp per row; lane l decodes the
// 8 values of unit l): the 16-byte header in one load, the two 6-bit (scale, min) pairs of the
// lane's sub-blocks picked branch-free, nibbles turned into floats by byte permutes onto the
// 2^23 exponent (exact, no int-to-float conversion), f32 FMA, one f16x2 conversion per pair.
// Same values as TQ4_K::unit: (d * sc) * q - (dmin * m), rounded once to f16. A K tile is exactly
// one block (cols is a multiple of 256).
template <int BM, int NTH>
__device__ __forceinline__ void mg_decode_q4_k(const u8* __restrict__ wt, i64 row_bytes, int m0, int rows,
                                               u16* ws, int tid) {
    const int lane = tid & 31;
    const int g = lane >> 3, l0 = 4 * (lane & 7);
    const int jj = (2 * g) & 3;     // index of the sub-block pair's first scale within its word
    const bool hi_pair = g >= 2;    // sub-blocks 4..7: scales split over two words
    const float magic = 8388608.f;  // 2^23
#pragma unroll
    for (int r = tid >> 5; r < BM; r += NTH / 32) {
        const u8* b = wt + (i64)min(m0 + r, rows - 1) * row_bytes;
        const uint4 h = *(const uint4*)b;
        const u32 w = *(const u32*)(b + 16 + 32 * g + l0);
        const float d = h2f((u16)(h.x & 0xffff)), dmin = h2f((u16)(h.x >> 16));
        float sc[2], mn[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int sh = 8 * (jj + k);
            const u32 y = (h.y >> sh) & 0xff, z = (h.z >> sh) & 0xff, x = (h.w >> sh) & 0xff;
            const u32 s_lo = y & 63, m_lo = z & 63;
            const u32 s_hi = (x & 0xf) | ((y >> 6) << 4), m_hi = (x >> 4) | ((z >> 6) << 4);
            sc[k] = d * (float)(hi_pair ? s_hi : s_lo);
            mn[k] = dmin * (float)(hi_pair ? m_hi : m_lo);
        }
        const u32 lo = w & 0x0f0f0f0fu, hi = (w >> 4) & 0x0f0f0f0fu;
        float v[8];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            // 0x4B0000qq = 2^23 + q as a float.
            const float ql = __int_as_float(__byte_perm(lo, 0x4B000000u, 0x7540 + i)) - magic;
            const float qh = __int_as_float(__byte_perm(hi, 0x4B000000u, 0x7540 + i)) - magic;
            v[i] = sc[0] * ql - mn[0];
            v[4 + i] = sc[1] * qh - mn[1];
        }
        u16* dst = ws + r * MG_LD + 64 * g + l0;
        *(uint2*)dst = make_uint2(mg_pack(v[0], v[1]), mg_pack(v[2], v[3]));
        *(uint2*)(dst + 32) = make_uint2(mg_pack(v[4], v[5]), mg_pack(v[6], v[7]));
    }
}

// Y[row(i), r] = sum_c W_e[r, c] * X[i, c] for the rows i of expert e (offsets[e] <= i <
// offsets[e + 1]), with row(i) = i, or y_rows[i] when y_rows is given (scatter back to pair
// order). W: n_expert stacked (rows x cols) matrices in GGUF blocks; X: f16 [*, cols], 16-byte
// aligned rows. The work is the list of BN-row token tiles of all buckets that moe_sort numbered
// (tiles[b] .. tiles[b + 1] - 1 are bucket b's), so no block is spent on experts with few rows.
// Grid (ceil(rows / BM), any number of tile slots): block (x, y) computes output rows
// m0 = x * BM .. of the tiles y, y + gridDim.y, ... The tiles of bucket n_expert (invalid ids,
// see moe_sort) get NaN.
//
// Per K tile: the X tile (BN tokens x 256) is copied by cp.async while the threads decode the W
// tile (BM rows x 256) unit by unit into f16 shared memory; then each warp multiplies its
// (16 MT) x (8 NT) sub-tile with mma.m16n8k16 (f32 accumulators). Columns past `cols` are zero in
// both tiles; rows past `rows` are clamped (their outputs are never stored); tokens past the
// expert's count are zero and not stored, and warps whose tokens all lie past it skip the MMAs.
template <class T, int BM, int BN, int WM, int WN>
__device__ __forceinline__ void moe_gemm_impl(const u8* __restrict__ w, i64 expert_bytes, i64 row_bytes,
                                              int rows, int cols, int n_expert,
                                              const u16* __restrict__ x,
                                              const i32* __restrict__ offsets,
                                              const i32* __restrict__ tiles, float* __restrict__ y,
                                              int ldy, const i32* __restrict__ y_rows) {
    constexpr int NTH = WM * WN * 32;
    constexpr int MT = BM / WM / 16, NT = BN / WN / 8;
    static_assert(NT % 2 == 0, "B fragments are loaded for pairs of n8 tiles");
    static_assert(MG_BK % T::QK == 0, "a K tile holds whole blocks");
    static_assert(BN == MG_BN, "moe_sort numbers tiles of MG_BN rows");
    const int n_tiles = tiles[n_expert + 1];
    const int m0 = blockIdx.x * BM;
    const int tid = threadIdx.x;
    extern __shared__ uint4 mg_shared[];
    u16* ws = (u16*)mg_shared;
    u16* xs = ws + BM * MG_LD;
    const int lane = tid & 31, warp = tid >> 5;
    const int wm0 = (warp % WM) * (MT * 16), wn0 = (warp / WM) * (NT * 8);
    constexpr int UPT = MG_BK / 8;  // units per row of a tile
    for (int t = blockIdx.y; t < n_tiles; t += gridDim.y) {
        // Bucket of tile t: the last b with tiles[b] <= t (empty buckets share their start).
        int lo = 0, hi = n_expert;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (tiles[mid] <= t) lo = mid; else hi = mid - 1;
        }
        const int e = lo;
        const int off = offsets[e];
        const int cnt = offsets[e + 1] - off;
        const int n0 = (t - tiles[e]) * BN;
        if (e == n_expert) {
            // Pairs routed to no valid expert: poison their outputs.
            for (int i = tid; i < BM * BN; i += NTH) {
                const int n = i / BM, m = i - n * BM;
                if (n0 + n < cnt && m0 + m < rows) {
                    const int ri = off + n0 + n;
                    y[(i64)(y_rows ? y_rows[ri] : ri) * ldy + m0 + m] = __int_as_float(0x7fc00000);
                }
            }
            continue;
        }
        const u8* wexp = w + (i64)e * expert_bytes;
        const int nvalid = min(BN, cnt - n0);
        const u16* xt = x + (i64)(off + n0) * cols;
        float acc[MT][NT][4];
#pragma unroll
        for (int a = 0; a < MT; a++)
#pragma unroll
            for (int b = 0; b < NT; b++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;
        for (int k0 = 0; k0 < cols; k0 += MG_BK) {
            const int kn = min(MG_BK, cols - k0);
            // X tile: BN rows x 32 chunks of 8 halves, zero past the count and past cols.
            for (int i = tid; i < BN * UPT; i += NTH) {
                const int n = i / UPT, c = i - n * UPT;
                const bool ok = n < nvalid && c * 8 < kn;
                cp_async16(xs + n * MG_LD + c * 8, ok ? (const void*)(xt + (i64)n * cols + k0 + c * 8)
                                                   : (const void*)x,
                        ok);
            }
            cp_async_commit();
            const u8* wt = wexp + (i64)(k0 / T::QK) * T::BYTES;
            if constexpr (mg_same<T, TQ4_K>::value) {
                mg_decode_q4_k<BM, NTH>(wt, row_bytes, m0, rows, ws, tid);
            } else {
                mg_decode_tile<T, BM, NTH>(wt, row_bytes, m0, rows, kn, ws, tid);
            }
            cp_async_wait0();
            __syncthreads();
            // Pull the next K tile's weight rows into L2 while this one is multiplied (the decode
            // above waits on every load, so DRAM latency would otherwise stall each tile).
            if (k0 + MG_BK < cols) {
                const int tb = min(MG_BK, cols - k0 - MG_BK) / T::QK * T::BYTES;
                const int lines = (tb + 127) / 128 + 1;
                for (int i = tid; i < BM * lines; i += NTH) {
                    const int r = i / lines, l = i - r * lines;
                    const u8* p = wt + (i64)min(m0 + r, rows - 1) * row_bytes +
                                  (i64)(MG_BK / T::QK) * T::BYTES + min(l * 128, tb - 1);
                    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
                }
            }
            if (wn0 < nvalid) {
                const int ksteps = (kn + 15) / 16;
                for (int ks = 0; ks < ksteps; ks++) {
                    const int kc = ks * 16;
                    u32 af[MT][4];
#pragma unroll
                    for (int a = 0; a < MT; a++)
                        mg_ldm4(af[a], ws + (wm0 + a * 16 + (lane & 15)) * MG_LD + kc + (lane >> 4) * 8);
#pragma unroll
                    for (int b = 0; b < NT; b += 2) {
                        if (wn0 + b * 8 < nvalid) {
                            u32 bf[4];
                            mg_ldm4(bf, xs + (wn0 + b * 8 + (lane & 7) + ((lane >> 4) << 3)) * MG_LD + kc +
                                            ((lane >> 3) & 1) * 8);
#pragma unroll
                            for (int a = 0; a < MT; a++) {
                                mg_mma(acc[a][b], af[a], bf[0], bf[1]);
                                mg_mma(acc[a][b + 1], af[a], bf[2], bf[3]);
                            }
                        }
                    }
                }
            }
            __syncthreads();
        }
        // c0, c1: (row g, tokens 2t, 2t+1); c2, c3: (row g + 8, same tokens).
        const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
        for (int b = 0; b < NT; b++) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int n = wn0 + b * 8 + 2 * t4 + j;
                if (n >= nvalid) continue;
                const int ri = off + n0 + n;
                float* yr = y + (i64)(y_rows ? y_rows[ri] : ri) * ldy;
#pragma unroll
                for (int a = 0; a < MT; a++) {
                    const int m = m0 + wm0 + a * 16 + g;
                    if (m < rows) yr[m] = acc[a][b][j];
                    if (m + 8 < rows) yr[m + 8] = acc[a][b][2 + j];
                }
            }
        }
    }
}

// Tile variants (BM x BN, warps WM x WN): 64x64 (2 x 2 warps), 128x64 (4 x 2). Dynamic shared
// memory: (BM + BN) * MG_LD * 2 bytes.
#define MOE_GEMM_VARIANT(NAME, T, BM, BN, WM, WN)                                                  \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                     \
        moe_gemm_##NAME##_##BM##x##BN(const u8* __restrict__ w, i64 expert_bytes, i64 row_bytes,    \
                                      int rows, int cols, int n_expert, const u16* __restrict__ x, \
                                      const i32* __restrict__ offsets,                             \
                                      const i32* __restrict__ tiles, float* __restrict__ y,        \
                                      int ldy, const i32* __restrict__ y_rows) {                   \
        moe_gemm_impl<T, BM, BN, WM, WN>(w, expert_bytes, row_bytes, rows, cols, n_expert, x,      \
                                         offsets, tiles, y, ldy, y_rows);                          \
    }
#define MOE_GEMM_KERNELS(NAME, T)                                                                  \
    MOE_GEMM_VARIANT(NAME, T, 64, 64, 2, 2)                                                        \
    MOE_GEMM_VARIANT(NAME, T, 128, 64, 4, 2)
FOR_EACH_TYPE(MOE_GEMM_KERNELS)
