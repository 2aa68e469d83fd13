// Row normalizations, optionally fused with the residual add that precedes them in a
// pre-norm decoder layer. One CTA per row; statistics in f32.
//
//   plain:  out = norm(x)
//   fused:  residual += x (stored in T); out = norm(residual)   (residual != null)
//
// x, out, residual: [num_rows, dim]; weight, bias: [dim] (bias may be null; RMSNorm has none).
// RMSNorm (Hugging Face LlamaRMSNorm): v * rsqrt(mean(v^2) + eps) * w; 16-byte vectors when dim
// is a multiple of 16 / sizeof(T) (the launcher then gives one thread per vector).
// LayerNorm (torch.nn.LayerNorm): (v - mean) * rsqrt(var + eps) * w + b, biased variance, two
// passes over the row so the variance does not cancel.
// With `residual` the statistics are taken over the stored (rounded) residual, so `out` is
// exactly norm(residual) as a later reader of `residual` sees it.

template <typename T>
__device__ __forceinline__ float load_row_value(const T* x, T* residual, i64 idx) {
    float v = to_f32(x[idx]);
    if (residual != nullptr) {
        const T sum = from_f32<T>(v + to_f32(residual[idx]));
        residual[idx] = sum;
        v = to_f32(sum);
    }
    return v;
}

// RMSNorm over 16-byte vectors (dim a multiple of 16 / sizeof(T); rows then start aligned).
template <typename T>
__device__ void rms_norm_vec16(T* out, const T* x, T* residual, const T* weight, int dim,
                               float eps, float* scratch) {
    constexpr int VEC = Vec16<T>::N;
    const i64 base = (i64)blockIdx.x * dim;
    const int num_vecs = dim / VEC;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
        Vec16<T> v = load_vec16(x + base + i * VEC);
        if (residual != nullptr) {
            Vec16<T> r = load_vec16(residual + base + i * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e) r.e[e] = from_f32<T>(to_f32(v.e[e]) + to_f32(r.e[e]));
            store_vec16(residual + base + i * VEC, r);
            v = r;
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const float f = to_f32(v.e[e]);
            sum_sq += f * f;
        }
    }
    sum_sq = block_sum(sum_sq, scratch);
    const float inv = rsqrtf(sum_sq / (float)dim + eps);
    // Each thread re-reads the residual vectors it wrote itself: no barrier needed.
    const T* src = residual != nullptr ? residual : x;
    for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
        const Vec16<T> v = load_vec16(src + base + i * VEC), w = load_vec16(weight + i * VEC);
        Vec16<T> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.e[e] = from_f32<T>(to_f32(v.e[e]) * inv * to_f32(w.e[e]));
        store_vec16(out + base + i * VEC, o);
    }
}

template <typename T>
__device__ void rms_norm_impl(T* out, const T* x, T* residual, const T* weight, int dim,
                              float eps) {
    __shared__ float scratch[32];
    if (dim % Vec16<T>::N == 0) {
        rms_norm_vec16(out, x, residual, weight, dim, eps, scratch);
        return;
    }
    const i64 base = (i64)blockIdx.x * dim;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = load_row_value(x, residual, base + i);
        sum_sq += v * v;
    }
    sum_sq = block_sum(sum_sq, scratch);
    const float inv = rsqrtf(sum_sq / (float)dim + eps);
    // Each thread re-reads the residual elements it wrote itself: no barrier needed.
    const T* src = residual != nullptr ? residual : x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        out[base + i] = from_f32<T>(to_f32(src[base + i]) * inv * to_f32(weight[i]));
    }
}

template <typename T>
__device__ void layer_norm_impl(T* out, const T* x, T* residual, const T* weight, const T* bias,
                                int dim, float eps) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * dim;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        sum += load_row_value(x, residual, base + i);
    }
    const float mean = block_sum(sum, scratch) / (float)dim;
    const T* src = residual != nullptr ? residual : x;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float d = to_f32(src[base + i]) - mean;
        sum_sq += d * d;
    }
    const float inv = rsqrtf(block_sum(sum_sq, scratch) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = (to_f32(src[base + i]) - mean) * inv * to_f32(weight[i]);
        if (bias != nullptr) v += to_f32(bias[i]);
        out[base + i] = from_f32<T>(v);
    }
}

#define RMS_NORM(name, T)                                                                      \
    extern "C" __global__ void name(T* out, const T* x, T* residual, const T* weight, int dim, \
                                    float eps) {                                               \
        rms_norm_impl<T>(out, x, residual, weight, dim, eps);                                  \
    }
FERRUM_FOR_EACH_DTYPE(RMS_NORM, rms_norm)

#define LAYER_NORM(name, T)                                                                    \
    extern "C" __global__ void name(T* out, const T* x, T* residual, const T* weight,          \
                                    const T* bias, int dim, float eps) {                       \
        layer_norm_impl<T>(out, x, residual, weight, bias, dim, eps);                          \
    }
FERRUM_FOR_EACH_DTYPE(LAYER_NORM, layer_norm)
