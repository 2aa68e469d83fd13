// Embedding gather: out[t] = table[token_ids[t]] (+ pos_table[positions[t]] for learned absolute
// positions, GPT-2/OPT style). One CTA per token.
//
// out: [num_tokens, hidden]; table: [vocab_size, hidden]; token_ids: [num_tokens]
// pos_table: [max_positions, hidden] or null; positions: [num_tokens] (read only with pos_table)
// Ids out of range (the launcher cannot see device data) give a zero row instead of a wild read.

template <typename T>
__device__ void embedding_impl(T* out, const T* table, const u32* token_ids, const T* pos_table,
                               const u32* positions, int hidden, int vocab_size,
                               int max_positions) {
    const int token_idx = blockIdx.x;
    const u32 token_id = token_ids[token_idx];
    const bool valid = token_id < (u32)vocab_size;
    const T* row = table + (i64)token_id * hidden;
    const T* pos_row = nullptr;
    if (pos_table != nullptr) {
        const u32 pos = positions[token_idx];
        if (pos < (u32)max_positions) pos_row = pos_table + (i64)pos * hidden;
    }
    T* out_row = out + (i64)token_idx * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = valid ? to_f32(row[i]) : 0.0f;
        if (pos_row != nullptr) v += to_f32(pos_row[i]);
        out_row[i] = from_f32<T>(v);
    }
}

#define EMBEDDING(name, T)                                                                     \
    extern "C" __global__ void name(T* out, const T* table, const u32* token_ids,              \
                                    const T* pos_table, const u32* positions, int hidden,      \
                                    int vocab_size, int max_positions) {                       \
        embedding_impl<T>(out, table, token_ids, pos_table, positions, hidden, vocab_size,     \
                          max_positions);                                                      \
    }
FERRUM_FOR_EACH_DTYPE(EMBEDDING, embedding)
