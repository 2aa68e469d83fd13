// Rotary position embedding in place on the q and k heads of a fused qkv buffer. One CTA per
// token; each thread rotates pairs.
//
// qkv: [num_tokens, row_stride]; q head h at h * head_dim, k head h at k_offset + h * head_dim
// positions: [num_tokens]; inv_freq: [rotary_dim / 2] (any scaling, llama3 or linear, is already
// folded into the table, so it is data here)
// Only the first rotary_dim dims of each head rotate (partial rotary); the rest pass through.
// style 0 = NeoX: pairs (i, i + rotary_dim/2) (Hugging Face `rotate_half`);
// style 1 = GPT-J: pairs (2i, 2i + 1).
// The angle is position * inv_freq[i] in f32, as Hugging Face computes it; sincosf is the
// accurate (not the fast-math) sine/cosine, so large positions keep their precision.

template <typename T>
__device__ void rotary_impl(T* qkv, const u32* positions, const float* inv_freq, int row_stride,
                            int num_q_heads, int num_kv_heads, int k_offset, int head_dim,
                            int rotary_dim, int style) {
    const int token_idx = blockIdx.x;
    const int half = rotary_dim / 2;
    const float pos = (float)positions[token_idx];
    T* row = qkv + (i64)token_idx * row_stride;
    const int num_pairs = (num_q_heads + num_kv_heads) * half;
    for (int idx = threadIdx.x; idx < num_pairs; idx += blockDim.x) {
        const int head = idx / half;
        const int i = idx % half;
        T* h = head < num_q_heads ? row + head * head_dim
                                  : row + k_offset + (head - num_q_heads) * head_dim;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        const int a_idx = style == 0 ? i : 2 * i;
        const int b_idx = style == 0 ? i + half : 2 * i + 1;
        const float a = to_f32(h[a_idx]);
        const float b = to_f32(h[b_idx]);
        h[a_idx] = from_f32<T>(a * c - b * s);
        h[b_idx] = from_f32<T>(b * c + a * s);
    }
}

#define ROTARY(name, T)                                                                        \
    extern "C" __global__ void name(T* qkv, const u32* positions, const float* inv_freq,       \
                                    int row_stride, int num_q_heads, int num_kv_heads,         \
                                    int k_offset, int head_dim, int rotary_dim, int style) {   \
        rotary_impl<T>(qkv, positions, inv_freq, row_stride, num_q_heads, num_kv_heads,        \
                       k_offset, head_dim, rotary_dim, style);                                 \
    }
FERRUM_FOR_EACH_DTYPE(ROTARY, rotary)
