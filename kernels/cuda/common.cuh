// Shared helpers for every pshard CUDA source. Prepended to each .cu file before NVRTC compiles it,
// so the sources need no system headers (NVRTC ships none by default).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f2bf(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Two f32 values as one packed f16x2 word (lower index in the low half).
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    return (u32)f2h(lo) | ((u32)f2h(hi) << 16);
}

__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }

// 4 bytes from a 2-byte aligned address (many block layouts are only 2-byte aligned).
__device__ __forceinline__ u32 ld32_a2(const u8* p) {
    const u16* q = (const u16*)p;
    return (u32)q[0] | ((u32)q[1] << 16);
}

__device__ __forceinline__ u32 ld32(const u8* p) { return *(const u32*)p; }

// 2 bytes from any address (little-endian).
__device__ __forceinline__ u32 ldb16(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8); }

// Spreads the 4 low bits of v to bit 0 of each byte.
__device__ __forceinline__ u32 bits_to_bytes(u32 v) { return ((v & 0xfu) * 0x00204081u) & 0x01010101u; }

// ---------------------------------------------------------------------------------------------
// Asynchronous copies into shared memory (sm_80+) and programmatic dependent launch (sm_90+).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

// Copies the first `n` (0..16) of 16 bytes from global `src` to shared `dst` (both 16-byte
// aligned) and zero-fills the rest: only those `n` bytes are read.
__device__ __forceinline__ void cp_async16_n(void* dst, const void* src, int n) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(n));
}

// 16-byte async copy global -> shared; zero-fills when !pred.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
    cp_async16_n(dst, src, pred ? 16 : 0);
}

// 4-byte async copy of `n` (0 or 4) bytes, both addresses 4-byte aligned (4-byte copies exist only
// in the .ca cache mode); zero-fills when n is 0.
__device__ __forceinline__ void cp_async4_n(void* dst, const void* src, int n) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait0() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// A kernel launched as a programmatic dependent of the one before it on the stream (Hopper) starts
// while that one runs (once it called pdl_launch_dependents) and must pdl_wait before reading what
// it writes. Both instructions are no-ops without that launch mode.
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

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

// ---------------------------------------------------------------------------------------------
// Quant block "units": every supported type is decoded 8 values at a time, as two runs of 4
// consecutive elements at offsets o0 and o1 inside the block. A block of QK elements holds
// QK/8 units. Float types use a pseudo-block of 8 elements (one unit).
// ---------------------------------------------------------------------------------------------

struct TF32 {
    static const int QK = 8, BYTES = 32, U = 1;
    __device__ static __forceinline__ void unit(const u8* b, int, float* v, int& o0, int& o1) {
        const float4 a = ((const float4*)b)[0];
        const float4 c = ((const float4*)b)[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = c.x; v[5] = c.y; v[6] = c.z; v[7] = c.w;
        o0 = 0; o1 = 4;
    }
};

struct TF16 {
    static const int QK = 8, BYTES = 16, U = 1;
    __device__ static __forceinline__ void unit(const u8* b, int, float* v, int& o0, int& o1) {
        const uint4 a = *(const uint4*)b;
        const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = h2f((u16)(w[i] & 0xffff));
            v[2 * i + 1] = h2f((u16)(w[i] >> 16));
        }
        o0 = 0; o1 = 4;
    }
};

struct TBF16 {
    static const int QK = 8, BYTES = 16, U = 1;
    __device__ static __forceinline__ void unit(const u8* b, int, float* v, int& o0, int& o1) {
        const uint4 a = *(const uint4*)b;
        const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = bf2f((u16)(w[i] & 0xffff));
            v[2 * i + 1] = bf2f((u16)(w[i] >> 16));
        }
        o0 = 0; o1 = 4;
    }
};

struct TQ4_0 {
    static const int QK = 32, BYTES = 18, U = 4;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const float d = h2f(ld16(b));
        const u32 w = ld32_a2(b + 2 + 4 * u);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 q = (w >> (8 * i)) & 0xff;
            v[i] = ((int)(q & 0xf) - 8) * d;
            v[4 + i] = ((int)(q >> 4) - 8) * d;
        }
        o0 = 4 * u; o1 = 16 + 4 * u;
    }
};

struct TQ4_1 {
    static const int QK = 32, BYTES = 20, U = 4;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const float d = h2f(ld16(b)), m = h2f(ld16(b + 2));
        const u32 w = ld32(b + 4 + 4 * u);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 q = (w >> (8 * i)) & 0xff;
            v[i] = (float)(q & 0xf) * d + m;
            v[4 + i] = (float)(q >> 4) * d + m;
        }
        o0 = 4 * u; o1 = 16 + 4 * u;
    }
};

struct TQ5_0 {
    static const int QK = 32, BYTES = 22, U = 4;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const float d = h2f(ld16(b));
        const u32 qh = ld32_a2(b + 2);
        const u32 w = ld32_a2(b + 6 + 4 * u);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int j = 4 * u + i;
            const u32 q = (w >> (8 * i)) & 0xff;
            const u32 h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            v[i] = ((int)((q & 0xf) | (h0 << 4)) - 16) * d;
            v[4 + i] = ((int)((q >> 4) | (h1 << 4)) - 16) * d;
        }
        o0 = 4 * u; o1 = 16 + 4 * u;
    }
};

struct TQ5_1 {
    static const int QK = 32, BYTES = 24, U = 4;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const float d = h2f(ld16(b)), m = h2f(ld16(b + 2));
        const u32 qh = ld32(b + 4);
        const u32 w = ld32(b + 8 + 4 * u);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int j = 4 * u + i;
            const u32 q = (w >> (8 * i)) & 0xff;
            const u32 h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            v[i] = (float)((q & 0xf) | (h0 << 4)) * d + m;
            v[4 + i] = (float)((q >> 4) | (h1 << 4)) * d + m;
        }
        o0 = 4 * u; o1 = 16 + 4 * u;
    }
};

struct TQ8_0 {
    static const int QK = 32, BYTES = 34, U = 4;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const float d = h2f(ld16(b));
        const u32 w0 = ld32_a2(b + 2 + 8 * u), w1 = ld32_a2(b + 6 + 8 * u);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[i] = (float)(i8)((w0 >> (8 * i)) & 0xff) * d;
            v[4 + i] = (float)(i8)((w1 >> (8 * i)) & 0xff) * d;
        }
        o0 = 8 * u; o1 = 8 * u + 4;
    }
};

struct TQ2_K {
    static const int QK = 256, BYTES = 84, U = 32;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const int h = u >> 4, r = u & 15, l0 = 4 * (r & 7), jp = r >> 3;
        const float d = h2f(ld16(b + 80)), dmin = h2f(ld16(b + 82));
        const u32 w = ld32(b + 16 + 32 * h + l0);
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int j = 2 * jp + k;
            const u32 sc = b[8 * h + 2 * j + (l0 >> 4)];
            const float dl = d * (float)(sc & 0xf), ml = dmin * (float)(sc >> 4);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u32 q = (w >> (8 * i + 2 * j)) & 3;
                v[4 * k + i] = dl * (float)q - ml;
            }
        }
        o0 = 128 * h + 32 * (2 * jp) + l0;
        o1 = 128 * h + 32 * (2 * jp + 1) + l0;
    }
};

// 6-bit scale `j` (0..15) of a Q3_K block, packed in 12 bytes.
__device__ __forceinline__ int q3k_scale(const u8* s, int j) {
    const int low = j < 8 ? (s[j] & 0xf) : (s[j - 8] >> 4);
    const int high = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
    return (low | (high << 4)) - 32;
}

struct TQ3_K {
    static const int QK = 256, BYTES = 110, U = 32;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const int h = u >> 4, r = u & 15, l0 = 4 * (r & 7), jp = r >> 3;
        const float d = h2f(ld16(b + 108));
        const u32 w = ld32_a2(b + 32 + 32 * h + l0);
        const u32 hm = ld32_a2(b + l0);
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int j = 2 * jp + k;
            const float dl = d * (float)q3k_scale(b + 96, 8 * h + 2 * j + (l0 >> 4));
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int q = (int)((w >> (8 * i + 2 * j)) & 3);
                const int hb = (int)((hm >> (8 * i + 4 * h + j)) & 1);
                v[4 * k + i] = dl * (float)(q - (hb ? 0 : 4));
            }
        }
        o0 = 128 * h + 32 * (2 * jp) + l0;
        o1 = 128 * h + 32 * (2 * jp + 1) + l0;
    }
};

// 6-bit scale and min `j` (0..7) of a Q4_K/Q5_K block, packed in 12 bytes. Branch-free (selects),
// so lanes decoding different groups do not diverge.
__device__ __forceinline__ void k4_scale_min(const u8* s, int j, float& sc, float& m) {
    const u32 sj = s[j], sj4 = s[j + 4], sjm4 = s[j & 3];
    const bool lo = j < 4;
    sc = (float)(lo ? (sj & 63) : ((sj4 & 0xf) | ((sjm4 >> 6) << 4)));
    m = (float)(lo ? (sj4 & 63) : ((sj4 >> 4) | ((sj >> 6) << 4)));
}

struct TQ4_K {
    static const int QK = 256, BYTES = 144, U = 32;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const int g = u >> 3, l0 = 4 * (u & 7);
        const float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
        float s0, m0, s1, m1;
        k4_scale_min(b + 4, 2 * g, s0, m0);
        k4_scale_min(b + 4, 2 * g + 1, s1, m1);
        const float d0 = d * s0, d1 = d * s1, n0 = dmin * m0, n1 = dmin * m1;
        const u32 w = ld32(b + 16 + 32 * g + l0);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 q = (w >> (8 * i)) & 0xff;
            v[i] = d0 * (float)(q & 0xf) - n0;
            v[4 + i] = d1 * (float)(q >> 4) - n1;
        }
        o0 = 64 * g + l0; o1 = 64 * g + 32 + l0;
    }
};

struct TQ5_K {
    static const int QK = 256, BYTES = 176, U = 32;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const int g = u >> 3, l0 = 4 * (u & 7);
        const float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
        float s0, m0, s1, m1;
        k4_scale_min(b + 4, 2 * g, s0, m0);
        k4_scale_min(b + 4, 2 * g + 1, s1, m1);
        const float d0 = d * s0, d1 = d * s1, n0 = dmin * m0, n1 = dmin * m1;
        const u32 w = ld32(b + 48 + 32 * g + l0);
        const u32 hq = ld32(b + 16 + l0);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 q = (w >> (8 * i)) & 0xff;
            const u32 hb = (hq >> (8 * i)) & 0xff;
            const u32 q0 = (q & 0xf) + (((hb >> (2 * g)) & 1) << 4);
            const u32 q1 = (q >> 4) + (((hb >> (2 * g + 1)) & 1) << 4);
            v[i] = d0 * (float)q0 - n0;
            v[4 + i] = d1 * (float)q1 - n1;
        }
        o0 = 64 * g + l0; o1 = 64 * g + 32 + l0;
    }
};

struct TQ6_K {
    static const int QK = 256, BYTES = 210, U = 32;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const int h = u >> 4, r = u & 15, l0 = 4 * (r & 7), p = r >> 3;
        const float d = h2f(ld16(b + 208));
        const u32 wl = ld32_a2(b + 64 * h + l0 + 32 * p);
        const u32 wh = ld32_a2(b + 128 + 32 * h + l0);
        const float d0 = d * (float)(i8)b[192 + 8 * h + (l0 >> 4) + 2 * p];
        const float d1 = d * (float)(i8)b[192 + 8 * h + (l0 >> 4) + 4 + 2 * p];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 ql = (wl >> (8 * i)) & 0xff;
            const u32 qh = (wh >> (8 * i)) & 0xff;
            const int q0 = (int)((ql & 0xf) | (((qh >> (2 * p)) & 3) << 4)) - 32;
            const int q1 = (int)((ql >> 4) | (((qh >> (4 + 2 * p)) & 3) << 4)) - 32;
            v[i] = d0 * (float)q0;
            v[4 + i] = d1 * (float)q1;
        }
        o0 = 128 * h + l0 + 32 * p; o1 = 128 * h + l0 + 64 + 32 * p;
    }
};

// ---------------------------------------------------------------------------------------------
// Lookup-table types (IQ4_NL, IQ4_XS, MXFP4): each nibble indexes 16 signed byte levels, given as
// four little-endian words (the CPU's lut4::NL and lut4::FP4; a host test compares them).
// ---------------------------------------------------------------------------------------------

#define LUT4_NL 0xbfad9881u, 0xf6eaddcfu, 0x26190d01u, 0x71594535u
#define LUT4_FP4 0x03020100u, 0x0c080604u, 0xfdfeff00u, 0xf4f8fafcu

// Four nibbles (one per byte of v, each 0..15) to their levels, one signed byte each: two byte
// permutes pick from the lower and upper eight entries, bit 3 of each nibble selects between them.
__device__ __forceinline__ u32 lut4(u32 v, u32 t0, u32 t1, u32 t2, u32 t3) {
    const u32 s = (v & 0x7u) | ((v >> 4) & 0x70u) | ((v >> 8) & 0x700u) | ((v >> 12) & 0x7000u);
    const u32 lo = __byte_perm(t0, t1, s);
    const u32 hi = __byte_perm(t2, t3, s);
    const u32 m = ((v >> 3) & 0x01010101u) * 0xffu;
    return (hi & m) | (lo & ~m);
}

// 4 bytes from any address (MXFP4 blocks are 17 bytes, so their fields have no alignment).
__device__ __forceinline__ u32 ld32_a1(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// 2^(e - 128): the MXFP4 block scale (half the E8M0 value, the levels being doubled E2M1 values).
__device__ __forceinline__ float e8m0_half(u32 e) {
    return __uint_as_float(e < 2 ? (0x00200000u << e) : ((e - 1) << 23));
}

// One unit of a lookup-table type: the 4 bytes `w` hold elements o0..o0+3 (low nibbles) and
// o1..o1+3 (high nibbles), each level times `d`.
__device__ __forceinline__ void lut4_unit(u32 w, u32 t0, u32 t1, u32 t2, u32 t3, float d, float* v) {
    const u32 lo = lut4(w & 0x0f0f0f0fu, t0, t1, t2, t3);
    const u32 hi = lut4((w >> 4) & 0x0f0f0f0fu, t0, t1, t2, t3);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        v[i] = (float)(i8)((lo >> (8 * i)) & 0xff) * d;
        v[4 + i] = (float)(i8)((hi >> (8 * i)) & 0xff) * d;
    }
}

// IQ4_NL: f16 d, 16 nibble bytes; element j low nibble of qs[j], j + 16 its high nibble.
struct TIQ4_NL {
    static const int QK = 32, BYTES = 18, U = 4;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        lut4_unit(ld32_a2(b + 2 + 4 * u), LUT4_NL, h2f(ld16(b)), v);
        o0 = 4 * u; o1 = 16 + 4 * u;
    }
};

// MXFP4: E8M0 exponent byte, 16 nibble bytes (as IQ4_NL), levels FP4.
struct TMXFP4 {
    static const int QK = 32, BYTES = 17, U = 4;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        lut4_unit(ld32_a1(b + 1 + 4 * u), LUT4_FP4, e8m0_half(b[0]), v);
        o0 = 4 * u; o1 = 16 + 4 * u;
    }
};

// Signed 6-bit scale ls - 32 of IQ4_XS sub-block j: low nibble in scales_l[j / 2] (bytes 4..8),
// top 2 bits at bit 2j of scales_h (bytes 2..4). Byte loads: any alignment.
__device__ __forceinline__ int iq4xs_scale(const u8* b, int j) {
    const int lo = (b[4 + (j >> 1)] >> (4 * (j & 1))) & 0xf;
    const int hi = (ldb16(b + 2) >> (2 * j)) & 3;
    return (lo | (hi << 4)) - 32;
}

// IQ4_XS: f16 d, u16 scales_h, 4 B scales_l, 8 sub-blocks of 32 with 16 nibble bytes each at
// 8 + 16j. Unit u: sub-block j = u / 4, bytes 4 (u % 4)..+4 of its run.
struct TIQ4_XS {
    static const int QK = 256, BYTES = 136, U = 32;
    __device__ static __forceinline__ void unit(const u8* b, int u, float* v, int& o0, int& o1) {
        const int j = u >> 2, k = u & 3;
        const float dl = h2f(ld16(b)) * (float)iq4xs_scale(b, j);
        lut4_unit(ld32(b + 8 + 16 * j + 4 * k), LUT4_NL, dl, v);
        o0 = 32 * j + 4 * k; o1 = 32 * j + 16 + 4 * k;
    }
};

// Applies MACRO(NAME, TYPE) to every supported weight type.
#define FOR_EACH_TYPE(MACRO) \
    MACRO(f32, TF32)         \
    MACRO(f16, TF16)         \
    MACRO(bf16, TBF16)       \
    MACRO(q4_0, TQ4_0)       \
    MACRO(q4_1, TQ4_1)       \
    MACRO(q5_0, TQ5_0)       \
    MACRO(q5_1, TQ5_1)       \
    MACRO(q8_0, TQ8_0)       \
    MACRO(q2_k, TQ2_K)       \
    MACRO(q3_k, TQ3_K)       \
    MACRO(q4_k, TQ4_K)       \
    MACRO(q5_k, TQ5_K)       \
    MACRO(q6_k, TQ6_K)       \
    MACRO(iq4_nl, TIQ4_NL)   \
    MACRO(iq4_xs, TIQ4_XS)   \
    MACRO(mxfp4, TMXFP4)

// Applies MACRO(NAME, TYPE) to the float weight types (those without an int8 dot path).
#define FOR_EACH_FLOAT_TYPE(MACRO) \
    MACRO(f32, TF32)               \
    MACRO(f16, TF16)               \
    MACRO(bf16, TBF16)
