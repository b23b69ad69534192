// Decode matmuls of quantized weights with int8 activations (batch 1..8), and the MoE expert GEMV
// of quantized experts (one launch over all (token, expert) pairs).
//
// The activations are first quantized on the GPU exactly as the CPU engine quantizes them (the
// weight type's partner format: Q8_0, Q8_1 or Q8_K; same scale formula, IEEE division, ties-to-even
// rounding), then each weight row is dotted with them in integer arithmetic (__dp4a) per
// sub-block, with the same float scale math per block as the CPU dot kernels. GPU and CPU results
// therefore differ only in the order of float summation.
//
// Activation scratch layout (row t of n, `cols` elements):
//   q  : int8 [n][cols]                 quants
//   d  : Q8_0: float [n][cols/32]       block scale (the f16-rounded value)
//        Q8_1: float2 [n][cols/32]      (scale, scaled sum), both f16-rounded
//        Q8_K: float [n][cols/256]      block scale
//   bs : Q8_K only: i16 [n][cols/16]    sums of 16 consecutive quants
// Weights are read in their GGUF block layout.

// The GEMV is launched as a programmatic dependent of the quantizer (Hopper): its blocks start
// while the quantizer runs, issue their first weight loads, and wait for the quantized
// activations only before reading them (pdl_wait, common.cuh).

// ---------------------------------------------------------------------------------------------
// Activation quantizers. Grid (ceil(blocks / 8), n), 256 threads: one warp per block.
// ---------------------------------------------------------------------------------------------

// Q8_0 (SUM = false) and Q8_1 (SUM = true): d = max|x| / 127, q = round(x * (1 / d)).
template <bool SUM>
__device__ __forceinline__ void quantize_q8_32_impl(const float* __restrict__ x, int ldx, int cols,
                                                    i8* __restrict__ q, float* __restrict__ d) {
    pdl_launch_dependents();
    const int t = blockIdx.y;
    const int blk = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    const int nblk = cols >> 5;
    if (blk >= nblk) return;
    const float v = x[(i64)t * ldx + blk * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float dd = __fdiv_rn(amax, 127.f);
    const float id = dd != 0.f ? __fdiv_rn(1.f, dd) : 0.f;
    const int qi = __float2int_rn(__fmul_rn(v, id));
    q[(i64)t * cols + blk * 32 + lane] = (i8)qi;
    if (SUM) {
        int s = qi;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) {
            float2 ds;
            ds.x = h2f(f2h(dd));
            ds.y = h2f(f2h(__fmul_rn(dd, (float)s)));
            ((float2*)d)[(i64)t * nblk + blk] = ds;
        }
    } else if (lane == 0) {
        d[(i64)t * nblk + blk] = h2f(f2h(dd));
    }
}

extern "C" __global__ void quantize_q8_0(const float* __restrict__ x, int ldx, int cols, i8* __restrict__ q,
                                         float* __restrict__ d) {
    quantize_q8_32_impl<false>(x, ldx, cols, q, d);
}

extern "C" __global__ void quantize_q8_1(const float* __restrict__ x, int ldx, int cols, i8* __restrict__ q,
                                         float* __restrict__ d) {
    quantize_q8_32_impl<true>(x, ldx, cols, q, d);
}

// Q8_K: the first value of largest magnitude, vmax, maps to -128: scale = -128 / vmax,
// q = clamp(round(scale * x), -128, 127), d = 1 / scale; plus the 16-element sums.
extern "C" __global__ void quantize_q8_k(const float* __restrict__ x, int ldx, int cols, i8* __restrict__ q,
                                         float* __restrict__ d, i16* __restrict__ bs) {
    pdl_launch_dependents();
    const int t = blockIdx.y;
    const int blk = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    const int nblk = cols >> 8;
    if (blk >= nblk) return;
    const float* xp = x + (i64)t * ldx + blk * 256 + lane * 8;
    const float4 x0 = *(const float4*)xp;
    const float4 x1 = *(const float4*)(xp + 4);
    const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
    // (magnitude, index, value) of the first largest |v|, as the CPU's sequential scan finds it.
    float best = 0.f, bv = 0.f;
    int bi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        if (fabsf(v[j]) > best) {
            best = fabsf(v[j]);
            bv = v[j];
            bi = lane * 8 + j;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ob > best || (ob == best && oi < bi)) {
            best = ob;
            bv = ov;
            bi = oi;
        }
    }
    i8* qo = q + (i64)t * cols + blk * 256 + lane * 8;
    i16* bo = bs + (i64)t * (cols >> 4) + blk * 16;
    if (bv == 0.f) {
        *(uint2*)qo = make_uint2(0u, 0u);
        if ((lane & 1) == 0) bo[lane >> 1] = 0;
        if (lane == 0) d[(i64)t * nblk + blk] = 0.f;
        return;
    }
    const float is = __fdiv_rn(-128.f, bv);
    int s = 0;
    u32 w[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int qi = min(127, max(-128, __float2int_rn(__fmul_rn(is, v[j]))));
        s += qi;
        w[j >> 2] |= ((u32)qi & 0xffu) << (8 * (j & 3));
    }
    *(uint2*)qo = make_uint2(w[0], w[1]);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if ((lane & 1) == 0) bo[lane >> 1] = (i16)s;
    if (lane == 0) d[(i64)t * nblk + blk] = __fdiv_rn(1.f, is);
}

// ---------------------------------------------------------------------------------------------
// Integer dot products. Each weight type splits its block into CH chunks (DF: floats of activation
// scale per weight block: 2 for the Q8_1 (scale, sum) pairs, else 1). A thread decodes one
// chunk of R weight rows (struct W, registers), loads the matching activations of each batch row
// once (struct A) and dots them with all R rows: the float contribution of a chunk is the block
// scales times the integer sub-block sums, as in the CPU dot kernels.
// ---------------------------------------------------------------------------------------------

// Activation scratch of one call (see the layout above).
struct Acts {
    const i8* __restrict__ q;
    const float* __restrict__ d;
    const i16* __restrict__ bs;
    int cols;
};

__device__ __forceinline__ int dp4(u32 a, int b, int c) { return __dp4a((int)a, b, c); }

// Dot of 8 weight bytes (two words) with 8 activation quants.
__device__ __forceinline__ int dot8(u32 w0, u32 w1, int2 a) { return dp4(w0, a.x, dp4(w1, a.y, 0)); }

// Dot of 16 weight bytes with 16 activation quants.
__device__ __forceinline__ int dot16(const u32* w, int4 a) {
    return dp4(w[0], a.x, dp4(w[1], a.y, dp4(w[2], a.z, dp4(w[3], a.w, 0))));
}

__device__ __forceinline__ int2 ld_a8(const i8* p) { return *(const int2*)p; }
__device__ __forceinline__ int4 ld_a16(const i8* p) { return *(const int4*)p; }

// Activation row t's quants from element e.
__device__ __forceinline__ const i8* act_q(const Acts& a, int t, int e) { return a.q + (i64)t * a.cols + e; }

// 6-bit scale and min `j` of a Q4_K/Q5_K block as integers, from the scale field's three words
// (s0 = bytes 0..3, s1 = 4..7, s2 = 8..11). Branch-free: neighbouring lanes decode other groups.
__device__ __forceinline__ void k4_sm_int(u32 s0, u32 s1, u32 s2, int j, int& sc, int& m) {
    const int sh = 8 * (j & 3);
    const int b0 = (s0 >> sh) & 0xff, b1 = (s1 >> sh) & 0xff, b2 = (s2 >> sh) & 0xff;
    sc = j < 4 ? (b0 & 63) : ((b2 & 0xf) | ((b0 >> 6) << 4));
    m = j < 4 ? (b1 & 63) : ((b2 >> 4) | ((b1 >> 6) << 4));
}

// Legacy blocks of 32. CPU per block: sum += (dw * da) * isum (+ m * s with Q8_1 partners).
struct DQ8_0 {
    static const int QK = 32, BYTES = 34, CH = 4, DF = 1;
    struct W { u32 w0, w1; float d; };
    struct A { int2 q; float d; };
    __device__ static __forceinline__ W load(const u8* b, int c) {
        return W{ld32_a2(b + 2 + 8 * c), ld32_a2(b + 6 + 8 * c), h2f(ld16(b))};
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        return A{ld_a8(act_q(a, t, blk * 32 + 8 * c)), a.d[t * (a.cols >> 5) + blk]};
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        return w.d * x.d * (float)dot8(w.w0, w.w1, x.q);
    }
};

// 4-bit legacy quants: chunk c holds quant bytes 8c..8c+7 (elements 8c.. low, 16+8c.. high).
// OFF: the offset subtracted from each level (8, 16), or 0 for types with a block minimum (whose
// term m * s is added once per block, by chunk 0).
template <int BYTES_, int QS, int QH, int OFF>
struct DLegacy {
    static const int QK = 32, BYTES = BYTES_, CH = 2, DF = OFF ? 1 : 2;
    struct W { u32 lo0, lo1, hi0, hi1; float d, m; };
    struct A { int2 a0, a1; float d, s; };
    __device__ static __forceinline__ W load(const u8* b, int c) {
        const u32 q0 = ld32_a2(b + QS + 8 * c), q1 = ld32_a2(b + QS + 4 + 8 * c);
        W w;
        w.lo0 = q0 & 0x0f0f0f0fu;
        w.lo1 = q1 & 0x0f0f0f0fu;
        w.hi0 = (q0 >> 4) & 0x0f0f0f0fu;
        w.hi1 = (q1 >> 4) & 0x0f0f0f0fu;
        if (QH >= 0) {
            const u32 qh = ld32_a2(b + QH);
            w.lo0 |= bits_to_bytes(qh >> (8 * c)) << 4;
            w.lo1 |= bits_to_bytes(qh >> (8 * c + 4)) << 4;
            w.hi0 |= bits_to_bytes(qh >> (16 + 8 * c)) << 4;
            w.hi1 |= bits_to_bytes(qh >> (20 + 8 * c)) << 4;
        }
        if (OFF) {
            const u32 o = OFF * 0x01010101u;
            w.lo0 = __vsub4(w.lo0, o);
            w.lo1 = __vsub4(w.lo1, o);
            w.hi0 = __vsub4(w.hi0, o);
            w.hi1 = __vsub4(w.hi1, o);
        }
        w.d = h2f(ld16(b));
        w.m = (OFF || c != 0) ? 0.f : h2f(ld16(b + 2));
        return w;
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        const i8* p = act_q(a, t, blk * 32 + 8 * c);
        A x;
        x.a0 = ld_a8(p);
        x.a1 = ld_a8(p + 16);
        if (OFF) {
            x.d = a.d[t * (a.cols >> 5) + blk];
            x.s = 0.f;
        } else {
            const float2 ds = ((const float2*)a.d)[t * (a.cols >> 5) + blk];
            x.d = ds.x;
            x.s = ds.y;
        }
        return x;
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        const int s = dot8(w.lo0, w.lo1, x.a0) + dot8(w.hi0, w.hi1, x.a1);
        const float r = w.d * x.d * (float)s;
        return OFF ? r : r + w.m * x.s;
    }
};
typedef DLegacy<18, 2, -1, 8> DQ4_0;
typedef DLegacy<20, 4, -1, 0> DQ4_1;
typedef DLegacy<22, 6, 2, 16> DQ5_0;
typedef DLegacy<24, 8, 4, 0> DQ5_1;

// K-quants (blocks of 256, Q8_K partner). CPU per block: acc += da * (d * sumi - dmin * summ)
// (Q3_K, Q6_K: acc += da * d * sumi), sumi = Σ scale_j · (weight quants · act quants)_j,
// summ = Σ min_j · act sums_j.

// Q2_K / Q3_K: chunk (h, k) = quant bytes 32h+16k..+16, i.e. sub-blocks 8h+2j+k (j = 0..3),
// elements 128h+32j+16k..+16.
__device__ __forceinline__ const i8* k23_acts(const Acts& a, int t, int blk, int c, int4* q) {
    const int h = c >> 1, k = c & 1;
    const i8* p = act_q(a, t, blk * 256 + 128 * h + 16 * k);
#pragma unroll
    for (int j = 0; j < 4; j++) q[j] = ld_a16(p + 32 * j);
    return p;
}

struct DQ2_K {
    static const int QK = 256, BYTES = 84, CH = 4, DF = 1;
    struct W { u32 w[4]; int sc[4]; float d, dmin; };
    struct A { int4 q[4]; int bs[4]; float d; };
    __device__ static __forceinline__ W load(const u8* b, int c) {
        const int h = c >> 1, k = c & 1;
        const u8* qs = b + 16 + 32 * h + 16 * k;
        W w;
        w.w[0] = ld32(qs);
        w.w[1] = ld32(qs + 4);
        w.w[2] = ld32(qs + 8);
        w.w[3] = ld32(qs + 12);
#pragma unroll
        for (int j = 0; j < 4; j++) w.sc[j] = b[8 * h + 2 * j + k];
        const u32 dm = ld32(b + 80);
        w.d = h2f((u16)(dm & 0xffff));
        w.dmin = h2f((u16)(dm >> 16));
        return w;
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        A x;
        k23_acts(a, t, blk, c, x.q);
        const i16* bp = a.bs + (i64)t * (a.cols >> 4) + blk * 16 + 8 * (c >> 1) + (c & 1);
#pragma unroll
        for (int j = 0; j < 4; j++) x.bs[j] = bp[2 * j];
        x.d = a.d[t * (a.cols >> 8) + blk];
        return x;
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        int sumi = 0, summ = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int sh = 2 * j;
            const u32 wj[4] = {(w.w[0] >> sh) & 0x03030303u, (w.w[1] >> sh) & 0x03030303u,
                               (w.w[2] >> sh) & 0x03030303u, (w.w[3] >> sh) & 0x03030303u};
            sumi += (w.sc[j] & 15) * dot16(wj, x.q[j]);
            summ += (w.sc[j] >> 4) * x.bs[j];
        }
        return x.d * (w.d * (float)sumi - w.dmin * (float)summ);
    }
};

// Q3_K: the third bit from hmask[16k..+16], signed 6-bit scales.
struct DQ3_K {
    static const int QK = 256, BYTES = 110, CH = 4, DF = 1;
    struct W { u32 v[4][4]; int sc[4]; float d; };
    struct A { int4 q[4]; float d; };
    __device__ static __forceinline__ W load(const u8* b, int c) {
        const int h = c >> 1, k = c & 1;
        const u8* qs = b + 32 + 32 * h + 16 * k;
        const u8* hm = b + 16 * k;
        const u32 q[4] = {ld32_a2(qs), ld32_a2(qs + 4), ld32_a2(qs + 8), ld32_a2(qs + 12)};
        const u32 m[4] = {ld32_a2(hm), ld32_a2(hm + 4), ld32_a2(hm + 8), ld32_a2(hm + 12)};
        W w;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            w.sc[j] = q3k_scale(b + 96, 8 * h + 2 * j + k);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u32 lo = (q[i] >> (2 * j)) & 0x03030303u;
                const u32 hb = ((m[i] >> (4 * h + j)) & 0x01010101u) << 2;
                w.v[j][i] = __vsub4(lo | hb, 0x04040404u);
            }
        }
        w.d = h2f(ld16(b + 108));
        return w;
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        A x;
        k23_acts(a, t, blk, c, x.q);
        x.d = a.d[t * (a.cols >> 8) + blk];
        return x;
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        int sumi = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) sumi += w.sc[j] * dot16(w.v[j], x.q[j]);
        return x.d * w.d * (float)sumi;
    }
};

// Q4_K / Q5_K: chunk (g, h) = quant bytes 32g+16h..+16: elements 64g+16h.. (low nibbles, sub-block
// 2g) and 64g+32+16h.. (high nibbles, sub-block 2g+1). Q5_K adds bits 2g / 2g+1 of qh[16h..+16].
template <bool FIVE>
struct DK45 {
    static const int QK = 256, BYTES = FIVE ? 176 : 144, CH = 8, DF = 1;
    struct W { u32 lo[4], hi[4]; int s0, m0, s1, m1; float d, dmin; };
    struct A { int4 a0, a1; int b0, b1; float d; };
    __device__ static __forceinline__ W load(const u8* b, int c) {
        const int g = c >> 1, h = c & 1;
        const uint4 qv = *(const uint4*)(b + (FIVE ? 48 : 16) + 32 * g + 16 * h);
        const u32 qw[4] = {qv.x, qv.y, qv.z, qv.w};
        W w;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w.lo[i] = qw[i] & 0x0f0f0f0fu;
            w.hi[i] = (qw[i] >> 4) & 0x0f0f0f0fu;
        }
        if (FIVE) {
            const uint4 hv = *(const uint4*)(b + 16 + 16 * h);
            const u32 hw[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                w.lo[i] |= ((hw[i] >> (2 * g)) & 0x01010101u) << 4;
                w.hi[i] |= ((hw[i] >> (2 * g + 1)) & 0x01010101u) << 4;
            }
        }
        // d, dmin and the scale field: the block's first 16 bytes.
        const uint4 hd = *(const uint4*)b;
        w.d = h2f((u16)(hd.x & 0xffff));
        w.dmin = h2f((u16)(hd.x >> 16));
        k4_sm_int(hd.y, hd.z, hd.w, 2 * g, w.s0, w.m0);
        k4_sm_int(hd.y, hd.z, hd.w, 2 * g + 1, w.s1, w.m1);
        return w;
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        const int g = c >> 1, h = c & 1;
        const i8* p = act_q(a, t, blk * 256 + 64 * g + 16 * h);
        const i16* bp = a.bs + (i64)t * (a.cols >> 4) + blk * 16 + 4 * g + h;
        return A{ld_a16(p), ld_a16(p + 32), bp[0], bp[2], a.d[t * (a.cols >> 8) + blk]};
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        const int sumi = w.s0 * dot16(w.lo, x.a0) + w.s1 * dot16(w.hi, x.a1);
        const int summ = w.m0 * x.b0 + w.m1 * x.b1;
        return x.d * (w.d * (float)sumi - w.dmin * (float)summ);
    }
};
typedef DK45<false> DQ4_K;
typedef DK45<true> DQ5_K;

// Q6_K: chunk (h, k) = positions l = 8k..8k+7 of half h: quant bytes ql[64h+l], ql[64h+32+l],
// qh[32h+l] give elements 128h+32g+l (g = 0..3), sub-blocks 8h+2g+k/2.
struct DQ6_K {
    static const int QK = 256, BYTES = 210, CH = 8, DF = 1;
    struct W { u32 v[4][2]; int sc[4]; float d; };
    struct A { int2 q[4]; float d; };
    __device__ static __forceinline__ W load(const u8* b, int c) {
        const int h = c >> 2, k = c & 3;
        const u8* pa = b + 64 * h + 8 * k;
        const u8* ph = b + 128 + 32 * h + 8 * k;
        const u32 L[2] = {ld32_a2(pa), ld32_a2(pa + 4)};
        const u32 U[2] = {ld32_a2(pa + 32), ld32_a2(pa + 36)};
        const u32 H[2] = {ld32_a2(ph), ld32_a2(ph + 4)};
        W w;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            w.v[0][i] = __vsub4((L[i] & 0x0f0f0f0fu) | ((H[i] & 0x03030303u) << 4), 0x20202020u);
            w.v[1][i] = __vsub4((U[i] & 0x0f0f0f0fu) | (((H[i] >> 2) & 0x03030303u) << 4), 0x20202020u);
            w.v[2][i] = __vsub4(((L[i] >> 4) & 0x0f0f0f0fu) | (((H[i] >> 4) & 0x03030303u) << 4), 0x20202020u);
            w.v[3][i] = __vsub4(((U[i] >> 4) & 0x0f0f0f0fu) | (((H[i] >> 6) & 0x03030303u) << 4), 0x20202020u);
        }
#pragma unroll
        for (int g = 0; g < 4; g++) w.sc[g] = (i8)b[192 + 8 * h + 2 * g + (k >> 1)];
        w.d = h2f(ld16(b + 208));
        return w;
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        const int h = c >> 2, k = c & 3;
        const i8* p = act_q(a, t, blk * 256 + 128 * h + 8 * k);
        A x;
#pragma unroll
        for (int g = 0; g < 4; g++) x.q[g] = ld_a8(p + 32 * g);
        x.d = a.d[t * (a.cols >> 8) + blk];
        return x;
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        int sumi = 0;
#pragma unroll
        for (int g = 0; g < 4; g++) sumi += w.sc[g] * dot8(w.v[g][0], w.v[g][1], x.q[g]);
        return x.d * w.d * (float)sumi;
    }
};

// Lookup-table types, 32-element blocks (IQ4_NL, MXFP4; Q8_0 partner): the DLegacy chunks with
// levels from the table (lut4) instead of offset nibbles. CPU per block: sum += (dw * da) * isum.
template <bool MX>
struct DLut32 {
    static const int QK = 32, BYTES = MX ? 17 : 18, CH = 2, DF = 1;
    struct W { u32 lo0, lo1, hi0, hi1; float d; };
    struct A { int2 a0, a1; float d; };
    __device__ static __forceinline__ u32 levels(u32 q) {
        return MX ? lut4(q, LUT4_FP4) : lut4(q, LUT4_NL);
    }
    __device__ static __forceinline__ W load(const u8* b, int c) {
        // MXFP4 fields have no alignment (17-byte blocks); IQ4_NL's are 2-byte aligned.
        const u32 q0 = MX ? ld32_a1(b + 1 + 8 * c) : ld32_a2(b + 2 + 8 * c);
        const u32 q1 = MX ? ld32_a1(b + 5 + 8 * c) : ld32_a2(b + 6 + 8 * c);
        W w;
        w.lo0 = levels(q0 & 0x0f0f0f0fu);
        w.lo1 = levels(q1 & 0x0f0f0f0fu);
        w.hi0 = levels((q0 >> 4) & 0x0f0f0f0fu);
        w.hi1 = levels((q1 >> 4) & 0x0f0f0f0fu);
        w.d = MX ? e8m0_half(b[0]) : h2f(ld16(b));
        return w;
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        const i8* p = act_q(a, t, blk * 32 + 8 * c);
        return A{ld_a8(p), ld_a8(p + 16), a.d[t * (a.cols >> 5) + blk]};
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        return w.d * x.d * (float)(dot8(w.lo0, w.lo1, x.a0) + dot8(w.hi0, w.hi1, x.a1));
    }
};
typedef DLut32<false> DIQ4_NL;
typedef DLut32<true> DMXFP4;

// IQ4_XS (Q8_K partner): chunk c = sub-block c, its 16 nibble bytes at 8 + 16c (8-byte aligned:
// blocks are 136 bytes) give elements 32c.. (low) and 32c+16.. (high). CPU per block:
// acc += d * da * Σ_c (ls_c - 32) · isum_c.
struct DIQ4_XS {
    static const int QK = 256, BYTES = 136, CH = 8, DF = 1;
    struct W { u32 lo[4], hi[4]; int sc; float d; };
    struct A { int4 a0, a1; float d; };
    __device__ static __forceinline__ W load(const u8* b, int c) {
        const uint2 q01 = *(const uint2*)(b + 8 + 16 * c);
        const uint2 q23 = *(const uint2*)(b + 16 + 16 * c);
        const u32 q[4] = {q01.x, q01.y, q23.x, q23.y};
        W w;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w.lo[i] = lut4(q[i] & 0x0f0f0f0fu, LUT4_NL);
            w.hi[i] = lut4((q[i] >> 4) & 0x0f0f0f0fu, LUT4_NL);
        }
        w.sc = iq4xs_scale(b, c);
        w.d = h2f(ld16(b));
        return w;
    }
    __device__ static __forceinline__ A acts(const Acts& a, int t, int blk, int c) {
        const i8* p = act_q(a, t, blk * 256 + 32 * c);
        return A{ld_a16(p), ld_a16(p + 16), a.d[t * (a.cols >> 8) + blk]};
    }
    __device__ static __forceinline__ float dot(const W& w, const A& x) {
        return x.d * w.d * (float)(w.sc * (dot16(w.lo, x.a0) + dot16(w.hi, x.a1)));
    }
};

// y[t, r] = Σ_c W[r, c] x[t, c] (+ bias[r]) for nb <= NB activation rows. A team of TW warps
// owns R consecutive weight rows (4 * R / TW rows per block of 4 warps); its threads stride over
// the rows' chunks, so every weight byte is read once and every activation load serves R rows.
// TW > 1 puts more warps in flight for matrices with few rows.
template <class D, int NB, int R, int TW>
__device__ __forceinline__ void gemvq_impl(const u8* __restrict__ w, i64 row_bytes, int rows, int nb, const Acts& a,
                                           float* __restrict__ y, int ldy, const float* __restrict__ bias) {
    __shared__ float red[4][R * NB];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * (4 / TW) + warp / TW) * R;
    if (TW == 1 && r0 >= rows) {
        pdl_wait();
        return;
    }
    const int tid = (warp % TW) * 32 + lane;
    const u8* rowp[R];
#pragma unroll
    for (int k = 0; k < R; k++) rowp[k] = w + (i64)min(r0 + k, rows - 1) * row_bytes;
    const int n = (a.cols / D::QK) * D::CH;
    float acc[R][NB];
#pragma unroll
    for (int k = 0; k < R; k++)
#pragma unroll
        for (int t = 0; t < NB; t++) acc[k][t] = 0.f;
    bool waited = false;
#pragma unroll 2
    for (int i = tid; i < n; i += 32 * TW) {
        const int blk = i / D::CH, c = i - blk * D::CH;
        typename D::W wv[R];
#pragma unroll
        for (int k = 0; k < R; k++) wv[k] = D::load(rowp[k] + (i64)blk * D::BYTES, c);
        // The first weights are on their way: now wait for the quantizer's output.
        if (!waited) {
            pdl_wait();
            waited = true;
        }
#pragma unroll
        for (int t = 0; t < NB; t++) {
            if (t < nb) {
                const typename D::A x = D::acts(a, t, blk, c);
#pragma unroll
                for (int k = 0; k < R; k++) acc[k][t] += D::dot(wv[k], x);
            }
        }
    }
    if (!waited) pdl_wait();
#pragma unroll
    for (int k = 0; k < R; k++)
#pragma unroll
        for (int t = 0; t < NB; t++) acc[k][t] = warp_sum(acc[k][t]);
    if (TW > 1) {
        if (lane == 0) {
#pragma unroll
            for (int k = 0; k < R; k++)
#pragma unroll
                for (int t = 0; t < NB; t++) red[warp][k * NB + t] = acc[k][t];
        }
        __syncthreads();
        if (warp % TW == 0 && lane < R * NB) {
            const int k = lane / NB, t = lane - k * NB;
            float s = 0.f;
#pragma unroll
            for (int v = 0; v < TW; v++) s += red[warp + v][lane];
            if (t < nb && r0 + k < rows) y[(i64)t * ldy + r0 + k] = s + (bias ? bias[r0 + k] : 0.f);
        }
    } else {
#pragma unroll
        for (int k = 0; k < R; k++)
#pragma unroll
            for (int t = 0; t < NB; t++)
                if (lane == k * NB + t && t < nb && r0 + k < rows)
                    y[(i64)t * ldy + r0 + k] = acc[k][t] + (bias ? bias[r0 + k] : 0.f);
    }
}

// Instantiations gemvq_<type>_<NB>r<R>w<TW>: NB batch rows at most (nb of them used), R weight
// rows per team of TW warps.
#define GEMVQ_KERNEL(NAME, D, NB, R, TW)                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        gemvq_##NAME##_##NB##r##R##w##TW(const u8* __restrict__ w, i64 row_bytes, int rows, int cols, \
                                         int nb, const i8* __restrict__ q, const float* __restrict__ d, \
                                         const i16* __restrict__ bs, float* __restrict__ y, int ldy,   \
                                         const float* __restrict__ bias) {                            \
        const Acts a = {q, d, bs, cols};                                                              \
        gemvq_impl<D, NB, R, TW>(w, row_bytes, rows, nb, a, y, ldy, bias);                            \
    }
#define GEMVQ_NB(NAME, D, NB) \
    GEMVQ_KERNEL(NAME, D, NB, 2, 4) GEMVQ_KERNEL(NAME, D, NB, 2, 1) GEMVQ_KERNEL(NAME, D, NB, 4, 1)
#define GEMVQ_KERNELS(NAME, D) GEMVQ_NB(NAME, D, 1) GEMVQ_NB(NAME, D, 2) GEMVQ_NB(NAME, D, 4) GEMVQ_NB(NAME, D, 8)

// Applies MACRO(NAME, DOT) to every quantized weight type.
#define FOR_EACH_QUANT_TYPE(MACRO) \
    MACRO(q4_0, DQ4_0)             \
    MACRO(q4_1, DQ4_1)             \
    MACRO(q5_0, DQ5_0)             \
    MACRO(q5_1, DQ5_1)             \
    MACRO(q8_0, DQ8_0)             \
    MACRO(q2_k, DQ2_K)             \
    MACRO(q3_k, DQ3_K)             \
    MACRO(q4_k, DQ4_K)             \
    MACRO(q5_k, DQ5_K)             \
    MACRO(q6_k, DQ6_K)             \
    MACRO(iq4_nl, DIQ4_NL)         \
    MACRO(iq4_xs, DIQ4_XS)         \
    MACRO(mxfp4, DMXFP4)

FOR_EACH_QUANT_TYPE(GEMVQ_KERNELS)

// ---------------------------------------------------------------------------------------------
// MoE expert GEMV: y[p, r] = Σ_c W_e[r, c] x_q[p / x_div, c] for (token, slot) pairs p, where
// e = route[token * 2 * n_used + slot] (route rows: n_used expert ids, then n_used weights) and W_e
// is expert e's matrix (expert_bytes apart). Grid (ceil(rows / (4 * R / TW)), pairs of this launch);
// pair p = p0 + blockIdx.y. The activations were quantized by the partner quantizer starting at row
// p0 / x_div (x_div = n_used: one row per token shared by its experts; 1: one row per pair). The
// route is written by an earlier kernel than the quantizer, so the expert id is read (and the
// first weights requested) before waiting on the quantizer.
// ---------------------------------------------------------------------------------------------
template <class D, int R, int TW>
__device__ __forceinline__ void moe_gemvq_impl(const u8* __restrict__ w, i64 expert_bytes, i64 row_bytes,
                                               int rows, int cols, const i8* __restrict__ q,
                                               const float* __restrict__ d, const i16* __restrict__ bs,
                                               int p0, int x_div, const u32* __restrict__ route, int n_used,
                                               float* __restrict__ y, int ldy) {
    const int p = p0 + blockIdx.y;
    const int token = p / n_used, slot = p - token * n_used;
    const u32 e = route[(i64)token * 2 * n_used + slot];
    const i64 xr = p / x_div - p0 / x_div;
    const Acts a = {q + xr * cols, d + xr * (cols / D::QK) * D::DF, bs + xr * (cols >> 4), cols};
    gemvq_impl<D, 1, R, TW>(w + (i64)e * expert_bytes, row_bytes, rows, 1, a, y + (i64)blockIdx.y * ldy, ldy,
                            nullptr);
}

// Instantiations moe_gemvq_<type>_r<R>w<TW>: R weight rows per team of TW warps.
#define MOE_GEMVQ_KERNEL(NAME, D, R, TW)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) moe_gemvq_##NAME##_r##R##w##TW(                     \
        const u8* __restrict__ w, i64 expert_bytes, i64 row_bytes, int rows, int cols,                     \
        const i8* __restrict__ q, const float* __restrict__ d, const i16* __restrict__ bs, int p0,         \
        int x_div, const u32* __restrict__ route, int n_used, float* __restrict__ y, int ldy) {            \
        moe_gemvq_impl<D, R, TW>(w, expert_bytes, row_bytes, rows, cols, q, d, bs, p0, x_div, route, n_used, \
                                 y, ldy);                                                                  \
    }
#define MOE_GEMVQ_KERNELS(NAME, D) \
    MOE_GEMVQ_KERNEL(NAME, D, 1, 1) MOE_GEMVQ_KERNEL(NAME, D, 2, 1) MOE_GEMVQ_KERNEL(NAME, D, 2, 4)

FOR_EACH_QUANT_TYPE(MOE_GEMVQ_KERNELS)
