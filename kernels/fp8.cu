// FP8 E4M3 on the GPU: the codec, per-token activation quantization, the decode-sized product
// with E4M3 weights, and the scale epilogue of the cuBLASLt FP8 GEMM's fallback. The host twin
// is src/ops/fp8.rs (same encoding, bit for bit: round to nearest, ties to even, saturating to
// +-448).
//
// Scales multiply: w = e4m3(code) * w_scale[row]; x = e4m3(code) * x_scale[row].
//
// fp8_quantize_rows_{dt}: grid (m), FP8_QUANT_THREADS threads; row r of x [m, k] becomes
//   codes[r, :] = e4m3(x[r, :] / s) with s = static_scale when > 0 (a checkpoint's input_scale),
//   else the row's max |x| / 448 (1 for an all-zero row), written to scales[r].
// fp8_gemv_{dt}: grid (ceil(n / FP8_GEMV_WARPS)), FP8_GEMV_WARPS * 32 threads, m <= 8:
//   y[r, j] = (sum_c e4m3(W[j, c]) * x[r, c]) * w_scale[j] + bias[j]; W [n, k] codes, x in T
//   (the activations are not quantized: every weight byte is read once, 16 per load, and the
//   product is exact in f32 but for summation order). Needs k % 16 == 0.
// fp8_gemv_gated_{dt}: the gated MLP's gate|up product with the activation fused, as gemv.cu's
//   gemv_gated (gate and up rounded to T before act(gate) * up).
// fp8_scale_rows_{dt}: y[r, j] = y[r, j] * x_scale[r] * w_scale[j] + bias[j], in place (the
//   product ran with unit scales where cuBLASLt has no per-row scale mode).

#define FP8_QUANT_THREADS 256
#define FP8_GEMV_WARPS 4
#define FP8_GEMV_MAX_M 8
#define FP8_GEMV_UNROLL 2
#define E4M3_MAX 448.0f

// The E4M3 code nearest to x (ties to even), saturated to +-448; NaN gives 0x7F.
__device__ __forceinline__ unsigned int f32_to_e4m3(float x) {
    const unsigned int sign = (__float_as_uint(x) >> 24) & 0x80u;
    const float a = fabsf(x);
    if (a != a) return 0x7Fu;
    if (a >= E4M3_MAX) return sign | 0x7Eu;
    if (a < 0.015625f) {
        // Subnormals (spacing 2^-9): the code is the count of 2^-9 steps; 8 is the smallest
        // normal's code, which the rounding may reach.
        return sign | (unsigned int)rintf(a * 512.0f);
    }
    int e = (int)((__float_as_uint(a) >> 23) & 0xFF) - 127;  // floor(log2 a), a normal f32
    float q = rintf(ldexpf(a, 3 - e));                          // 8..=16
    if (q >= 16.0f) {
        q = 8.0f;
        e += 1;
    }
    const unsigned int code = (unsigned int)((e + 7) << 3) | ((unsigned int)q - 8u);
    return sign | (code > 0x7Eu ? 0x7Eu : code);
}

// Four E4M3 codes (one u32, code 0 in the low byte) to f32, each divided by 256: the code's bits
// placed in an f16 are its value * 2^-8 exactly (same mantissa width rule, exponent bias 15
// against 7), subnormals included. Callers multiply the 256 back into their scale.
__device__ __forceinline__ void e4m3x4_to_f32_div256(unsigned int w, float* out) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned int b = (w >> (8 * i)) & 0xFFu;
        const unsigned short h = (unsigned short)(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7));
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        out[i] = f;
    }
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    const int num_warps = blockDim.x / FERRUM_WARP;
#pragma unroll
    for (int offset = FERRUM_WARP / 2; offset > 0; offset /= 2)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < num_warps ? scratch[lane] : 0.0f;
#pragma unroll
    for (int offset = FERRUM_WARP / 2; offset > 0; offset /= 2)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

template <typename T>
__device__ void quantize_rows_impl(unsigned char* __restrict__ codes, float* __restrict__ scales,
                                   const T* __restrict__ x, int k, float static_scale) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * k;
    float s = static_scale;
    if (!(s > 0.0f)) {
        float amax = 0.0f;
        for (int c = threadIdx.x; c < k; c += blockDim.x) amax = fmaxf(amax, fabsf(to_f32(xr[c])));
        amax = block_max(amax, scratch);
        s = amax > 0.0f ? amax / E4M3_MAX : 1.0f;
    }
    unsigned char* out = codes + row * k;
    for (int c = threadIdx.x; c < k; c += blockDim.x)
        out[c] = (unsigned char)f32_to_e4m3(to_f32(xr[c]) / s);
    if (threadIdx.x == 0) scales[row] = s;
}

// acc[i][r] += sum over this lane's share of k of e4m3(W[rows[i], c]) / 256 * x[r, c].
template <typename T, int NR>
__device__ __forceinline__ void fp8_gemv_rows(float (&acc)[NR][FP8_GEMV_MAX_M],
                                              const T* __restrict__ x,
                                              const unsigned char* __restrict__ w,
                                              const i64 (&rows)[NR], int m, int k) {
    const int lane = threadIdx.x % FERRUM_WARP;
    const int num_vecs = k / 16;  // 16 codes per 16-byte load
    const uint4* wrow[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) wrow[i] = reinterpret_cast<const uint4*>(w + rows[i] * k);
    for (int v0 = lane; v0 < num_vecs; v0 += FP8_GEMV_UNROLL * FERRUM_WARP) {
        uint4 wv[NR][FP8_GEMV_UNROLL];
#pragma unroll
        for (int i = 0; i < NR; ++i)
#pragma unroll
            for (int u = 0; u < FP8_GEMV_UNROLL; ++u) {
                const int v = v0 + u * FERRUM_WARP;
                wv[i][u] = v < num_vecs ? __ldg(wrow[i] + v) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
        for (int u = 0; u < FP8_GEMV_UNROLL; ++u) {
            const int v = v0 + u * FERRUM_WARP;
            if (v >= num_vecs) break;
            float wf[NR][16];
#pragma unroll
            for (int i = 0; i < NR; ++i) {
                e4m3x4_to_f32_div256(wv[i][u].x, &wf[i][0]);
                e4m3x4_to_f32_div256(wv[i][u].y, &wf[i][4]);
                e4m3x4_to_f32_div256(wv[i][u].z, &wf[i][8]);
                e4m3x4_to_f32_div256(wv[i][u].w, &wf[i][12]);
            }
#pragma unroll
            for (int r = 0; r < FP8_GEMV_MAX_M; ++r) {
                if (r < m) {
                    const T* xr = x + (i64)r * k + (i64)v * 16;
#pragma unroll
                    for (int h = 0; h < 16 / Vec16<T>::N; ++h) {
                        const Vec16<T> xv = load_vec16(xr + h * Vec16<T>::N);
#pragma unroll
                        for (int e = 0; e < Vec16<T>::N; ++e) {
                            const float xe = to_f32(xv.e[e]);
#pragma unroll
                            for (int i = 0; i < NR; ++i)
                                acc[i][r] += wf[i][h * Vec16<T>::N + e] * xe;
                        }
                    }
                }
            }
        }
    }
}

template <typename T>
__device__ void fp8_gemv_impl(T* __restrict__ y, const T* __restrict__ x,
                              const unsigned char* __restrict__ w,
                              const float* __restrict__ w_scale, const T* __restrict__ bias,
                              int m, int n, int k) {
    const int lane = threadIdx.x % FERRUM_WARP;
    const int j = blockIdx.x * FP8_GEMV_WARPS + threadIdx.x / FERRUM_WARP;
    if (j >= n) return;
    float acc[1][FP8_GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < FP8_GEMV_MAX_M; ++r) acc[0][r] = 0.0f;
    const i64 rows[1] = {(i64)j};
    fp8_gemv_rows<T, 1>(acc, x, w, rows, m, k);
    const float s = w_scale[j] * 256.0f;
    const float b = bias != nullptr ? to_f32(bias[j]) : 0.0f;
#pragma unroll
    for (int r = 0; r < FP8_GEMV_MAX_M; ++r) {
        if (r < m) {
            const float sum = warp_sum(acc[0][r]);
            if (lane == 0) y[(i64)r * n + j] = from_f32<T>(sum * s + b);
        }
    }
}

template <typename T>
__device__ void fp8_gemv_gated_impl(T* __restrict__ y, const T* __restrict__ x,
                                    const unsigned char* __restrict__ w,
                                    const float* __restrict__ w_scale, const T* __restrict__ bias,
                                    int m, int inter, int k, int act) {
    const int lane = threadIdx.x % FERRUM_WARP;
    const int j = blockIdx.x * FP8_GEMV_WARPS + threadIdx.x / FERRUM_WARP;
    if (j >= inter) return;
    float acc[2][FP8_GEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int r = 0; r < FP8_GEMV_MAX_M; ++r) acc[i][r] = 0.0f;
    const i64 rows[2] = {(i64)j, (i64)inter + j};
    fp8_gemv_rows<T, 2>(acc, x, w, rows, m, k);
    const float sg = w_scale[j] * 256.0f;
    const float su = w_scale[inter + j] * 256.0f;
    const float bg = bias != nullptr ? to_f32(bias[j]) : 0.0f;
    const float bu = bias != nullptr ? to_f32(bias[inter + j]) : 0.0f;
#pragma unroll
    for (int r = 0; r < FP8_GEMV_MAX_M; ++r) {
        if (r < m) {
            const float g = to_f32(from_f32<T>(warp_sum(acc[0][r]) * sg + bg));
            const float u = to_f32(from_f32<T>(warp_sum(acc[1][r]) * su + bu));
            if (lane == 0) y[(i64)r * inter + j] = from_f32<T>(apply_act(g, act) * u);
        }
    }
}

template <typename T>
__device__ void fp8_scale_rows_impl(T* __restrict__ y, const float* __restrict__ x_scale,
                                    const float* __restrict__ w_scale, const T* __restrict__ bias,
                                    int m, int n) {
    const i64 total = (i64)m * n;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(i / n);
        const int j = (int)(i % n);
        const float b = bias != nullptr ? to_f32(bias[j]) : 0.0f;
        y[i] = from_f32<T>(to_f32(y[i]) * x_scale[r] * w_scale[j] + b);
    }
}

// The codec alone, for the bit-exactness test against the host: codes[i] = e4m3(x[i]) and
// back[i] = the value of code i (0..=255) in f32 (the 256 of the decoder multiplied back).
extern "C" __global__ void fp8_codec_check(unsigned char* codes, const float* x, float* back,
                                           int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) codes[i] = (unsigned char)f32_to_e4m3(x[i]);
    if (i < 64) {
        float f[4];
        e4m3x4_to_f32_div256((unsigned int)(4 * i) | (unsigned int)(4 * i + 1) << 8 |
                                 (unsigned int)(4 * i + 2) << 16 | (unsigned int)(4 * i + 3) << 24,
                             f);
        for (int e = 0; e < 4; ++e) back[4 * i + e] = f[e] * 256.0f;
    }
}

#define FP8_QUANTIZE(name, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(FP8_QUANT_THREADS)                            \
        name(unsigned char* codes, float* scales, const T* x, int m, int k, float static_scale) { \
        (void)m;                                                                                \
        quantize_rows_impl<T>(codes, scales, x, k, static_scale);                               \
    }
FERRUM_FOR_EACH_DTYPE(FP8_QUANTIZE, fp8_quantize_rows)

#define FP8_GEMV(name, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(FP8_GEMV_WARPS * FERRUM_WARP)                 \
        name(T* y, const T* x, const unsigned char* w, const float* w_scale, const T* bias,    \
             int m, int n, int k) {                                                             \
        fp8_gemv_impl<T>(y, x, w, w_scale, bias, m, n, k);                                      \
    }
FERRUM_FOR_EACH_DTYPE(FP8_GEMV, fp8_gemv)

#define FP8_GEMV_GATED(name, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(FP8_GEMV_WARPS * FERRUM_WARP)                 \
        name(T* y, const T* x, const unsigned char* w, const float* w_scale, const T* bias,    \
             int m, int inter, int k, int act) {                                                \
        fp8_gemv_gated_impl<T>(y, x, w, w_scale, bias, m, inter, k, act);                       \
    }
FERRUM_FOR_EACH_DTYPE(FP8_GEMV_GATED, fp8_gemv_gated)

#define FP8_SCALE_ROWS(name, T)                                                                 \
    extern "C" __global__ void name(T* y, const float* x_scale, const float* w_scale,          \
                                    const T* bias, int m, int n) {                              \
        fp8_scale_rows_impl<T>(y, x_scale, w_scale, bias, m, n);                                \
    }
FERRUM_FOR_EACH_DTYPE(FP8_SCALE_ROWS, fp8_scale_rows)
