// Small elementwise kernels of the CUDA executor's forward pass, in f32 arithmetic. Grid-stride
// loops: any grid covers any n.
//
// clamp:       x = min(max(x, -c), c), x: [n] (MPT clip_qkv)
// add:         x += a (+ b), x, a, b: [n]; b may be null (residual adds)
// add_bias:    y[r, i] += bias[i], y: [num_rows, n], bias: [n] (GEMM without a fused epilogue)
// gather_rows: out[r] = x[rows[r]], out: [num_rows, dim], x: [num_src_rows, dim],
//              rows: [num_rows]; a row index past x gives a zero row, never a wild read
//              (the rows that sample before the final norm and LM head)

template <typename T>
__device__ void clamp_impl(T* x, i64 n, float c) {
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (i64)gridDim.x * blockDim.x) {
        x[idx] = from_f32<T>(fminf(fmaxf(to_f32(x[idx]), -c), c));
    }
}

template <typename T>
__device__ void add_impl(T* x, const T* a, const T* b, i64 n) {
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (i64)gridDim.x * blockDim.x) {
        float v = to_f32(x[idx]) + to_f32(a[idx]);
        if (b != nullptr) v += to_f32(b[idx]);
        x[idx] = from_f32<T>(v);
    }
}

template <typename T>
__device__ void add_bias_impl(T* y, const T* bias, i64 num_rows, int n) {
    const i64 total = num_rows * n;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        y[idx] = from_f32<T>(to_f32(y[idx]) + to_f32(bias[idx % n]));
    }
}

template <typename T>
__device__ void gather_rows_impl(T* out, const T* x, const u32* rows, i64 num_rows, int dim,
                                 i64 num_src_rows) {
    const i64 total = num_rows * dim;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / dim;
        const int i = (int)(idx % dim);
        const u32 src = rows[r];
        out[idx] = (i64)src < num_src_rows ? x[(i64)src * dim + i] : from_f32<T>(0.0f);
    }
}

#define CLAMP(name, T) \
    extern "C" __global__ void name(T* x, i64 n, float c) { clamp_impl<T>(x, n, c); }
FERRUM_FOR_EACH_DTYPE(CLAMP, clamp)

#define ADD(name, T)                                                                           \
    extern "C" __global__ void name(T* x, const T* a, const T* b, i64 n) {                     \
        add_impl<T>(x, a, b, n);                                                               \
    }
FERRUM_FOR_EACH_DTYPE(ADD, add)

#define ADD_BIAS(name, T)                                                                      \
    extern "C" __global__ void name(T* y, const T* bias, i64 num_rows, int n) {                \
        add_bias_impl<T>(y, bias, num_rows, n);                                                \
    }
FERRUM_FOR_EACH_DTYPE(ADD_BIAS, add_bias)

#define GATHER_ROWS(name, T)                                                                   \
    extern "C" __global__ void name(T* out, const T* x, const u32* rows, i64 num_rows,         \
                                    int dim, i64 num_src_rows) {                               \
        gather_rows_impl<T>(out, x, rows, num_rows, dim, num_src_rows);                        \
    }
FERRUM_FOR_EACH_DTYPE(GATHER_ROWS, gather_rows)
