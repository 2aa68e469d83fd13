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

// rotary_kv_write: the rotation above fused with the KV-cache write of kv_cache.cu (one launch
// instead of two per layer): q heads rotate in place; k heads rotate in place and go to the
// cache rotated; the k dims past rotary_dim and all of v are copied. slot_mapping: [num_tokens];
// a slot outside [0, num_slots) (padding) writes no cache row. Caches as in kv_cache.cu:
// [num_slots, num_kv_heads * head_dim]. One CTA per token.
template <typename T>
__device__ void rotary_kv_write_impl(T* qkv, T* k_cache, T* v_cache, const u32* positions,
                                     const i64* slot_mapping, const float* inv_freq,
                                     int row_stride, int num_q_heads, int num_kv_heads,
                                     int k_offset, int v_offset, int head_dim, int rotary_dim,
                                     int style, i64 num_slots) {
    const int token_idx = blockIdx.x;
    const int half = rotary_dim / 2;
    const float pos = (float)positions[token_idx];
    T* row = qkv + (i64)token_idx * row_stride;
    const i64 slot = slot_mapping[token_idx];
    const bool write = slot >= 0 && slot < num_slots;
    const int kv_dim = num_kv_heads * head_dim;
    T* k_dst = k_cache + (write ? slot : 0) * kv_dim;
    T* v_dst = v_cache + (write ? slot : 0) * kv_dim;
    const int num_pairs = (num_q_heads + num_kv_heads) * half;
    for (int idx = threadIdx.x; idx < num_pairs; idx += blockDim.x) {
        const int head = idx / half;
        const int i = idx % half;
        const bool is_k = head >= num_q_heads;
        T* h = is_k ? row + k_offset + (head - num_q_heads) * head_dim : row + head * head_dim;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        const int a_idx = style == 0 ? i : 2 * i;
        const int b_idx = style == 0 ? i + half : 2 * i + 1;
        const float a = to_f32(h[a_idx]);
        const float b = to_f32(h[b_idx]);
        const T ra = from_f32<T>(a * c - b * s);
        const T rb = from_f32<T>(b * c + a * s);
        h[a_idx] = ra;
        h[b_idx] = rb;
        if (is_k && write) {
            T* d = k_dst + (head - num_q_heads) * head_dim;
            d[a_idx] = ra;
            d[b_idx] = rb;
        }
    }
    if (!write) return;
    // The k dims that do not rotate, and v (no thread above touches them).
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        if (i % head_dim >= rotary_dim) k_dst[i] = row[k_offset + i];
        v_dst[i] = row[v_offset + i];
    }
}

#define ROTARY_KV_WRITE(name, T)                                                               \
    extern "C" __global__ void name(T* qkv, T* k_cache, T* v_cache, const u32* positions,      \
                                    const i64* slot_mapping, const float* inv_freq,            \
                                    int row_stride, int num_q_heads, int num_kv_heads,         \
                                    int k_offset, int v_offset, int head_dim, int rotary_dim,  \
                                    int style, i64 num_slots) {                                \
        rotary_kv_write_impl<T>(qkv, k_cache, v_cache, positions, slot_mapping, inv_freq,      \
                                row_stride, num_q_heads, num_kv_heads, k_offset, v_offset,     \
                                head_dim, rotary_dim, style, num_slots);                       \
    }
FERRUM_FOR_EACH_DTYPE(ROTARY_KV_WRITE, rotary_kv_write)
