// Weights in their GGUF block layout: dequantize to f16/bf16 (prefill GEMM input), the f32
// GEMV of float weights (quantized weights use the int8 GEMV in gemv.cu), embedding lookup and
// the MoE expert GEMV of float experts (quantized experts: moe_gemvq_* in gemv.cu).

// Dequantizes n_units units (8 values each) of a contiguous run of blocks into f16.
template <class T>
__device__ __forceinline__ void dequant_impl(const u8* __restrict__ src, u16* __restrict__ dst,
                                             i64 n_units) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_units) return;
    const i64 blk = i / T::U;
    const int u = (int)(i % T::U);
    float v[8];
    int o0, o1;
    T::unit(src + blk * T::BYTES, u, v, o0, o1);
    u16* d = dst + blk * T::QK;
    uint2 a, b;
    a.x = pack_h2(v[0], v[1]); a.y = pack_h2(v[2], v[3]);
    b.x = pack_h2(v[4], v[5]); b.y = pack_h2(v[6], v[7]);
    *(uint2*)(d + o0) = a;
    *(uint2*)(d + o1) = b;
}

#define DEQUANT_KERNEL(NAME, T)                                                               \
    extern "C" __global__ void dequant_##NAME(const u8* __restrict__ src, u16* __restrict__ dst, \
                                              i64 n_units) {                                  \
        dequant_impl<T>(src, dst, n_units);                                                   \
    }
FOR_EACH_TYPE(DEQUANT_KERNEL)

// y[b, r] = sum_c W[r, c] x[b, c] (+ bias[r]) for NB batch rows. Each warp owns R consecutive
// weight rows and its lanes stride over the rows' units, so every block is read exactly once and
// each activation load serves R rows (activations are 8x the bytes of 4-bit weights per unit).
#define GEMV_WARPS 4
template <class T, int NB, int R>
__device__ __forceinline__ void gemv_impl(const u8* __restrict__ w, i64 row_bytes, int rows, int cols,
                                          const float* __restrict__ x, int ldx, float* __restrict__ y,
                                          int ldy, const float* __restrict__ bias) {
    const int lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * R;
    if (r0 >= rows) return;
    const u8* rowp[R];
#pragma unroll
    for (int k = 0; k < R; k++) rowp[k] = w + (i64)min(r0 + k, rows - 1) * row_bytes;
    const int n_units = (cols / T::QK) * T::U;
    float acc[R][NB];
#pragma unroll
    for (int k = 0; k < R; k++)
#pragma unroll
        for (int b = 0; b < NB; b++) acc[k][b] = 0.f;
#pragma unroll 2
    for (int i = lane; i < n_units; i += 32) {
        const int blk = i / T::U;
        const int u = i - blk * T::U;
        float v[R][8];
        int o0, o1;
#pragma unroll
        for (int k = 0; k < R; k++) T::unit(rowp[k] + (i64)blk * T::BYTES, u, v[k], o0, o1);
        const int base = blk * T::QK;
#pragma unroll
        for (int b = 0; b < NB; b++) {
            const float4 xa = *(const float4*)(x + (i64)b * ldx + base + o0);
            const float4 xb = *(const float4*)(x + (i64)b * ldx + base + o1);
#pragma unroll
            for (int k = 0; k < R; k++)
                acc[k][b] += v[k][0] * xa.x + v[k][1] * xa.y + v[k][2] * xa.z + v[k][3] * xa.w +
                             v[k][4] * xb.x + v[k][5] * xb.y + v[k][6] * xb.z + v[k][7] * xb.w;
        }
    }
#pragma unroll
    for (int k = 0; k < R; k++) {
#pragma unroll
        for (int b = 0; b < NB; b++) {
            const float s = warp_sum(acc[k][b]);
            const int r = r0 + k;
            if (lane == 0 && r < rows) y[(i64)b * ldy + r] = s + (bias ? bias[r] : 0.f);
        }
    }
}

// Instantiations gemv_<type>_<NB>r<R> for float weights: R rows per warp (register budget:
// R * NB accumulators, R * 8 decoded values). The float MoE expert GEMV uses gemv_impl<T, 1, 1>.
#define GEMV_KERNEL_NB(NAME, T, NB, R)                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                            \
        gemv_##NAME##_##NB##r##R(const u8* __restrict__ w, i64 row_bytes, int rows, int cols, \
                                 const float* __restrict__ x, int ldx, float* __restrict__ y, int ldy, \
                                 const float* __restrict__ bias) {                           \
        gemv_impl<T, NB, R>(w, row_bytes, rows, cols, x, ldx, y, ldy, bias);                 \
    }
#define GEMV_KERNELS(NAME, T)                                                                \
    GEMV_KERNEL_NB(NAME, T, 1, 1) GEMV_KERNEL_NB(NAME, T, 2, 2) GEMV_KERNEL_NB(NAME, T, 4, 2) \
    GEMV_KERNEL_NB(NAME, T, 8, 1)
FOR_EACH_FLOAT_TYPE(GEMV_KERNELS)

// Single-row GEMV with the whole block (4 warps) on one weight row: for matrices with few rows
// (k/v projections) the one-warp-per-row kernel leaves too few warps in flight to cover latency.
template <class T>
__device__ __forceinline__ void gemv_splitk_impl(const u8* __restrict__ w, i64 row_bytes, int rows, int cols,
                                                 const float* __restrict__ x, float* __restrict__ y,
                                                 const float* __restrict__ bias) {
    __shared__ float red[GEMV_WARPS];
    const int r = blockIdx.x;
    const u8* row = w + (i64)r * row_bytes;
    const int n_units = (cols / T::QK) * T::U;
    float acc = 0.f;
#pragma unroll 2
    for (int i = threadIdx.x; i < n_units; i += GEMV_WARPS * 32) {
        const int blk = i / T::U;
        const int u = i - blk * T::U;
        float v[8];
        int o0, o1;
        T::unit(row + (i64)blk * T::BYTES, u, v, o0, o1);
        const int base = blk * T::QK;
        const float4 xa = *(const float4*)(x + base + o0);
        const float4 xb = *(const float4*)(x + base + o1);
        acc += v[0] * xa.x + v[1] * xa.y + v[2] * xa.z + v[3] * xa.w + v[4] * xb.x + v[5] * xb.y +
               v[6] * xb.z + v[7] * xb.w;
    }
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < GEMV_WARPS; k++) s += red[k];
        y[r] = s + (bias ? bias[r] : 0.f);
    }
}

#define GEMV_SPLITK_KERNEL(NAME, T)                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                              \
        gemv_##NAME##_1k(const u8* __restrict__ w, i64 row_bytes, int rows, int cols,          \
                         const float* __restrict__ x, float* __restrict__ y,                   \
                         const float* __restrict__ bias) {                                     \
        gemv_splitk_impl<T>(w, row_bytes, rows, cols, x, y, bias);                             \
    }
FOR_EACH_FLOAT_TYPE(GEMV_SPLITK_KERNEL)

// Embedding lookup: out[t, :] = table[ids[t], :] * scale. Grid (ceil(units/128), n_tokens).
template <class T>
__device__ __forceinline__ void get_rows_impl(const u8* __restrict__ table, i64 row_bytes, int cols,
                                              const i32* __restrict__ ids, float* __restrict__ out,
                                              int ldo, float scale) {
    const int t = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int n_units = (cols / T::QK) * T::U;
    if (i >= n_units) return;
    const int blk = i / T::U;
    const int u = i - blk * T::U;
    const u8* row = table + (i64)ids[t] * row_bytes;
    float v[8];
    int o0, o1;
    T::unit(row + (i64)blk * T::BYTES, u, v, o0, o1);
    float* o = out + (i64)t * ldo + blk * T::QK;
    *(float4*)(o + o0) = make_float4(v[0] * scale, v[1] * scale, v[2] * scale, v[3] * scale);
    *(float4*)(o + o1) = make_float4(v[4] * scale, v[5] * scale, v[6] * scale, v[7] * scale);
}

#define GET_ROWS_KERNEL(NAME, T)                                                                \
    extern "C" __global__ void get_rows_##NAME(const u8* __restrict__ table, i64 row_bytes, int cols, \
                                               const i32* __restrict__ ids, float* __restrict__ out, \
                                               int ldo, float scale) {                          \
        get_rows_impl<T>(table, row_bytes, cols, ids, out, ldo, scale);                         \
    }
FOR_EACH_TYPE(GET_ROWS_KERNEL)

// MoE expert GEMV of float experts (F32, F16, BF16). Grid (ceil(rows/GEMV_WARPS), n_pairs) where
// pair p = token * n_used + slot.
// The expert of pair p is route[token * 2 * n_used + slot] (route rows: n_used ids, n_used weights).
// Input row of pair p is x[p / x_div] (x_div = n_used: the token's activations; 1: per-pair rows).
template <class T>
__device__ __forceinline__ void moe_gemv_impl(const u8* __restrict__ w, i64 expert_bytes, i64 row_bytes,
                                              int rows, int cols, const float* __restrict__ x, int ldx,
                                              int x_div, const u32* __restrict__ route, int n_used,
                                              float* __restrict__ y, int ldy) {
    const int p = blockIdx.y;
    const int token = p / n_used, slot = p - token * n_used;
    const u32 e = route[(i64)token * 2 * n_used + slot];
    gemv_impl<T, 1, 1>(w + (i64)e * expert_bytes, row_bytes, rows, cols, x + (i64)(p / x_div) * ldx, ldx,
                       y + (i64)p * ldy, ldy, nullptr);
}

#define MOE_GEMV_KERNEL(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                   \
        moe_gemv_##NAME(const u8* __restrict__ w, i64 expert_bytes, i64 row_bytes, int rows, int cols, \
                        const float* __restrict__ x, int ldx, int x_div, const u32* __restrict__ route, \
                        int n_used, float* __restrict__ y, int ldy) {                               \
        moe_gemv_impl<T>(w, expert_bytes, row_bytes, rows, cols, x, ldx, x_div, route, n_used, y, ldy); \
    }
FOR_EACH_FLOAT_TYPE(MOE_GEMV_KERNEL)
