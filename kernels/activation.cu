// Activations, elementwise, in f32. `act` codes (src/cuda/ops.rs `act_code`):
//   0 = SiLU: x / (1 + exp(-x))
//   1 = GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   2 = GELU, exact: 0.5 x (1 + erf(x / sqrt(2)))
//   3 = ReLU: max(x, 0)
//
// gated_act: gate_up: [num_tokens, 2 * inter] (gate first, then up) -> out: [num_tokens, inter],
//            out = act(gate) * up (Llama's silu*up, Gemma's gelu_tanh*up)
// act:       x: [n] in place

// apply_act(x, act) is in prelude.cuh (gemv.cu's gated product uses it too).

template <typename T>
__device__ void gated_act_impl(T* out, const T* gate_up, i64 num_tokens, int inter, int act) {
    const i64 n = num_tokens * inter;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (i64)gridDim.x * blockDim.x) {
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
