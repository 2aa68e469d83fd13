// Skinny matrix products for decode: y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]) for m <= GEMV_MAX_M,
// W row-major [out_features, in_features] as ferrum stores linear weights; f32 accumulation.
// Memory-bound: every weight byte is read once, with 16-byte loads, several in flight per lane.
//
// gemv_{dt}: grid (ceil(n / GEMV_WARPS)), GEMV_WARPS * 32 threads; warp w of CTA b computes output
//   feature j = b * GEMV_WARPS + w for every row of x: lanes stride over the 16-byte vectors of
//   W[j] (and the matching vectors of each x row, which stay in L1/L2), then a warp sum.
// gemv_gated_{dt}: the gated MLP's gate_up product with the activation fused (no gate_up buffer,
//   no activation launch): W = gate_up [2 * inter, k] (gate rows, then up rows), bias [2 * inter]
//   or null; y[m, inter] = act(x·W[j] + b[j]) * (x·W[inter + j] + b[inter + j]), rounded to T once.
//   Warp j streams both rows j and inter + j; grid (ceil(inter / GEMV_WARPS)).
//   Both need k * sizeof(T) % 16 == 0 and 16-byte aligned rows (checked by the launcher).

#define GEMV_WARPS 4
#define GEMV_MAX_M 8
#define GEMV_UNROLL 4

// acc[i][r] += W[rows[i]] · x[r] for the NR weight rows of this warp (lane's share of k).
template <typename T, int NR>
__device__ __forceinline__ void gemv_rows(float (&acc)[NR][GEMV_MAX_M], const T* __restrict__ x,
                                          const T* __restrict__ w, const i64 (&rows)[NR], int m,
                                          int k) {
    constexpr int VEC = 16 / sizeof(T);
    const int lane = threadIdx.x % FERRUM_WARP;
    const int num_vecs = k / VEC;
    const uint4* wrow[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) wrow[i] = reinterpret_cast<const uint4*>(w + rows[i] * k);
    int v = lane;
    // Main loop: GEMV_UNROLL vectors of each weight row in flight per lane.
    for (; v + (GEMV_UNROLL - 1) * FERRUM_WARP < num_vecs; v += GEMV_UNROLL * FERRUM_WARP) {
        uint4 wv[NR][GEMV_UNROLL];
#pragma unroll
        for (int i = 0; i < NR; ++i)
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) wv[i][u] = __ldg(wrow[i] + v + u * FERRUM_WARP);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
#pragma unroll
            for (int r = 0; r < GEMV_MAX_M; ++r) {
                if (r < m) {
                    const uint4 xv =
                        __ldg(reinterpret_cast<const uint4*>(x + (i64)r * k) + v + u * FERRUM_WARP);
                    const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                    for (int i = 0; i < NR; ++i) {
                        const T* we = reinterpret_cast<const T*>(&wv[i][u]);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[i][r] += to_f32(we[e]) * to_f32(xe[e]);
                    }
                }
            }
        }
    }
    for (; v < num_vecs; v += FERRUM_WARP) {
        uint4 wv[NR];
#pragma unroll
        for (int i = 0; i < NR; ++i) wv[i] = __ldg(wrow[i] + v);
#pragma unroll
        for (int r = 0; r < GEMV_MAX_M; ++r) {
            if (r < m) {
                const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (i64)r * k) + v);
                const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int i = 0; i < NR; ++i) {
                    const T* we = reinterpret_cast<const T*>(&wv[i]);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[i][r] += to_f32(we[e]) * to_f32(xe[e]);
                }
            }
        }
    }
}

// A 16-byte weight load that does not allocate in L1 (weights are read once; x stays in L1).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// gemv_rows, software-pipelined: the next U vectors of each weight row are in
// flight while the current ones are multiplied, weight loads bypass L1, and the tail is
// predicated inside the same loop instead of a one-vector-at-a-time loop.
template <typename T, int NR, int U>
__device__ __forceinline__ void gemv_rows_pipelined(float (&acc)[NR][GEMV_MAX_M],
                                                    const T* __restrict__ x,
                                                    const T* __restrict__ w,
                                                    const i64 (&rows)[NR], int m, int k) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int STEP = U * FERRUM_WARP;
    const int lane = threadIdx.x % FERRUM_WARP;
    const int num_vecs = k / VEC;
    const uint4* wrow[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) wrow[i] = reinterpret_cast<const uint4*>(w + rows[i] * k);
    const uint4 zero = make_uint4(0, 0, 0, 0);
    uint4 cur[NR][U];
#pragma unroll
    for (int i = 0; i < NR; ++i)
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = u * FERRUM_WARP + lane;
            cur[i][u] = v < num_vecs ? ld_stream(wrow[i] + v) : zero;
        }
    for (int base = 0; base < num_vecs; base += STEP) {
        uint4 nxt[NR][U];
        const bool more = base + STEP < num_vecs;
#pragma unroll
        for (int i = 0; i < NR; ++i)
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = base + STEP + u * FERRUM_WARP + lane;
                nxt[i][u] = more && v < num_vecs ? ld_stream(wrow[i] + v) : zero;
            }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + u * FERRUM_WARP + lane;
            if (v < num_vecs) {
#pragma unroll
                for (int r = 0; r < GEMV_MAX_M; ++r) {
                    if (r < m) {
                        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (i64)r * k) + v);
                        const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                        for (int i = 0; i < NR; ++i) {
                            const T* we = reinterpret_cast<const T*>(&cur[i][u]);
#pragma unroll
                            for (int e = 0; e < VEC; ++e)
                                acc[i][r] += to_f32(we[e]) * to_f32(xe[e]);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < NR; ++i)
#pragma unroll
            for (int u = 0; u < U; ++u) cur[i][u] = nxt[i][u];
    }
}

// The weight-row loop each kernel uses, as measured on the H100 (ncu, Llama-2-7B decode shapes,
// batch 1): one row per warp (gemv) is faster with the plain loop (attn_out/down 31.6 vs 33.3 us,
// qkv 42.9 vs 44.2 us); two rows per warp (gemv_gated) with the pipelined one (70.0 vs 66.3 us).
template <typename T, int NR>
__device__ __forceinline__ void gemv_dot(float (&acc)[NR][GEMV_MAX_M], const T* __restrict__ x,
                                         const T* __restrict__ w, const i64 (&rows)[NR], int m,
                                         int k) {
    if constexpr (NR == 1) {
        gemv_rows<T, NR>(acc, x, w, rows, m, k);
    } else {
        gemv_rows_pipelined<T, NR, 2>(acc, x, w, rows, m, k);
    }
}

template <typename T>
__device__ void gemv_impl(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                          const T* __restrict__ bias, int m, int n, int k) {
    const int lane = threadIdx.x % FERRUM_WARP;
    const int j = blockIdx.x * GEMV_WARPS + threadIdx.x / FERRUM_WARP;
    if (j >= n) return;
    float acc[1][GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) acc[0][r] = 0.0f;
    const i64 rows[1] = {(i64)j};
    gemv_dot<T, 1>(acc, x, w, rows, m, k);
    const float b = bias != nullptr ? to_f32(bias[j]) : 0.0f;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
        if (r < m) {
            const float s = warp_sum(acc[0][r]);
            if (lane == 0) y[(i64)r * n + j] = from_f32<T>(s + b);
        }
    }
}

template <typename T>
__device__ void gemv_gated_impl(T* __restrict__ y, const T* __restrict__ x,
                                const T* __restrict__ w, const T* __restrict__ bias, int m,
                                int inter, int k, int act) {
    const int lane = threadIdx.x % FERRUM_WARP;
    const int j = blockIdx.x * GEMV_WARPS + threadIdx.x / FERRUM_WARP;
    if (j >= inter) return;
    float acc[2][GEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int r = 0; r < GEMV_MAX_M; ++r) acc[i][r] = 0.0f;
    const i64 rows[2] = {(i64)j, (i64)inter + j};
    gemv_dot<T, 2>(acc, x, w, rows, m, k);
    // The gate and up values are rounded to T first, as the unfused gate_up buffer holds them.
    const float bg = bias != nullptr ? to_f32(bias[j]) : 0.0f;
    const float bu = bias != nullptr ? to_f32(bias[inter + j]) : 0.0f;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
        if (r < m) {
            const float g = to_f32(from_f32<T>(warp_sum(acc[0][r]) + bg));
            const float u = to_f32(from_f32<T>(warp_sum(acc[1][r]) + bu));
            if (lane == 0) y[(i64)r * inter + j] = from_f32<T>(apply_act(g, act) * u);
        }
    }
}

#define GEMV(name, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * FERRUM_WARP)                     \
        name(T* y, const T* x, const T* w, const T* bias, int m, int n, int k) {               \
        gemv_impl<T>(y, x, w, bias, m, n, k);                                                   \
    }
FERRUM_FOR_EACH_DTYPE(GEMV, gemv)

#define GEMV_GATED(name, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * FERRUM_WARP)                     \
        name(T* y, const T* x, const T* w, const T* bias, int m, int inter, int k, int act) {  \
        gemv_gated_impl<T>(y, x, w, bias, m, inter, k, act);                                    \
    }
FERRUM_FOR_EACH_DTYPE(GEMV_GATED, gemv_gated)
