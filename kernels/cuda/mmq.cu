// MMQ: matmuls of quantized weights with int8 activations on int8 tensor cores, for batches of
// ~8 to ~256 tokens (the GEMV's per-row dots turn compute-bound there, and dequantize + cuBLAS
// reads f16 weights). y[t, r] = Σ_c W[r, c] x[t, c] (+ bias[r]) for r < rows, t < n.
//
// Arithmetic: the CPU engine's one order (kernels/src/gemm/mod.rs). A weight row is decoded
// exactly into signed int8 levels (the converter's u − offset) and per sub-block of 32 (16 for
// Q2_K, Q3_K, Q6_K) elements an f32 scale and, for the types with a minimum, an f32 minimum; the
// activations are the GEMV's scratch (gemv.cu: quantized by the same quantizers, bit for bit the
// CPU's). Per output, for each sub-block s in ascending order:
//     I   = Σ level · a                         (s32, exact: one fresh mma per sub-block)
//     acc = fma(f32(I), scale_s · d_s, acc)     (d_s: the activation scale of s's block of 32)
//     acc = fma(min_s, sa_s, acc)               (types with a minimum; sa_s: the scaled sum)
// each a correctly rounded f32 operation on the CPU's values, so the outputs are the CPU engine's
// bits (no FMA contraction can change them: every product and sum is an explicit __fmul_rn /
// __fmaf_rn).
//
// Grid (ceil(rows / BM), ceil(n / BN)), WARPS_M x WARPS_N warps: a block computes BM weight rows x
// BN tokens, each warp a (16 MT) x (8 NT) sub-tile. K advances one tile of 256 elements at a time
// (one K-quant block, eight blocks of 32), two stages deep:
//   stage  (cp.async, one tile ahead): each weight row's tile bytes as they lie in the file, in
//          the 16-byte aligned window that holds them (rows of most types are not 16-byte
//          aligned); the BN x 256 int8 activations; 16 words of activation factors per token;
//   decode (after the tile landed): the raw bytes become int8 levels W8[BM][256] (16 per thread
//          step) and the factors f32 tables: weight scales and minima per row and sub-block,
//          activation scales per token and block of 32 and scaled sums per token and sub-block;
//   mma:   per sub-block, mma.sync m16n8k32 (sub-blocks of 32) or m16n8k16 (of 16) into zeroed
//          s32 accumulators, folded into the f32 outputs in the order above.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with integer type" and
// "... mma.m16n8k32"), lane = 4 g + t (g = groupID, t = threadID_in_group), 4 int8 per register,
// the lowest k in the lowest byte:
//   A (16 x K, row-major): a0 = (row g, k 4t..4t+3), a1 = (row g+8, k 4t..4t+3);
//                          k32 also a2 = (row g, k 16+4t..), a3 = (row g+8, k 16+4t..)
//   B (K x 8, column n):   b0 = (k 4t..4t+3, n g); k32 also b1 = (k 16+4t.., n g)
//   C, D (16 x 8, s32):    c0 = (row g, n 2t), c1 = (row g, n 2t+1), c2 = (row g+8, n 2t),
//                          c3 = (row g+8, n 2t+1)
// W8 and the activation tile keep K contiguous per row (weight row, token), 272 bytes apart: the 8
// rows x 4 words of one fragment load fall in 32 different banks (68 words ≡ 4 mod 32).
// kernels/src/cuda/kernels/mmq.rs emulates this kernel lane by lane on the CPU (its tests).

#define MQ_K 256    // elements per K tile
#define MQ_ALD 272  // bytes per row of the int8 tiles (256 + 16)
#define MQ_FLD 17   // floats per row of the per-sub-block factor tables (16 + 1: rows g and g+4 apart in banks)
#define MQ_DLD 9    // floats per token of the activation scale table (8 blocks of 32 + 1)
#define MQ_RAW 16   // words of raw activation factors per token and tile

// Partner formats of the activations (gemv.cu's scratch layout).
#define MQ_Q8_0 0  // d: f32 per block of 32
#define MQ_Q8_1 1  // d: (f32 scale, f32 scaled sum) per block of 32
#define MQ_Q8_K 2  // d: f32 per block of 256; bs: i16 sum per 16 elements

// Bytes per row of a stage's raw weight window for tiles of `tb` bytes: at least tb + 15 (the
// tile may start anywhere in its first 16 bytes) + 4 (lds16_any reads one word past the 16 bytes
// it returns), rounded to an odd number of 16-byte units (rows an odd number of 4-word groups
// apart spread a warp's rows over the banks).
__host__ __device__ constexpr int mq_wld(int tb) { return 16 * (((tb + 19 + 15) / 16) | 1); }

// Dynamic shared memory of a block (kernels/src/cuda/kernels/mmq.rs mirrors it): two stages of
// (raw weight windows, int8 activations, raw activation factors), the int8 weight tile, then the
// f32 tables (weight scales, weight minima, activation scaled sums: MQ_FLD per row or token;
// activation scales: MQ_DLD per token).
__host__ __device__ constexpr int mq_smem(int tb, int bm, int bn) {
    return 2 * (bm * mq_wld(tb) + bn * MQ_ALD + bn * MQ_RAW * 4) + bm * MQ_ALD +
           4 * (2 * bm * MQ_FLD + bn * MQ_FLD + bn * MQ_DLD);
}

// 16 bytes from shared memory at any alignment: one 16-byte load where aligned (rows of 16-byte
// multiples, e.g. Q4_K), else five aligned words, funnel-shifted (the fifth is read even where the
// address is a word multiple and it is not needed).
__device__ __forceinline__ void lds16_any(const u8* p, u32* v) {
    if (((size_t)p & 15) == 0) {
        const uint4 x = *(const uint4*)p;
        v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
        return;
    }
    const u32* a = (const u32*)((size_t)p & ~(size_t)3);
    const u32 sh = ((u32)(size_t)p & 3u) * 8u;
    u32 w[5];
#pragma unroll
    for (int i = 0; i < 5; i++) w[i] = a[i];
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = __funnelshift_r(w[i], w[i + 1], sh);
}

// ---------------------------------------------------------------------------------------------
// Weight decoders. Each type gives, for one K tile `t` of a row (its raw bytes in shared memory,
// any alignment):
//   piece(t, p, v): the int8 levels of elements 16p..16p+15 (p < 16), element 16p + 4i + j in
//                   byte j of v[i]; the level is the CPU converter's u − offset;
//   factor(t, s, sc, mn): sub-block s's scale and minimum (0 without one) as the converter
//                   computes them.
// ACT: partner format; SUB: elements per sub-block; MIN: has a minimum; TB: bytes per K tile.
// ---------------------------------------------------------------------------------------------

// Legacy types: a K tile is eight blocks of 32; piece p is half p & 1 of block p >> 1 (the low
// nibbles of its 16 quant bytes hold elements 0..15, the high nibbles 16..31).
template <int BYTES_, int QS, int QH, int M, int OFF>
struct MLegacy {
    static const int ACT = M >= 0 ? MQ_Q8_1 : MQ_Q8_0, SUB = 32, MIN = M >= 0, TB = 8 * BYTES_;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        const u8* b = t + (p >> 1) * BYTES_;
        const int h = p & 1;
        u32 q[4];
        lds16_any(b + QS, q);
        const u32 qh = QH >= 0 ? ld32_a1(b + QH) >> (16 * h) : 0u;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 x = (q[i] >> (4 * h)) & 0x0f0f0f0fu;
            if (QH >= 0) x |= bits_to_bytes(qh >> (4 * i)) << 4;
            v[i] = OFF ? __vsub4(x, OFF * 0x01010101u) : x;
        }
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        const u8* b = t + s * BYTES_;
        sc = h2f((u16)ldb16(b));
        mn = M >= 0 ? h2f((u16)ldb16(b + M)) : 0.f;
    }
};
typedef MLegacy<18, 2, -1, -1, 8> MQ4_0;
typedef MLegacy<20, 4, -1, 2, 0> MQ4_1;
typedef MLegacy<22, 6, 2, -1, 16> MQ5_0;
typedef MLegacy<24, 8, 4, 2, 0> MQ5_1;

// Q8_0: the 32 signed quants are the levels.
struct MQ8_0 {
    static const int ACT = MQ_Q8_0, SUB = 32, MIN = 0, TB = 8 * 34;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        lds16_any(t + (p >> 1) * 34 + 2 + 16 * (p & 1), v);
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        sc = h2f((u16)ldb16(t + s * 34));
        mn = 0.f;
    }
};

// Lookup-table types with blocks of 32 (IQ4_NL: f16 d, 16 nibble bytes; MXFP4: E8M0 byte, 16
// nibble bytes): the nibbles index the levels, laid out as Q4_0's.
template <bool MX>
struct MLut32 {
    static const int BYTES = MX ? 17 : 18, QS = MX ? 1 : 2;
    static const int ACT = MQ_Q8_0, SUB = 32, MIN = 0, TB = 8 * BYTES;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        u32 q[4];
        lds16_any(t + (p >> 1) * BYTES + QS, q);
        const int h = p & 1;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 x = (q[i] >> (4 * h)) & 0x0f0f0f0fu;
            v[i] = MX ? lut4(x, LUT4_FP4) : lut4(x, LUT4_NL);
        }
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        const u8* b = t + s * BYTES;
        sc = MX ? e8m0_half(b[0]) : h2f((u16)ldb16(b));
        mn = 0.f;
    }
};
typedef MLut32<false> MIQ4_NL;
typedef MLut32<true> MMXFP4;

// IQ4_XS: sub-block j's 16 nibble bytes at 8 + 16j (low nibbles: elements 32j..32j+15, high:
// 32j+16..32j+31); scale d · (ls_j − 32).
struct MIQ4_XS {
    static const int ACT = MQ_Q8_K, SUB = 32, MIN = 0, TB = 136;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        u32 q[4];
        lds16_any(t + 8 + 16 * (p >> 1), q);
        const int h = p & 1;
#pragma unroll
        for (int i = 0; i < 4; i++) v[i] = lut4((q[i] >> (4 * h)) & 0x0f0f0f0fu, LUT4_NL);
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        sc = __fmul_rn(h2f((u16)ldb16(t)), (float)iq4xs_scale(t, s));
        mn = 0.f;
    }
};

// Q4_K / Q5_K (d, dmin, 12 scale bytes, [Q5_K: qh[32],] qs[128]): elements 64c + l (l < 32) are
// the low nibbles of qs[32c + l], 64c + 32 + l the high nibbles; Q5_K's fifth bit of element
// 64c + 32h + l is bit 2c + h of qh[l]. Piece p: c = p >> 2, nibble h = (p >> 1) & 1, l from
// 16 (p & 1). Scale d · sc_j, minimum −dmin · m_j.
template <bool FIVE>
struct MK45 {
    static const int QS = FIVE ? 48 : 16;
    static const int ACT = MQ_Q8_K, SUB = 32, MIN = 1, TB = FIVE ? 176 : 144;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        const int c = p >> 2, h = (p >> 1) & 1, l0 = 16 * (p & 1);
        u32 q[4], hb[4];
        lds16_any(t + QS + 32 * c + l0, q);
        if (FIVE) lds16_any(t + 16 + l0, hb);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 x = (q[i] >> (4 * h)) & 0x0f0f0f0fu;
            if (FIVE) x |= ((hb[i] >> (2 * c + h)) & 0x01010101u) << 4;
            v[i] = x;
        }
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        float scf, mf;
        k4_scale_min(t + 4, s, scf, mf);
        sc = __fmul_rn(h2f((u16)ldb16(t)), scf);
        mn = __fmul_rn(-h2f((u16)ldb16(t + 2)), mf);
    }
};
typedef MK45<false> MQ4_K;
typedef MK45<true> MQ5_K;

// Q6_K (ql[128], qh[64], i8 scales[16], d): element 128h + 32g + l (g < 4, l < 32) is nibble
// g >> 1 of ql[64h + 32 (g & 1) + l] with bits 2g..2g+1 of qh[32h + l] on top, minus 32. Piece p:
// h = p >> 3, g = (p >> 1) & 3, l from 16 (p & 1). Sub-blocks of 16: scale d · sc_s.
struct MQ6_K {
    static const int ACT = MQ_Q8_K, SUB = 16, MIN = 0, TB = 210;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        const int h = p >> 3, g = (p >> 1) & 3, l0 = 16 * (p & 1);
        u32 ql[4], qh[4];
        lds16_any(t + 64 * h + 32 * (g & 1) + l0, ql);
        lds16_any(t + 128 + 32 * h + l0, qh);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 x = ((ql[i] >> (4 * (g >> 1))) & 0x0f0f0f0fu) | (((qh[i] >> (2 * g)) & 0x03030303u) << 4);
            v[i] = __vsub4(x, 0x20202020u);
        }
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        sc = __fmul_rn(h2f((u16)ldb16(t + 208)), (float)(i8)t[192 + s]);
        mn = 0.f;
    }
};

// Q3_K (hmask[32], qs[64], scales[12], d): element 128h + 32j + l is bits 2j..2j+1 of
// qs[32h + l] with bit 4h + j of hmask[l] as the third, minus 4. Sub-blocks of 16: scale
// d · (signed 6-bit scale).
struct MQ3_K {
    static const int ACT = MQ_Q8_K, SUB = 16, MIN = 0, TB = 110;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        const int h = p >> 3, j = (p >> 1) & 3, l0 = 16 * (p & 1);
        u32 q[4], m[4];
        lds16_any(t + 32 + 32 * h + l0, q);
        lds16_any(t + l0, m);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 x = ((q[i] >> (2 * j)) & 0x03030303u) | (((m[i] >> (4 * h + j)) & 0x01010101u) << 2);
            v[i] = __vsub4(x, 0x04040404u);
        }
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        sc = __fmul_rn(h2f((u16)ldb16(t + 108)), (float)q3k_scale(t + 96, s));
        mn = 0.f;
    }
};

// Q2_K (scales[16], qs[64], d, dmin): element 128h + 32j + l is bits 2j..2j+1 of qs[32h + l].
// Sub-blocks of 16: scale d · (sc & 15), minimum −dmin · (sc >> 4).
struct MQ2_K {
    static const int ACT = MQ_Q8_K, SUB = 16, MIN = 1, TB = 84;
    __device__ static __forceinline__ void piece(const u8* t, int p, u32* v) {
        const int h = p >> 3, j = (p >> 1) & 3, l0 = 16 * (p & 1);
        u32 q[4];
        lds16_any(t + 16 + 32 * h + l0, q);
#pragma unroll
        for (int i = 0; i < 4; i++) v[i] = (q[i] >> (2 * j)) & 0x03030303u;
    }
    __device__ static __forceinline__ void factor(const u8* t, int s, float& sc, float& mn) {
        const u32 b = t[s];
        sc = __fmul_rn(h2f((u16)ldb16(t + 80)), (float)(b & 15));
        mn = __fmul_rn(-h2f((u16)ldb16(t + 82)), (float)(b >> 4));
    }
};

// ---------------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------------

// c = A · B of one sub-block of 32 (k32) or 16 (k16) into zeroed accumulators.
__device__ __forceinline__ void mq_mma_k32(int* c, const u32* a, u32 b0, u32 b1) {
    c[0] = c[1] = c[2] = c[3] = 0;
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mq_mma_k16(int* c, const u32* a, u32 b0) {
    c[0] = c[1] = c[2] = c[3] = 0;
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
}

// Where K tile kt of weight row m0 + r starts (rows past the matrix read its last row; their
// outputs are never stored).
__device__ __forceinline__ const u8* mq_tile_src(const u8* w, i64 row_bytes, int rows, int m0, int r,
                                                 int kt, int tb) {
    return w + (i64)min(m0 + r, rows - 1) * row_bytes + (i64)kt * tb;
}

template <class M, int BM, int BN, int WARPS_M, int WARPS_N>
__device__ __forceinline__ void mmq_impl(const u8* __restrict__ w, i64 row_bytes, int rows, int cols, int n,
                                         const i8* __restrict__ q, const float* __restrict__ d,
                                         const i16* __restrict__ bs, float* __restrict__ y, int ldy,
                                         const float* __restrict__ bias) {
    constexpr int NTH = WARPS_M * WARPS_N * 32;
    constexpr int MT = BM / WARPS_M / 16, NT = BN / WARPS_N / 8;
    static_assert(MT * 16 * WARPS_M == BM && NT * 8 * WARPS_N == BN, "warp tiles cover the block");
    constexpr int TB = M::TB, WLD = mq_wld(TB), WCH = WLD / 16;
    constexpr int SUB = M::SUB, NSUB = MQ_K / SUB;
    constexpr int STAGE = BM * WLD + BN * MQ_ALD + BN * MQ_RAW * 4;
    constexpr int SMEM = mq_smem(TB, BM, BN);
    extern __shared__ uint4 mq_shared[];
    u8* const sm = (u8*)mq_shared;
    u8* const w8 = sm + 2 * STAGE;
    float* const fs = (float*)(w8 + BM * MQ_ALD);  // weight scales [BM][MQ_FLD]
    float* const fm = fs + BM * MQ_FLD;             // weight minima [BM][MQ_FLD]
    float* const asa = fm + BM * MQ_FLD;            // activation scaled sums [BN][MQ_FLD]
    float* const ad = asa + BN * MQ_FLD;            // activation scales [BN][MQ_DLD]
    {
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < (u32)SMEM) __trap();  // the launcher's mmq_smem disagrees with mq_smem
    }
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int wm0 = (warp % WARPS_M) * (MT * 16), wn0 = (warp / WARPS_M) * (NT * 8);
    const int nkt = (cols + MQ_K - 1) / MQ_K;
    const int nb32 = cols >> 5;

    // Raw weight windows of tile kt into stage st: row r's tile bytes [src, src + tbe) lie in the
    // 16-byte units from src & ~15; units are copied only up to the end of the row (the rest of
    // the last one zero-filled). The window may begin before src: at worst in the 16 bytes before
    // the slice, which share its aligned 16-byte unit (allocations are 256-byte aligned).
    auto stage_w = [&](int kt, int st) {
        u8* dst = sm + st * STAGE;
        const i64 left = row_bytes - (i64)kt * TB;  // bytes of each row from this tile on
        const int tbe = (int)min((i64)TB, left);
        for (int i = tid; i < BM * WCH; i += NTH) {
            const int r = i / WCH, c = i - r * WCH;
            const u8* src = mq_tile_src(w, row_bytes, rows, m0, r, kt, TB);
            const int o = (int)((size_t)src & 15);
            if (16 * c < o + tbe) {
                const u8* cs = src - o + 16 * c;
                cp_async16_n(dst + r * WLD + 16 * c, cs, (int)min((i64)16, (i64)(src + left - cs)));
            }
        }
    };
    // Activations of tile kt into stage st: BN rows of 256 int8 (zero past n and past cols), and
    // per token MQ_RAW words of factors (zero where absent):
    //   Q8_0: words 0..7 the scales of blocks 8kt..8kt+7;
    //   Q8_1: words 2b, 2b+1 the (scale, scaled sum) of block 8kt + b;
    //   Q8_K: word 0 the scale of block kt, words 1..8 its 16 sums (i16 pairs).
    auto stage_a = [&](int kt, int st) {
        u8* a8 = sm + st * STAGE + BM * WLD;
        u8* raw = a8 + BN * MQ_ALD;
        for (int i = tid; i < BN * 16; i += NTH) {
            const int j = i >> 4, c = i & 15;
            const int tk = n0 + j, k = kt * MQ_K + 16 * c;
            const bool ok = tk < n && k < cols;
            cp_async16_n(a8 + j * MQ_ALD + 16 * c, ok ? (const void*)(q + (i64)tk * cols + k) : (const void*)q,
                         ok ? 16 : 0);
        }
        for (int i = tid; i < BN * MQ_RAW; i += NTH) {
            const int j = i >> 4, wd = i & 15, tk = n0 + j;
            const void* src = nullptr;
            if (tk < n) {
                if (M::ACT == MQ_Q8_0) {
                    const int b = kt * 8 + wd;
                    if (wd < 8 && b < nb32) src = d + (i64)tk * nb32 + b;
                } else if (M::ACT == MQ_Q8_1) {
                    const int b = kt * 8 + (wd >> 1);
                    if (b < nb32) src = d + 2 * ((i64)tk * nb32 + b) + (wd & 1);
                } else if (wd == 0) {
                    src = d + (i64)tk * (cols >> 8) + kt;
                } else if (wd <= 8) {
                    src = bs + (i64)tk * (cols >> 4) + kt * 16 + 2 * (wd - 1);
                }
            }
            cp_async4_n(raw + 4 * (j * MQ_RAW + wd), src ? src : (const void*)d, src ? 4 : 0);
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int a = 0; a < MT; a++)
#pragma unroll
        for (int b = 0; b < NT; b++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[a][b][e] = 0.f;

    // Weights first; the activations are the quantizer's output (the kernel before this one).
    stage_w(0, 0);
    pdl_wait();
    stage_a(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < nkt; kt++) {
        const int st = kt & 1;
        // The other stage was last read before the barrier that ended the previous tile.
        if (kt + 1 < nkt) {
            stage_w(kt + 1, st ^ 1);
            stage_a(kt + 1, st ^ 1);
        }
        cp_async_commit();
        cp_async_wait1();
        __syncthreads();

        // Decode: int8 levels and the f32 factors of this tile.
        const u8* wraw = sm + st * STAGE;
        const u8* a8 = wraw + BM * WLD;
        const u32* raw = (const u32*)(a8 + BN * MQ_ALD);
        for (int i = tid; i < BM * 16; i += NTH) {
            const int r = i >> 4, p = i & 15;
            const int o = (int)((size_t)mq_tile_src(w, row_bytes, rows, m0, r, kt, TB) & 15);
            u32 v[4];
            M::piece(wraw + r * WLD + o, p, v);
            *(uint4*)(w8 + r * MQ_ALD + 16 * p) = make_uint4(v[0], v[1], v[2], v[3]);
        }
        for (int i = tid; i < BM * NSUB; i += NTH) {
            const int r = i / NSUB, s = i - r * NSUB;
            const int o = (int)((size_t)mq_tile_src(w, row_bytes, rows, m0, r, kt, TB) & 15);
            float sc, mn;
            M::factor(wraw + r * WLD + o, s, sc, mn);
            fs[r * MQ_FLD + s] = sc;
            fm[r * MQ_FLD + s] = mn;
        }
        for (int i = tid; i < BN * 16; i += NTH) {
            const int j = i >> 4, s = i & 15;
            const u32* rw = raw + j * MQ_RAW;
            if (M::ACT == MQ_Q8_0) {
                if (s < 8) ad[j * MQ_DLD + s] = __uint_as_float(rw[s]);
            } else if (M::ACT == MQ_Q8_1) {
                if (s < 8) {
                    ad[j * MQ_DLD + s] = __uint_as_float(rw[2 * s]);
                    asa[j * MQ_FLD + s] = __uint_as_float(rw[2 * s + 1]);
                }
            } else {
                const float da = __uint_as_float(rw[0]);
                // 16-element sum m of the block: half m & 1 of word 1 + m / 2.
                auto bsum = [&](int m) { return (int)(i16)(u16)(rw[1 + (m >> 1)] >> (16 * (m & 1))); };
                if (s < 8) ad[j * MQ_DLD + s] = da;
                if (M::MIN) {
                    if (SUB == 16) {
                        asa[j * MQ_FLD + s] = __fmul_rn(da, (float)bsum(s));
                    } else if (s < 8) {
                        asa[j * MQ_FLD + s] = __fmul_rn(da, (float)(bsum(2 * s) + bsum(2 * s + 1)));
                    }
                }
            }
        }
        __syncthreads();

        // Sub-blocks of this tile inside the row (a row's last tile of 32-element blocks may be
        // partial), ascending: the CPU's order.
        const int nsub = min(NSUB, (cols - kt * MQ_K) / SUB);
        if (n0 + wn0 < n) {
            for (int s = 0; s < nsub; s++) {
                const int k0 = s * SUB;
                u32 af[MT][SUB / 8];
                float wsc[MT][2], wmn[MT][2];
#pragma unroll
                for (int a = 0; a < MT; a++) {
                    const int r = wm0 + 16 * a + g;
                    const u8* p = w8 + r * MQ_ALD + k0 + 4 * t4;
                    af[a][0] = *(const u32*)p;
                    af[a][1] = *(const u32*)(p + 8 * MQ_ALD);
                    if constexpr (SUB == 32) {
                        af[a][2] = *(const u32*)(p + 16);
                        af[a][3] = *(const u32*)(p + 8 * MQ_ALD + 16);
                    }
                    wsc[a][0] = fs[r * MQ_FLD + s];
                    wsc[a][1] = fs[(r + 8) * MQ_FLD + s];
                    wmn[a][0] = M::MIN ? fm[r * MQ_FLD + s] : 0.f;
                    wmn[a][1] = M::MIN ? fm[(r + 8) * MQ_FLD + s] : 0.f;
                }
#pragma unroll
                for (int b = 0; b < NT; b++) {
                    const u8* p = a8 + (wn0 + 8 * b + g) * MQ_ALD + k0 + 4 * t4;
                    const u32 b0 = *(const u32*)p;
                    const u32 b1 = SUB == 32 ? *(const u32*)(p + 16) : 0u;
                    const int tk = wn0 + 8 * b + 2 * t4;  // tokens tk, tk + 1 of c0/c2 and c1/c3
                    const int blk = k0 >> 5;              // the sub-block's block of 32
                    const float da[2] = {ad[tk * MQ_DLD + blk], ad[(tk + 1) * MQ_DLD + blk]};
                    const float sa[2] = {M::MIN ? asa[tk * MQ_FLD + s] : 0.f,
                                         M::MIN ? asa[(tk + 1) * MQ_FLD + s] : 0.f};
#pragma unroll
                    for (int a = 0; a < MT; a++) {
                        int c[4];
                        if constexpr (SUB == 32) {
                            mq_mma_k32(c, af[a], b0, b1);
                        } else {
                            mq_mma_k16(c, af[a], b0);
                        }
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            float v = __fmaf_rn(__int2float_rn(c[e]), __fmul_rn(wsc[a][e >> 1], da[e & 1]),
                                                acc[a][b][e]);
                            if (M::MIN) v = __fmaf_rn(wmn[a][e >> 1], sa[e & 1], v);
                            acc[a][b][e] = v;
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int a = 0; a < MT; a++)
#pragma unroll
        for (int b = 0; b < NT; b++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = m0 + wm0 + 16 * a + g + 8 * (e >> 1);
                const int tk = n0 + wn0 + 8 * b + 2 * t4 + (e & 1);
                if (r < rows && tk < n) y[(i64)tk * ldy + r] = bias ? __fadd_rn(acc[a][b][e], bias[r]) : acc[a][b][e];
            }
}

// Tile variants mmq_<type>_<BM>x<BN> (warps WARPS_M x WARPS_N): MMQ_TILES in
// kernels/src/cuda/kernels/mmq.rs lists them.
#define MMQ_VARIANT(NAME, M, BM, BN, WARPS_M, WARPS_N)                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)                                 \
        mmq_##NAME##_##BM##x##BN(const u8* __restrict__ w, i64 row_bytes, int rows, int cols, int n,     \
                                 const i8* __restrict__ q, const float* __restrict__ d,                   \
                                 const i16* __restrict__ bs, float* __restrict__ y, int ldy,              \
                                 const float* __restrict__ bias) {                                        \
        mmq_impl<M, BM, BN, WARPS_M, WARPS_N>(w, row_bytes, rows, cols, n, q, d, bs, y, ldy, bias);     \
    }
#define MMQ_KERNELS(NAME, M)                \
    MMQ_VARIANT(NAME, M, 32, 16, 2, 1)      \
    MMQ_VARIANT(NAME, M, 64, 8, 4, 1)       \
    MMQ_VARIANT(NAME, M, 64, 16, 4, 1)      \
    MMQ_VARIANT(NAME, M, 64, 32, 4, 1)      \
    MMQ_VARIANT(NAME, M, 64, 64, 2, 2)      \
    MMQ_VARIANT(NAME, M, 128, 64, 4, 2)

// Applies MACRO(NAME, DECODER) to every quantized weight type (gemv.cu's FOR_EACH_QUANT_TYPE list).
#define FOR_EACH_MMQ_TYPE(MACRO) \
    MACRO(q4_0, MQ4_0)           \
    MACRO(q4_1, MQ4_1)           \
    MACRO(q5_0, MQ5_0)           \
    MACRO(q5_1, MQ5_1)           \
    MACRO(q8_0, MQ8_0)           \
    MACRO(q2_k, MQ2_K)           \
    MACRO(q3_k, MQ3_K)           \
    MACRO(q4_k, MQ4_K)           \
    MACRO(q5_k, MQ5_K)           \
    MACRO(q6_k, MQ6_K)           \
    MACRO(iq4_nl, MIQ4_NL)       \
    MACRO(iq4_xs, MIQ4_XS)       \
    MACRO(mxfp4, MMXFP4)

FOR_EACH_MMQ_TYPE(MMQ_KERNELS)
