// Activations, elementwise, in f32. `act` codes (src/cuda/ops.rs `act_code`):
//   0 = SiLU: x / (1 + exp(-x))
//   1 = GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   2 = GELU, exact: 0.5 x (1 + erf(x / sqrt(2)))
//   3 = ReLU: max(x, 0)
//
// gated_act: gate_up: [num_tokens, 2 * inter] (gate first, then up) -> out: [num_tokens, inter],
//            out = act(gate) * up (Llama's silu*up, Gemma's gelu_tanh*up); 16-byte vectors
//            when inter is a multiple of 16 / sizeof(T) (the launcher's grid counts vectors
//            then, elements otherwise)
// act:       x: [n] in place

// apply_act(x, act) is in prelude.cuh (gemv.cu's gated product uses it too).

template <typename T>
__device__ void gated_act_impl(T* out, const T* gate_up, i64 num_tokens, int inter, int act) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    constexpr int VEC = Vec16<T>::N;
    if (inter % VEC == 0) {
        // One 16-byte vector per thread and step: every row of gate_up (2 inter) and of out
        // (inter) starts 16-byte aligned (the launcher sizes the grid in vectors).
        const int vecs_per_row = inter / VEC;
        const i64 n = num_tokens * vecs_per_row;
        for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
            const i64 token_idx = idx / vecs_per_row;
            const int i = (int)(idx - token_idx * vecs_per_row) * VEC;
            const T* row = gate_up + token_idx * 2 * inter;
            const Vec16<T> g = load_vec16(row + i), u = load_vec16(row + inter + i);
            Vec16<T> o;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                o.e[e] = from_f32<T>(apply_act(to_f32(g.e[e]), act) * to_f32(u.e[e]));
            }
            store_vec16(out + idx * VEC, o);
        }
        return;
    }
    const i64 n = num_tokens * inter;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += stride) {
        const i64 token_idx = idx / inter;
        const int i = (int)(idx % inter);
        const T* row = gate_up + token_idx * 2 * inter;
        out[idx] = from_f32<T>(apply_act(to_f32(row[i]), act) * to_f32(row[inter + i]));
    }
}

template <typename T>
__device__ void act_impl(T* x, i64 n, int act) {
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (i64)gridDim.x * blockDim.x) {
        x[idx] = from_f32<T>(apply_act(to_f32(x[idx]), act));
    }
}

#define GATED_ACT(name, T)                                                                     \
    extern "C" __global__ void name(T* out, const T* gate_up, i64 num_tokens, int inter,       \
                                    int act) {                                                 \
        gated_act_impl<T>(out, gate_up, num_tokens, inter, act);                               \
    }
FERRUM_FOR_EACH_DTYPE(GATED_ACT, gated_act)

#define ACT(name, T)                                                                           \
    extern "C" __global__ void name(T* x, i64 n, int act) { act_impl<T>(x, n, act); }
FERRUM_FOR_EACH_DTYPE(ACT, act)
