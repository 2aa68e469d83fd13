// Paged attention for prefill and mixed batches (flash-attention style): every sequence of the
// batch brings q_len query tokens, the last q_len positions of its context_len cached tokens
// (a whole prompt, a chunk of one against already cached blocks, or one decode token). Causal,
// GQA/MQA, ALiBi, sliding window; f32 softmax state and accumulators.
//
// out: [num_tokens, num_heads * HEAD_DIM]
// q: [num_tokens, q_stride], head h at h * HEAD_DIM (q may sit inside a fused qkv row)
// k_cache, v_cache: [num_blocks, block_size, num_kv_heads, HEAD_DIM]
// q_starts, q_lens, context_lens: [num_seqs]; block_tables: [num_seqs, max_blocks_per_seq]
//   query token i of sequence s is batch row q_starts[s] + i and sits at position
//   context_lens[s] - q_lens[s] + i; it sees keys 0..=position (inside the window, if any)
// alibi_slopes: [num_heads] or null: score += slope * (key_pos - query_pos)
// sliding_window: 0 = none, else keys key_pos > query_pos - sliding_window only
//
// GQA packing: a CTA works for one kv head and packs the rows (query token, query head of the
// group) into its row tile, row R of a sequence = token R / group, head kv_head * group +
// R % group. So every K/V tile loaded into shared memory serves all query heads of the group.
// Grid: (row tiles over max_q_len * group, num_kv_heads, num_seqs); a CTA past its sequence's
// rows exits at once. Row tiles run heaviest (last) first.
//
// Two implementations, same arguments, 128 threads:
//   paged_attention_prefill_simt_{dt}: 16 rows x 32 keys per step, f32 everything in shared
//     memory, any HEAD_DIM <= 256. Used for f32 and as the cross-check of the tensor-core one.
//   paged_attention_prefill_{dt}: the fast one per dtype: bf16/f16 use tensor cores
//     (mma.sync m16n8k16, f32 accumulation; 128 rows x 64 keys per step up to a padded
//     HEAD_DIM of 128, 64 rows x 32 keys above), Q/K/V tiles loaded by cp.async, K and V of
//     one tile in flight while the other computes; f32 falls back to the SIMT kernel. Needs
//     HEAD_DIM % 8 == 0.
// Both take dynamic shared memory (sizes: src/cuda/attention.rs, prefill_smem_bytes).
//
// Device data the launcher cannot see is bounded here: context lengths are clamped to the block
// table, q_len to the context and to the batch, block ids outside [0, num_blocks) read zeros.

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#if HEAD_DIM > 256 || HEAD_DIM < 1
#error "HEAD_DIM must be in 1..=256"
#endif

#define PF_THREADS 128
#define PF_LOG2E 1.4426950408889634f

// ---------------------------------------------------------------------------------------------
// what a CTA works on

struct PrefillTile {
    int q_start;   // batch row of the sequence's first query token
    int rows;      // q_len * group
    int row0;      // first row of this tile
    int pos0;      // position of query token 0 (context_len - q_len)
    int kv_begin;  // first key any row of the tile can see
    int kv_end;    // one past the last key any row of the tile can see
    const i32* table;
};

// Fills `t` and returns true when this CTA has rows to compute.
__device__ __forceinline__ bool prefill_tile(PrefillTile& t, int rows_per_tile, int num_tokens,
                                             const i32* q_starts, const i32* q_lens,
                                             const i32* context_lens, const i32* block_tables,
                                             int max_blocks_per_seq, int group, int block_size,
                                             int sliding_window) {
    const int seq = blockIdx.z;
    const int tile = gridDim.x - 1 - blockIdx.x;
    int ctx = context_lens[seq];
    const int table_tokens = max_blocks_per_seq * block_size;
    if (ctx > table_tokens) ctx = table_tokens;
    int q_len = q_lens[seq];
    const int q_start = q_starts[seq];
    if (q_start < 0 || q_start >= num_tokens || ctx <= 0) return false;
    if (q_len > ctx) q_len = ctx;
    if (q_len > num_tokens - q_start) q_len = num_tokens - q_start;
    if (q_len <= 0) return false;
    t.q_start = q_start;
    t.rows = q_len * group;
    t.row0 = tile * rows_per_tile;
    if (t.row0 >= t.rows) return false;
    t.pos0 = ctx - q_len;
    const int row_last = min(t.rows, t.row0 + rows_per_tile) - 1;
    t.kv_end = t.pos0 + row_last / group + 1;
    t.kv_begin = 0;
    if (sliding_window > 0) t.kv_begin = max(0, t.pos0 + t.row0 / group + 1 - sliding_window);
    t.table = block_tables + (i64)seq * max_blocks_per_seq;
    return true;
}

// Element offset of key `j`'s head `kv_head` in the cache, or -1 when its block id is bad.
__device__ __forceinline__ i64 key_offset(const i32* table, int j, int block_size,
                                          i64 num_blocks, int num_kv_heads, int kv_head) {
    const i32 block_id = table[j / block_size];
    if (block_id < 0 || (i64)block_id >= num_blocks) return -1;
    return (((i64)block_id * block_size + j % block_size) * num_kv_heads + kv_head) * HEAD_DIM;
}

#define PREFILL_PARAMS(T)                                                                      \
    T *out, const T *q, int q_stride, int num_tokens, const T *k_cache, const T *v_cache,      \
        const i32 *q_starts, const i32 *q_lens, const i32 *context_lens,                       \
        const i32 *block_tables, int max_blocks_per_seq, const float *alibi_slopes,            \
        int num_heads, int num_kv_heads, int block_size, i64 num_blocks, float scale,          \
        int sliding_window
#define PREFILL_ARGS                                                                           \
    out, q, q_stride, num_tokens, k_cache, v_cache, q_starts, q_lens, context_lens,            \
        block_tables, max_blocks_per_seq, alibi_slopes, num_heads, num_kv_heads, block_size,   \
        num_blocks, scale, sliding_window

// ---------------------------------------------------------------------------------------------
// SIMT: 4 warps x 4 rows; a lane owns one key of the 32-key tile for the scores and dims
// lane + 32 j of the accumulators.

#define SI_RPW 4
#define SI_BM (SI_RPW * (PF_THREADS / FERRUM_WARP))
#define SI_BN 32
#define SI_DPL ((HEAD_DIM + FERRUM_WARP - 1) / FERRUM_WARP)
#define SI_KV_STRIDE (HEAD_DIM + 1)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = FERRUM_WARP / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

template <typename T>
__device__ void prefill_simt_impl(PREFILL_PARAMS(T)) {
    extern __shared__ float4 smem_f4[];
    float* q_s = reinterpret_cast<float*>(smem_f4);  // [SI_BM][HEAD_DIM]
    float* kv_s = q_s + SI_BM * HEAD_DIM;            // [SI_BN][SI_KV_STRIDE], K then V

    const int group = num_heads / num_kv_heads;
    const int kv_head = blockIdx.y;
    PrefillTile t;
    if (!prefill_tile(t, SI_BM, num_tokens, q_starts, q_lens, context_lens, block_tables,
                      max_blocks_per_seq, group, block_size, sliding_window)) {
        return;
    }
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;

    for (int idx = threadIdx.x; idx < SI_BM * HEAD_DIM; idx += PF_THREADS) {
        const int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
        const int row = t.row0 + r;
        float v = 0.0f;
        if (row < t.rows) {
            const int head = kv_head * group + row % group;
            v = to_f32(q[(i64)(t.q_start + row / group) * q_stride + head * HEAD_DIM + d]);
        }
        q_s[idx] = v;
    }

    // Per-row state: position (-1 for rows past the sequence), window start, ALiBi slope.
    int pos[SI_RPW], lo[SI_RPW];
    float slope2[SI_RPW], m[SI_RPW], l[SI_RPW], acc[SI_RPW][SI_DPL];
#pragma unroll
    for (int i = 0; i < SI_RPW; ++i) {
        const int row = t.row0 + warp * SI_RPW + i;
        const bool valid = row < t.rows;
        pos[i] = valid ? t.pos0 + row / group : -1;
        lo[i] = sliding_window > 0 ? pos[i] + 1 - sliding_window : 0;
        slope2[i] = (valid && alibi_slopes != nullptr)
                        ? alibi_slopes[kv_head * group + row % group] * PF_LOG2E
                        : 0.0f;
        m[i] = FERRUM_NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < SI_DPL; ++j) acc[i][j] = 0.0f;
    }
    const float scale2 = scale * PF_LOG2E;

    for (int n0 = t.kv_begin / SI_BN * SI_BN; n0 < t.kv_end; n0 += SI_BN) {
        __syncthreads();  // q_s written (first pass); the last tile's V reads done
        for (int idx = threadIdx.x; idx < SI_BN * HEAD_DIM; idx += PF_THREADS) {
            const int n = idx / HEAD_DIM, d = idx % HEAD_DIM;
            const int j = n0 + n;
            float v = 0.0f;
            if (j < t.kv_end) {
                const i64 off =
                    key_offset(t.table, j, block_size, num_blocks, num_kv_heads, kv_head);
                if (off >= 0) v = to_f32(k_cache[off + d]);
            }
            kv_s[n * SI_KV_STRIDE + d] = v;
        }
        __syncthreads();
        float s[SI_RPW];
#pragma unroll
        for (int i = 0; i < SI_RPW; ++i) s[i] = 0.0f;
        for (int d = 0; d < HEAD_DIM; ++d) {
            const float k = kv_s[lane * SI_KV_STRIDE + d];
#pragma unroll
            for (int i = 0; i < SI_RPW; ++i) s[i] += q_s[(warp * SI_RPW + i) * HEAD_DIM + d] * k;
        }
        const int j = n0 + lane;
        float p[SI_RPW];
#pragma unroll
        for (int i = 0; i < SI_RPW; ++i) {
            const bool seen = j <= pos[i] && j >= lo[i];
            const float x = seen ? s[i] * scale2 + slope2[i] * (float)(j - pos[i]) : FERRUM_NEG_INF;
            const float m_new = fmaxf(m[i], warp_max(x));
            const float m_use = m_new == FERRUM_NEG_INF ? 0.0f : m_new;
            const float corr = exp2f(m[i] - m_use);
            p[i] = exp2f(x - m_use);
            l[i] = l[i] * corr + p[i];  // per-lane partial sum; summed over the warp at the end
#pragma unroll
            for (int jd = 0; jd < SI_DPL; ++jd) acc[i][jd] *= corr;
            m[i] = m_new;
        }
        __syncthreads();  // K reads done
        for (int idx = threadIdx.x; idx < SI_BN * HEAD_DIM; idx += PF_THREADS) {
            const int n = idx / HEAD_DIM, d = idx % HEAD_DIM;
            const int jj = n0 + n;
            float v = 0.0f;
            if (jj < t.kv_end) {
                const i64 off =
                    key_offset(t.table, jj, block_size, num_blocks, num_kv_heads, kv_head);
                if (off >= 0) v = to_f32(v_cache[off + d]);
            }
            kv_s[n * SI_KV_STRIDE + d] = v;
        }
        __syncthreads();
        for (int kk = 0; kk < SI_BN; ++kk) {
            float pk[SI_RPW];
#pragma unroll
            for (int i = 0; i < SI_RPW; ++i) pk[i] = __shfl_sync(0xffffffffu, p[i], kk);
#pragma unroll
            for (int jd = 0; jd < SI_DPL; ++jd) {
                const int d = lane + jd * FERRUM_WARP;
                if (d < HEAD_DIM) {
                    const float v = kv_s[kk * SI_KV_STRIDE + d];
#pragma unroll
                    for (int i = 0; i < SI_RPW; ++i) acc[i][jd] += pk[i] * v;
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < SI_RPW; ++i) {
        const float l_all = warp_sum(l[i]);
        const int row = t.row0 + warp * SI_RPW + i;
        if (row >= t.rows) continue;
        const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
        const int head = kv_head * group + row % group;
        T* o = out + (i64)(t.q_start + row / group) * num_heads * HEAD_DIM + head * HEAD_DIM;
#pragma unroll
        for (int jd = 0; jd < SI_DPL; ++jd) {
            const int d = lane + jd * FERRUM_WARP;
            if (d < HEAD_DIM) o[d] = from_f32<T>(acc[i][jd] * inv_l);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor cores (bf16/f16): 4 warps, each TC_MT row tiles of 16 (both share every K and V
// fragment the warp loads from shared memory: half the ldmatrix traffic per mma of one tile per
// warp, and twice the independent mma chains), mma.sync.m16n8k16 with f32 accumulators.
//
// Fragment layouts: prelude.cuh.
// Q.K^T: A = Q rows x dims (ldmatrix), B = K^T (ldmatrix of K rows, no transpose).
// P.V:   A = P, built in registers from the S accumulators; B = V (ldmatrix.trans of V rows).
// Shared rows are padded by 8 elements (16 bytes) so ldmatrix's 8 row addresses hit 8
// different 16-byte bank groups.
//
// Pipeline (one K and one V buffer, flash-attention-2 style): V(i) lands while S = Q.K(i)^T
// computes, K(i + 1) while the softmax and P.V(i) compute. Shared memory: Q tile + K tile + V
// tile, under the 99 KB opt-in limit of sm_86/sm_89 for every HEAD_DIM (prefill_smem_bytes).

#define TC_HD_PAD ((HEAD_DIM + 15) / 16 * 16)
#if TC_HD_PAD > 128
#define TC_MT 1
#define TC_BN 32
#else
#define TC_MT 2
#define TC_BN 64
#endif
#define TC_WARPS (PF_THREADS / FERRUM_WARP)
#define TC_WARP_ROWS (16 * TC_MT)
#define TC_BM (TC_WARP_ROWS * TC_WARPS)
#define TC_STRIDE (TC_HD_PAD + 8)

// Mma<T>, smem_addr, ldmatrix_x4(_trans), cp_async_16, cp_async_commit and cp_async_wait:
// prelude.cuh.

// Starts the copy of keys n0 .. n0 + TC_BN of the cache into dst [TC_BN][TC_STRIDE]; keys past
// kv_end, bad blocks and the dims past HEAD_DIM are zero-filled. TC_KEY_THREADS threads share a
// key (one block-table lookup each) and take its 16-byte chunks in turn, so neighbouring
// threads fill whole 32-byte sectors.
#define TC_KEY_THREADS (PF_THREADS / TC_BN)
template <typename T>
__device__ __forceinline__ void tc_load_kv(unsigned short* dst, const T* cache, int n0,
                                           const PrefillTile& t, int block_size, i64 num_blocks,
                                           int num_kv_heads, int kv_head) {
    constexpr int CHUNKS = TC_HD_PAD / 8;
    const int n = threadIdx.x / TC_KEY_THREADS;
    const int sub = threadIdx.x % TC_KEY_THREADS;
    const int j = n0 + n;
    const i64 off =
        j < t.kv_end ? key_offset(t.table, j, block_size, num_blocks, num_kv_heads, kv_head) : -1;
#pragma unroll
    for (int c = sub; c < CHUNKS; c += TC_KEY_THREADS) {
        const bool real = off >= 0 && c * 8 < HEAD_DIM;
        cp_async_16(dst + n * TC_STRIDE + c * 8, real ? cache + off + c * 8 : cache,
                    real ? 16 : 0);
    }
}

// Starts loading the keys at n_next into `buf` (which every thread is done with) when
// `has_next`, as one cp.async group (an empty group otherwise, so the group count per tile
// stays uniform).
template <typename T>
__device__ __forceinline__ void tc_refill(unsigned short* buf, const T* cache, bool has_next,
                                          int n_next, const PrefillTile& t, int block_size,
                                          i64 num_blocks, int num_kv_heads, int kv_head) {
    if (has_next) {
        tc_load_kv(buf, cache, n_next, t, block_size, num_blocks, num_kv_heads, kv_head);
    }
    cp_async_commit();
}

// Starts the copy of the tile's Q rows into q_s [TC_BM][TC_STRIDE] (rows past the sequence and
// dims past HEAD_DIM zero-filled): 16-byte cp.async chunks when every row start is 16-byte
// aligned, else element by element.
template <typename T>
__device__ __forceinline__ void tc_load_q(unsigned short* q_s, const T* q, int q_stride,
                                          const PrefillTile& t, int group, int kv_head) {
    constexpr int CHUNKS = TC_HD_PAD / 8;
    const unsigned short* q_bits = reinterpret_cast<const unsigned short*>(q);
    const bool aligned = q_stride % 8 == 0 && (reinterpret_cast<unsigned long long>(q) & 15) == 0;
    if (aligned) {
        for (int idx = threadIdx.x; idx < TC_BM * CHUNKS; idx += PF_THREADS) {
            const int r = idx / CHUNKS, c = idx % CHUNKS;
            const int row = t.row0 + r;
            const bool real = row < t.rows && c * 8 < HEAD_DIM;
            const i64 src = real ? (i64)(t.q_start + row / group) * q_stride +
                                       (kv_head * group + row % group) * HEAD_DIM + c * 8
                                 : 0;
            cp_async_16(q_s + r * TC_STRIDE + c * 8, q_bits + src, real ? 16 : 0);
        }
    } else {
        for (int idx = threadIdx.x; idx < TC_BM * TC_HD_PAD; idx += PF_THREADS) {
            const int r = idx / TC_HD_PAD, d = idx % TC_HD_PAD;
            const int row = t.row0 + r;
            unsigned short v = 0;
            if (row < t.rows && d < HEAD_DIM) {
                const int head = kv_head * group + row % group;
                v = q_bits[(i64)(t.q_start + row / group) * q_stride + head * HEAD_DIM + d];
            }
            q_s[r * TC_STRIDE + d] = v;
        }
    }
}

// acc[mt][2 * i], acc[mt][2 * i + 1] (columns 16 i .. 16 i + 16) += a[mt] . b for each of the
// warp's row tiles; b holds the two 8-column halves of a 16 x 16 B tile (ldmatrix_x4 order).
template <typename T, int N>
__device__ __forceinline__ void tc_mma_16_cols(float (&acc)[TC_MT][N][4], int i,
                                               const u32 (&a)[TC_MT][4], const u32 (&b)[4]) {
#pragma unroll
    for (int mt = 0; mt < TC_MT; ++mt) {
        Mma<T>::run(acc[mt][2 * i], a[mt], b[0], b[1]);
        Mma<T>::run(acc[mt][2 * i + 1], a[mt], b[2], b[3]);
    }
}

// 2^x by the hardware approximation (flushes denormal results to zero, 2^-inf = 0): the
// probabilities need no more than that, and exp2f adds range fix-ups around the same instruction.
__device__ __forceinline__ float tc_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ALIBI: alibi_slopes is not null (a template parameter so that models without ALiBi carry no
// slope registers or adds).
template <typename T, bool ALIBI>
__device__ void prefill_tc_impl(PREFILL_PARAMS(T)) {
    static_assert(HEAD_DIM % 8 == 0, "the tensor-core prefill needs HEAD_DIM % 8 == 0");
    static_assert(PF_THREADS % TC_BN == 0, "threads per key");
    extern __shared__ float4 smem_f4[];
    // Q tile [TC_BM][TC_STRIDE], K tile and V tile [TC_BN][TC_STRIDE].
    unsigned short* q_s = reinterpret_cast<unsigned short*>(smem_f4);
    unsigned short* k_s = q_s + TC_BM * TC_STRIDE;
    unsigned short* v_s = k_s + TC_BN * TC_STRIDE;

    const int group = num_heads / num_kv_heads;
    const int kv_head = blockIdx.y;
    PrefillTile t;
    if (!prefill_tile(t, TC_BM, num_tokens, q_starts, q_lens, context_lens, block_tables,
                      max_blocks_per_seq, group, block_size, sliding_window)) {
        return;
    }
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    const int g = lane / 4, c = lane % 4;

    const int n_begin = t.kv_begin / TC_BN * TC_BN;
    const int num_tiles = (t.kv_end - n_begin + TC_BN - 1) / TC_BN;
    // Prologue: group {Q, K(0)}, then group {V(0)}.
    tc_load_q(q_s, q, q_stride, t, group, kv_head);
    tc_load_kv(k_s, k_cache, n_begin, t, block_size, num_blocks, num_kv_heads, kv_head);
    cp_async_commit();
    tc_load_kv(v_s, v_cache, n_begin, t, block_size, num_blocks, num_kv_heads, kv_head);
    cp_async_commit();

    // The warp's rows (warp-uniform): which keys any of them sees, and whether all see a whole
    // tile (no mask needed).
    const int w_row0 = t.row0 + warp * TC_WARP_ROWS;
    const int w_rows = min(TC_WARP_ROWS, t.rows - w_row0);  // <= 0: nothing to compute
    const int w_pos_first = t.pos0 + w_row0 / group;
    const int w_pos_last = t.pos0 + (w_row0 + max(w_rows, 1) - 1) / group;

    // This thread's rows: g and g + 8 of each of the warp's TC_MT row tiles.
    int pos[TC_MT][2];
    float slope2[TC_MT][2], m[TC_MT][2], l[TC_MT][2];
#pragma unroll
    for (int mt = 0; mt < TC_MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = w_row0 + mt * 16 + g + h * 8;
            const bool valid = row < t.rows;
            pos[mt][h] = valid ? t.pos0 + row / group : -1;
            slope2[mt][h] = (ALIBI && valid)
                                ? alibi_slopes[kv_head * group + row % group] * PF_LOG2E
                                : 0.0f;
            m[mt][h] = FERRUM_NEG_INF;
            l[mt][h] = 0.0f;
        }
    }
    const float scale2 = scale * PF_LOG2E;
    float o[TC_MT][TC_HD_PAD / 8][4];
#pragma unroll
    for (int mt = 0; mt < TC_MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < TC_HD_PAD / 8; ++dt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.0f;
        }
    }
    // ldmatrix row addresses of this lane: matrix lane / 8, row lane % 8.
    const int mat = lane / 8, mrow = lane % 8;
    // (32-bit shared addresses; each step below adds a compile-time byte offset.)
    const u32 q_frag =
        smem_addr(q_s + (warp * TC_WARP_ROWS + (mat % 2) * 8 + mrow) * TC_STRIDE + (mat / 2) * 8);
    const u32 k_frag = smem_addr(k_s + ((mat / 2) * 8 + mrow) * TC_STRIDE + (mat % 2) * 8);
    const u32 v_frag = smem_addr(v_s + ((mat % 2) * 8 + mrow) * TC_STRIDE + (mat / 2) * 8);

    for (int it = 0; it < num_tiles; ++it) {
        const int n0 = n_begin + it * TC_BN;
        const int n_last = n0 + TC_BN - 1;
        // Whether any row of the warp sees a key of this tile, and whether every row sees
        // every key (rows all valid, tile at or below the warp's first position and inside
        // every row's window).
        const bool active = w_rows > 0 && n0 <= w_pos_last &&
                            (sliding_window <= 0 || n_last > w_pos_first - sliding_window);
        const bool full = w_rows == TC_WARP_ROWS && n_last <= w_pos_first &&
                          (sliding_window <= 0 || n0 > w_pos_last - sliding_window);

        cp_async_wait<1>();  // K(it) (and Q) landed for this thread ...
        __syncthreads();                 // ... and for every thread

        float s[TC_MT][TC_BN / 8][4];
        if (active) {
#pragma unroll
            for (int mt = 0; mt < TC_MT; ++mt) {
#pragma unroll
                for (int nt = 0; nt < TC_BN / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
                }
            }
#pragma unroll
            for (int kk = 0; kk < TC_HD_PAD / 16; ++kk) {
                u32 a[TC_MT][4];
#pragma unroll
                for (int mt = 0; mt < TC_MT; ++mt) {
                    ldmatrix_x4(a[mt], q_frag + (mt * 16 * TC_STRIDE + kk * 16) * 2);
                }
#pragma unroll
                for (int np = 0; np < TC_BN / 16; ++np) {
                    u32 b[4];
                    ldmatrix_x4(b, k_frag + (np * 16 * TC_STRIDE + kk * 16) * 2);
                    tc_mma_16_cols<T>(s, np, a, b);
                }
            }
        }
        __syncthreads();  // every warp is done with K(it): K(it + 1) starts loading
        tc_refill(k_s, k_cache, it + 1 < num_tiles, n0 + TC_BN, t, block_size, num_blocks,
                  num_kv_heads, kv_head);

        if (active) {
            // Mask, scale, online softmax; P overwrites S.
#pragma unroll
            for (int mt = 0; mt < TC_MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float mx = FERRUM_NEG_INF;
#pragma unroll
                    for (int nt = 0; nt < TC_BN / 8; ++nt) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = n0 + nt * 8 + 2 * c + e;
                            float x = s[mt][nt][2 * h + e] * scale2;
                            if (ALIBI) x += slope2[mt][h] * (float)(j - pos[mt][h]);
                            if (!full && !(j <= pos[mt][h] &&
                                           (sliding_window <= 0 || j > pos[mt][h] - sliding_window))) {
                                x = FERRUM_NEG_INF;
                            }
                            s[mt][nt][2 * h + e] = x;
                            mx = fmaxf(mx, x);
                        }
                    }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float m_new = fmaxf(m[mt][h], mx);
                    const float m_use = m_new == FERRUM_NEG_INF ? 0.0f : m_new;
                    const float corr = tc_exp2(m[mt][h] - m_use);
                    float sum = 0.0f;
#pragma unroll
                    for (int nt = 0; nt < TC_BN / 8; ++nt) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float p = tc_exp2(s[mt][nt][2 * h + e] - m_use);
                            s[mt][nt][2 * h + e] = p;
                            sum += p;
                        }
                    }
                    // Per-thread partial; the quad is summed at the end.
                    l[mt][h] = l[mt][h] * corr + sum;
                    m[mt][h] = m_new;
#pragma unroll
                    for (int dt = 0; dt < TC_HD_PAD / 8; ++dt) {
                        o[mt][dt][2 * h] *= corr;
                        o[mt][dt][2 * h + 1] *= corr;
                    }
                }
            }
        }

        cp_async_wait<1>();  // V(it) landed for this thread ...
        __syncthreads();                 // ... and for every thread
        if (active) {
#pragma unroll
            for (int kc = 0; kc < TC_BN / 16; ++kc) {
                u32 a[TC_MT][4];
#pragma unroll
                for (int mt = 0; mt < TC_MT; ++mt) {
                    a[mt][0] = Mma<T>::pack(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                    a[mt][1] = Mma<T>::pack(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                    a[mt][2] = Mma<T>::pack(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                    a[mt][3] = Mma<T>::pack(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < TC_HD_PAD / 16; ++dp) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, v_frag + (kc * 16 * TC_STRIDE + dp * 16) * 2);
                    tc_mma_16_cols<T>(o, dp, a, b);
                }
            }
        }
        __syncthreads();  // every warp is done with V(it): V(it + 1) starts loading
        tc_refill(v_s, v_cache, it + 1 < num_tiles, n0 + TC_BN, t, block_size, num_blocks,
                  num_kv_heads, kv_head);
    }

#pragma unroll
    for (int mt = 0; mt < TC_MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l_all = l[mt][h];
            l_all += __shfl_xor_sync(0xffffffffu, l_all, 1);
            l_all += __shfl_xor_sync(0xffffffffu, l_all, 2);
            const int row = w_row0 + mt * 16 + g + h * 8;
            if (row >= t.rows) continue;
            const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
            const int head = kv_head * group + row % group;
            // Two neighbouring dims per 4-byte store (HEAD_DIM is even, rows 4-byte aligned).
            u32* orow = reinterpret_cast<u32*>(out + (i64)(t.q_start + row / group) * num_heads *
                                                         HEAD_DIM + head * HEAD_DIM);
#pragma unroll
            for (int dt = 0; dt < TC_HD_PAD / 8; ++dt) {
                const int d = dt * 8 + 2 * c;
                if (d < HEAD_DIM) {
                    orow[d / 2] = Mma<T>::pack(o[mt][dt][2 * h] * inv_l,
                                               o[mt][dt][2 * h + 1] * inv_l);
                }
            }
        }
    }
}

// The fast kernel per dtype: tensor cores for the 16-bit types, SIMT for f32.
template <typename T>
__device__ __forceinline__ void prefill_best(PREFILL_PARAMS(T)) {
#if HEAD_DIM % 8 == 0
    if (alibi_slopes != nullptr) {
        prefill_tc_impl<T, true>(PREFILL_ARGS);
    } else {
        prefill_tc_impl<T, false>(PREFILL_ARGS);
    }
#else
    prefill_simt_impl<T>(PREFILL_ARGS);
#endif
}
template <>
__device__ __forceinline__ void prefill_best<float>(PREFILL_PARAMS(float)) {
    prefill_simt_impl<float>(PREFILL_ARGS);
}

#define PAGED_ATTENTION_PREFILL_SIMT(name, T)                                                  \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) name(PREFILL_PARAMS(T)) {         \
        prefill_simt_impl<T>(PREFILL_ARGS);                                                    \
    }
FERRUM_FOR_EACH_DTYPE(PAGED_ATTENTION_PREFILL_SIMT, paged_attention_prefill_simt)

#define PAGED_ATTENTION_PREFILL(name, T)                                                       \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) name(PREFILL_PARAMS(T)) {         \
        prefill_best<T>(PREFILL_ARGS);                                                         \
    }
FERRUM_FOR_EACH_DTYPE(PAGED_ATTENTION_PREFILL, paged_attention_prefill)
