// Paged attention for decode: one query token per sequence, keys and values read straight from
// the paged cache. One CTA per (head, sequence); PA_NUM_WARPS warps split the context's keys
// (warp w takes keys w, w + PA_NUM_WARPS, ...) and each keeps an online softmax (running max m,
// running sum l, accumulator acc over head_dim spread across its lanes); the warps are merged at
// the end. Split-K over the context (flash-decoding) is a later variant beside this one.
//
// out: [num_seqs, num_heads, head_dim]
// q: [num_seqs, q_stride], head h at h * head_dim (q may sit inside a fused qkv row)
// k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
// block_tables: [num_seqs, max_blocks_per_seq]; context_lens: [num_seqs] (tokens in the cache,
//   the query's own k/v included: the query sits at position context_len - 1)
// alibi_slopes: [num_heads] or null: score += slope * (key_pos - query_pos)
// sliding_window: 0 = none, else keys key_pos > query_pos - sliding_window only
// GQA/MQA: query head h reads kv head h / (num_heads / num_kv_heads).
// Block ids outside [0, num_blocks) are skipped and context_lens are clamped to the table, so
// bad device data cannot make the kernel read outside the cache.

#define PA_NUM_WARPS 4
#define PA_MAX_HEAD_DIM 256
#define PA_DIMS_PER_LANE (PA_MAX_HEAD_DIM / FERRUM_WARP)

template <typename T>
__device__ void paged_attention_decode_impl(T* out, const T* q, int q_stride, const T* k_cache,
                                            const T* v_cache, const i32* block_tables,
                                            int max_blocks_per_seq, const i32* context_lens,
                                            const float* alibi_slopes, int num_kv_heads,
                                            int head_dim, int block_size, i64 num_blocks,
                                            float scale, int sliding_window) {
    __shared__ float q_s[PA_MAX_HEAD_DIM];
    __shared__ float warp_m[PA_NUM_WARPS];
    __shared__ float warp_l[PA_NUM_WARPS];
    __shared__ float warp_acc[PA_NUM_WARPS][PA_MAX_HEAD_DIM];

    const int head_idx = blockIdx.x;
    const int num_heads = gridDim.x;
    const int seq_idx = blockIdx.y;
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    const int kv_head = head_idx / (num_heads / num_kv_heads);
    const int kv_dim = num_kv_heads * head_dim;

    const T* q_row = q + (i64)seq_idx * q_stride + head_idx * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_s[d] = to_f32(q_row[d]);
    __syncthreads();

    int context_len = context_lens[seq_idx];
    const int table_tokens = max_blocks_per_seq * block_size;
    if (context_len > table_tokens) context_len = table_tokens;
    const int pos = context_len - 1;
    int first = 0;
    if (sliding_window > 0 && pos + 1 - sliding_window > 0) first = pos + 1 - sliding_window;
    const float slope = alibi_slopes != nullptr ? alibi_slopes[head_idx] : 0.0f;
    const i32* table = block_tables + (i64)seq_idx * max_blocks_per_seq;

    float m = FERRUM_NEG_INF;
    float l = 0.0f;
    float acc[PA_DIMS_PER_LANE];
#pragma unroll
    for (int j = 0; j < PA_DIMS_PER_LANE; ++j) acc[j] = 0.0f;

    for (int t = first + warp; t < context_len; t += PA_NUM_WARPS) {
        const i32 block_id = table[t / block_size];
        if (block_id < 0 || (i64)block_id >= num_blocks) continue;
        const i64 slot = (i64)block_id * block_size + t % block_size;
        const T* k = k_cache + slot * kv_dim + kv_head * head_dim;
        const T* v = v_cache + slot * kv_dim + kv_head * head_dim;
        float partial = 0.0f;
        for (int d = lane; d < head_dim; d += FERRUM_WARP) partial += q_s[d] * to_f32(k[d]);
        const float s = warp_sum(partial) * scale + slope * (float)(t - pos);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < PA_DIMS_PER_LANE; ++j) {
            const int d = lane + j * FERRUM_WARP;
            if (d < head_dim) acc[j] = acc[j] * corr + p * to_f32(v[d]);
        }
        m = m_new;
    }

    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < PA_DIMS_PER_LANE; ++j) {
        const int d = lane + j * FERRUM_WARP;
        if (d < head_dim) warp_acc[warp][d] = acc[j];
    }
    __syncthreads();

    float m_all = FERRUM_NEG_INF;
    for (int w = 0; w < PA_NUM_WARPS; ++w) m_all = fmaxf(m_all, warp_m[w]);
    float l_all = 0.0f;
    float weight[PA_NUM_WARPS];
    for (int w = 0; w < PA_NUM_WARPS; ++w) {
        // A warp that saw no key has m = -inf and l = 0: its weight is 0.
        weight[w] = warp_m[w] == FERRUM_NEG_INF ? 0.0f : expf(warp_m[w] - m_all);
        l_all += warp_l[w] * weight[w];
    }
    const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
    T* out_row = out + ((i64)seq_idx * num_heads + head_idx) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < PA_NUM_WARPS; ++w) o += warp_acc[w][d] * weight[w];
        out_row[d] = from_f32<T>(o * inv_l);
    }
}

#define PAGED_ATTENTION_DECODE(name, T)                                                        \
    extern "C" __global__ void __launch_bounds__(PA_NUM_WARPS * FERRUM_WARP)                   \
        name(T* out, const T* q, int q_stride, const T* k_cache, const T* v_cache,             \
             const i32* block_tables, int max_blocks_per_seq, const i32* context_lens,         \
             const float* alibi_slopes, int num_kv_heads, int head_dim, int block_size,        \
             i64 num_blocks, float scale, int sliding_window) {                                \
        paged_attention_decode_impl<T>(out, q, q_stride, k_cache, v_cache, block_tables,       \
                                       max_blocks_per_seq, context_lens, alibi_slopes,         \
                                       num_kv_heads, head_dim, block_size, num_blocks, scale,  \
                                       sliding_window);                                        \
    }
FERRUM_FOR_EACH_DTYPE(PAGED_ATTENTION_DECODE, paged_attention_decode)
