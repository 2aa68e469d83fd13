// Sampling on the GPU. First kernel: greedy argmax per row, ids only (the logits never leave the
// device). One CTA per row.
//
// logits: [num_rows, vocab_size] -> token_ids: [num_rows]
// Ties go to the lowest id (as the CPU sampler); NaN never wins; a row of -inf gives id 0, a row
// of NaN gives id 0.

__device__ __forceinline__ bool argmax_better(float v, int i, float best_v, int best_i) {
    return v > best_v || (v == best_v && i < best_i);
}

template <typename T>
__device__ void argmax_impl(u32* token_ids, const T* logits, int vocab_size) {
    __shared__ float shared_v[32];
    __shared__ int shared_i[32];
    const T* row = logits + (i64)blockIdx.x * vocab_size;
    float best_v = FERRUM_NEG_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab_size; i += blockDim.x) {
        const float v = to_f32(row[i]);
        if (argmax_better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
#pragma unroll
    for (int offset = FERRUM_WARP / 2; offset > 0; offset /= 2) {
        const float ov = __shfl_xor_sync(0xffffffffu, best_v, offset);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, offset);
        if (argmax_better(ov, oi, best_v, best_i)) {
            best_v = ov;
            best_i = oi;
        }
    }
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    if (lane == 0) {
        shared_v[warp] = best_v;
        shared_i[warp] = best_i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / FERRUM_WARP); ++w) {
            if (argmax_better(shared_v[w], shared_i[w], best_v, best_i)) {
                best_v = shared_v[w];
                best_i = shared_i[w];
            }
        }
        token_ids[blockIdx.x] = best_i == 0x7fffffff ? 0u : (u32)best_i;
    }
}

#define ARGMAX(name, T)                                                                        \
    extern "C" __global__ void name(u32* token_ids, const T* logits, int vocab_size) {         \
        argmax_impl<T>(token_ids, logits, vocab_size);                                         \
    }
FERRUM_FOR_EACH_DTYPE(ARGMAX, argmax)
