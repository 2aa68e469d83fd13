// KV-cache write by slot mapping. One CTA per token.
//
// cache layout (K and V alike): [num_blocks, block_size, num_kv_heads, head_dim]
//   slot = block_id * block_size + position % block_size, so the row of a slot is contiguous:
//   k_cache[slot * kv_dim .. (slot + 1) * kv_dim]
// src: [num_tokens, row_stride], k of a token at k_offset, v at v_offset, kv_dim wide each (so
//   k and v are read straight out of the fused qkv buffer)
// slot_mapping: [num_tokens]; a negative slot (padding token) or one past the cache is skipped:
// the launcher cannot see device data, so the kernel keeps every write inside the cache.

template <typename T>
__device__ void kv_cache_write_impl(T* k_cache, T* v_cache, const T* src, const i64* slot_mapping,
                                    int row_stride, int k_offset, int v_offset, int kv_dim,
                                    i64 num_slots) {
    const int token_idx = blockIdx.x;
    const i64 slot = slot_mapping[token_idx];
    if (slot < 0 || slot >= num_slots) return;
    const T* row = src + (i64)token_idx * row_stride;
    T* k_dst = k_cache + slot * kv_dim;
    T* v_dst = v_cache + slot * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_dst[i] = row[k_offset + i];
        v_dst[i] = row[v_offset + i];
    }
}

#define KV_CACHE_WRITE(name, T)                                                                \
    extern "C" __global__ void name(T* k_cache, T* v_cache, const T* src,                      \
                                    const i64* slot_mapping, int row_stride, int k_offset,     \
                                    int v_offset, int kv_dim, i64 num_slots) {                 \
        kv_cache_write_impl<T>(k_cache, v_cache, src, slot_mapping, row_stride, k_offset,      \
                               v_offset, kv_dim, num_slots);                                   \
    }
FERRUM_FOR_EACH_DTYPE(KV_CACHE_WRITE, kv_cache_write)
