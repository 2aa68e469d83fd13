// Skinny matrix products for decode: y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]) for m <= GEMV_MAX_M,
// W row-major [out_features, in_features] as ferrum stores linear weights; f32 accumulation.
// Memory-bound: every weight byte is read once, with 16-byte loads, several in flight per lane.
//
// gemv_{dt}: grid (ceil(n / GEMV_WARPS)), GEMV_WARPS * 32 threads; warp w of CTA b computes output
//   feature j = b * GEMV_WARPS + w for every row of x: lanes stride over the 16-byte vectors of
//   W[j] (and the matching vectors of each x row, which stay in L1/L2), then a warp sum.
//   Needs k * sizeof(T) % 16 == 0 and 16-byte aligned rows (checked by the launcher).

#define GEMV_WARPS 4
#define GEMV_MAX_M 8
#define GEMV_UNROLL 4

template <typename T>
__device__ void gemv_impl(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                          const T* __restrict__ bias, int m, int n, int k) {
    constexpr int VEC = 16 / sizeof(T);
    const int lane = threadIdx.x % FERRUM_WARP;
    const int j = blockIdx.x * GEMV_WARPS + threadIdx.x / FERRUM_WARP;
    if (j >= n) return;
    const int num_vecs = k / VEC;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (i64)j * k);
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) acc[r] = 0.0f;
    int v = lane;
    // Main loop: GEMV_UNROLL weight vectors in flight per lane.
    for (; v + (GEMV_UNROLL - 1) * FERRUM_WARP < num_vecs; v += GEMV_UNROLL * FERRUM_WARP) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) wv[u] = __ldg(wrow + v + u * FERRUM_WARP);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const T* we = reinterpret_cast<const T*>(&wv[u]);
            float wf[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) wf[e] = to_f32(we[e]);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_M; ++r) {
                if (r < m) {
                    const uint4 xv =
                        __ldg(reinterpret_cast<const uint4*>(x + (i64)r * k) + v + u * FERRUM_WARP);
                    const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[r] += wf[e] * to_f32(xe[e]);
                }
            }
        }
    }
    for (; v < num_vecs; v += FERRUM_WARP) {
        const uint4 wv = __ldg(wrow + v);
        const T* we = reinterpret_cast<const T*>(&wv);
#pragma unroll
        for (int r = 0; r < GEMV_MAX_M; ++r) {
            if (r < m) {
                const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (i64)r * k) + v);
                const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[r] += to_f32(we[e]) * to_f32(xe[e]);
            }
        }
    }
    const float b = bias != nullptr ? to_f32(bias[j]) : 0.0f;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) y[(i64)r * n + j] = from_f32<T>(s + b);
        }
    }
}

#define GEMV(name, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * FERRUM_WARP)                     \
        name(T* y, const T* x, const T* w, const T* bias, int m, int n, int k) {               \
        gemv_impl<T>(y, x, w, bias, m, n, k);                                                   \
    }
FERRUM_FOR_EACH_DTYPE(GEMV, gemv)
