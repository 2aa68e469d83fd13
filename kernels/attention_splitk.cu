// Split-K (flash-decoding) paged attention for decode: one query token per sequence, the
// context cut into num_splits chunks that separate CTAs reduce to partial softmax states
// (max, sum, unnormalized accumulator), merged by a second kernel. For long contexts at small
// batch, where one CTA per (sequence, head) leaves most SMs idle.
//
// out: [num_seqs, num_heads, HEAD_DIM]
// q: [num_seqs, q_stride], head h at h * HEAD_DIM (q may sit inside a fused qkv row)
// k_cache, v_cache: [num_blocks, block_size, num_kv_heads, HEAD_DIM]
// block_tables: [num_seqs, max_blocks_per_seq]; context_lens: [num_seqs] (the query sits at
//   position context_len - 1)
// alibi_slopes: [num_heads] or null; sliding_window: 0 = none, else the last w positions
// part_m, part_l: [num_seqs, num_heads, num_splits]; part_acc: [num_seqs, num_heads,
//   num_splits, HEAD_DIM] (f32; m in log2 units, acc relative to 2^m, unnormalized)
//
// paged_attention_splitk_{DTYPE}: grid (num_kv_heads * group / GQA_HEADS, num_seqs, num_splits),
//   128 threads. A CTA serves GQA_HEADS query heads of one kv head (each K/V row it loads is
//   used by all of them). Sequence s's window [lo, context_len) is cut into num_splits chunks of
//   ceil(n / num_splits) keys rounded up to 16; split i takes chunk i (possibly empty: m = -inf,
//   l = 0). TPK lanes read one key row with 16-byte loads (TPK = the largest power of two <=
//   HEAD_DIM / (16 / sizeof(T)), at most 16), so a warp reads 32 / TPK keys at once, SK_UNROLL
//   steps of them in flight per thread; a thread's keys of one step share one online-softmax
//   rescale. With num_splits == 1 the CTA writes out directly and no
//   reduce is needed.
// paged_attention_splitk_reduce_{DTYPE}: grid (num_heads, num_seqs), 128 threads; merges the
//   num_splits partials of one (sequence, head) into out.
//
// Needs HEAD_DIM * sizeof(T) % 16 == 0 and q_stride * sizeof(T) % 16 == 0 (the launcher
// checks). Bad device data stays inside the buffers: context lengths are clamped to the block
// table, keys of block ids outside [0, num_blocks) are skipped.
//
// Compiled once per dtype: DTYPE (f32, bf16 or f16; required) selects the one dtype whose entry
// points this module instantiates. The 16-byte row condition differs per dtype (HEAD_DIM 12 is
// 48-byte rows in f32 but 24-byte rows in bf16), so a module holding every dtype would fail to
// compile for a head size f32 supports.

#ifndef DTYPE
#error "attention_splitk.cu is compiled per dtype: define DTYPE as f32, bf16 or f16"
#endif
#define SK_CAT_(a, b) a##b
#define SK_CAT(a, b) SK_CAT_(a, b)
#define SK_DTYPE_ID_f32 1
#define SK_DTYPE_ID_bf16 2
#define SK_DTYPE_ID_f16 3
#if SK_CAT(SK_DTYPE_ID_, DTYPE) == 0
#error "DTYPE must be f32, bf16 or f16"
#endif
// SK_FOR_DTYPE(MACRO, op): FERRUM_FOR_EACH_DTYPE restricted to DTYPE (entry op_{DTYPE}).
#define SK_FOR_DTYPE_f32(MACRO, op) MACRO(op##_f32, float)
#define SK_FOR_DTYPE_bf16(MACRO, op) MACRO(op##_bf16, bf16)
#define SK_FOR_DTYPE_f16(MACRO, op) MACRO(op##_f16, f16)
#define SK_FOR_DTYPE(MACRO, op) SK_CAT(SK_FOR_DTYPE_, DTYPE)(MACRO, op)

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GQA_HEADS
#define GQA_HEADS 1
#endif
#if HEAD_DIM > 256 || HEAD_DIM < 1
#error "HEAD_DIM must be in 1..=256"
#endif

#define SK_WARPS 4
#define SK_THREADS (SK_WARPS * FERRUM_WARP)
#define SK_UNROLL 2
#define SK_MAX_SPLITS 256
#define SK_LOG2E 1.4426950408889634f

struct alignas(16) U32x4 {
    u32 x, y, z, w;
};

__host__ __device__ constexpr int sk_pow2_floor(int x) { return x >= 2 ? 2 * sk_pow2_floor(x / 2) : 1; }

template <typename T> struct SplitK {
    static constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte load
    static constexpr int NUM_VECS = HEAD_DIM / VEC;
    static constexpr int TPK = sk_pow2_floor(NUM_VECS) < 16 ? sk_pow2_floor(NUM_VECS) : 16;
    static constexpr int VPT = (NUM_VECS + TPK - 1) / TPK;  // 16-byte vectors per thread
    static constexpr int KPW = FERRUM_WARP / TPK;           // keys per warp per step
    static constexpr int KPC = KPW * SK_WARPS;              // keys per CTA per step
};

__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float f16_bits(u32 w) {
    f16 h;
    h.bits = (unsigned short)w;
    return to_f32(h);
}

template <typename T> struct IsBf16 {
    static constexpr bool value = false;
};
template <> struct IsBf16<bf16> {
    static constexpr bool value = true;
};

template <typename T>
__device__ __forceinline__ void unpack16(const U32x4& r, float* f) {
    const u32 w[4] = {r.x, r.y, r.z, r.w};
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(w[i]);
    } else if constexpr (IsBf16<T>::value) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = bf16_lo(w[i]);
            f[2 * i + 1] = bf16_hi(w[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = f16_bits(w[i] & 0xffffu);
            f[2 * i + 1] = f16_bits(w[i] >> 16);
        }
    }
}

__device__ __forceinline__ U32x4 load16(const void* p) {
    U32x4 r;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// Where one CTA works: its kv head and first query head, its sequence, and its split's keys
// [begin, end) of the window [lo, context_len) (context lengths clamped to the block table).
struct SplitRange {
    int kv_head, head0, seq, split, pos, begin, end, kv_dim;
    const i32* table;
    __device__ SplitRange(const i32* block_tables, int max_blocks_per_seq, const i32* context_lens,
                          int num_heads, int num_kv_heads, int block_size, int sliding_window,
                          int num_splits) {
        const int group = num_heads / num_kv_heads;
        const int blocks_per_kv = group / GQA_HEADS;
        kv_head = blockIdx.x / blocks_per_kv;
        head0 = kv_head * group + (blockIdx.x % blocks_per_kv) * GQA_HEADS;
        seq = blockIdx.y;
        split = blockIdx.z;
        int ctx = context_lens[seq];
        const int table_tokens = max_blocks_per_seq * block_size;
        if (ctx > table_tokens) ctx = table_tokens;
        if (ctx < 0) ctx = 0;
        pos = ctx - 1;
        const int lo = sliding_window > 0 ? max(0, ctx - sliding_window) : 0;
        const int chunk = ((ctx - lo + num_splits - 1) / num_splits + 15) / 16 * 16;
        begin = lo + split * chunk;
        end = min(ctx, begin + chunk);
        table = block_tables + (i64)seq * max_blocks_per_seq;
        kv_dim = num_kv_heads * HEAD_DIM;
    }
};

// Merges the SK_WARPS per-warp softmax states of the CTA's heads (red_*, written before a
// __syncthreads) and writes out (one split) or this split's partials.
template <typename T>
__device__ void splitk_finish(const float (*red_m)[GQA_HEADS], const float (*red_l)[GQA_HEADS],
                              const float (*red_acc)[GQA_HEADS][HEAD_DIM], T* out, float* part_m,
                              float* part_l, float* part_acc, const SplitRange& r,
                              int num_heads, int num_splits) {
    const int seq = r.seq, head0 = r.head0, split = r.split;
    for (int idx = threadIdx.x; idx < GQA_HEADS * HEAD_DIM; idx += SK_THREADS) {
        const int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float m_all = FERRUM_NEG_INF;
#pragma unroll
        for (int w = 0; w < SK_WARPS; ++w) m_all = fmaxf(m_all, red_m[w][h]);
        const float m_use = m_all == FERRUM_NEG_INF ? 0.0f : m_all;
        float l_all = 0.0f, a = 0.0f;
#pragma unroll
        for (int w = 0; w < SK_WARPS; ++w) {
            const float wt = exp2f(red_m[w][h] - m_use);
            l_all += red_l[w][h] * wt;
            a += red_acc[w][h][d] * wt;
        }
        const int head = head0 + h;
        if (num_splits == 1) {
            out[((i64)seq * num_heads + head) * HEAD_DIM + d] =
                from_f32<T>(l_all > 0.0f ? a / l_all : 0.0f);
        } else {
            const i64 part = ((i64)seq * num_heads + head) * num_splits + split;
            part_acc[part * HEAD_DIM + d] = a;
            if (d == 0) {
                part_m[part] = m_all;
                part_l[part] = l_all;
            }
        }
    }
}

template <typename T>
__device__ void splitk_impl(T* out, float* part_m, float* part_l, float* part_acc, const T* q,
                            int q_stride, const T* k_cache, const T* v_cache,
                            const i32* block_tables, int max_blocks_per_seq,
                            const i32* context_lens, const float* alibi_slopes, int num_heads,
                            int num_kv_heads, int block_size, i64 num_blocks, float scale,
                            int sliding_window, int num_splits) {
    using C = SplitK<T>;
    static_assert(HEAD_DIM % C::VEC == 0, "HEAD_DIM * sizeof(T) must be a multiple of 16");
    __shared__ float red_m[SK_WARPS][GQA_HEADS];
    __shared__ float red_l[SK_WARPS][GQA_HEADS];
    __shared__ float red_acc[SK_WARPS][GQA_HEADS][HEAD_DIM];

    const SplitRange r(block_tables, max_blocks_per_seq, context_lens, num_heads, num_kv_heads,
                       block_size, sliding_window, num_splits);
    const int kv_head = r.kv_head, head0 = r.head0, seq = r.seq, pos = r.pos, begin = r.begin,
              end = r.end, kv_dim = r.kv_dim;
    const i32* table = r.table;
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    const int key_in_warp = lane / C::TPK;
    const int sub = lane % C::TPK;

    // q of this thread's dims, pre-scaled into log2 units.
    float qf[GQA_HEADS][C::VPT][C::VEC];
    float slope2[GQA_HEADS];
    const float scale2 = scale * SK_LOG2E;
#pragma unroll
    for (int h = 0; h < GQA_HEADS; ++h) {
        slope2[h] = alibi_slopes != nullptr ? alibi_slopes[head0 + h] * SK_LOG2E : 0.0f;
        const T* q_row = q + (i64)seq * q_stride + (head0 + h) * HEAD_DIM;
#pragma unroll
        for (int v = 0; v < C::VPT; ++v) {
            const int vi = sub + v * C::TPK;
            if (vi < C::NUM_VECS) {
                unpack16<T>(load16(q_row + vi * C::VEC), qf[h][v]);
#pragma unroll
                for (int e = 0; e < C::VEC; ++e) qf[h][v][e] *= scale2;
            } else {
#pragma unroll
                for (int e = 0; e < C::VEC; ++e) qf[h][v][e] = 0.0f;
            }
        }
    }

    float m[GQA_HEADS], l[GQA_HEADS], acc[GQA_HEADS][C::VPT][C::VEC];
#pragma unroll
    for (int h = 0; h < GQA_HEADS; ++h) {
        m[h] = FERRUM_NEG_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int v = 0; v < C::VPT; ++v) {
#pragma unroll
            for (int e = 0; e < C::VEC; ++e) acc[h][v][e] = 0.0f;
        }
    }

    for (int base = begin + warp * C::KPW; base < end; base += C::KPC * SK_UNROLL) {
        // Issue every load of this step before using any.
        U32x4 kr[SK_UNROLL][C::VPT], vr[SK_UNROLL][C::VPT];
        bool valid[SK_UNROLL];
#pragma unroll
        for (int u = 0; u < SK_UNROLL; ++u) {
            const int j = base + u * C::KPC + key_in_warp;
            valid[u] = j < end;
            i64 off = 0;
            if (valid[u]) {
                const i32 block_id = table[j / block_size];
                valid[u] = block_id >= 0 && (i64)block_id < num_blocks;
                off = ((i64)block_id * block_size + j % block_size) * kv_dim + kv_head * HEAD_DIM;
            }
#pragma unroll
            for (int v = 0; v < C::VPT; ++v) {
                const int vi = sub + v * C::TPK;
                if (valid[u] && vi < C::NUM_VECS) {
                    kr[u][v] = load16(k_cache + off + vi * C::VEC);
                    vr[u][v] = load16(v_cache + off + vi * C::VEC);
                } else {
                    kr[u][v] = U32x4{0, 0, 0, 0};
                    vr[u][v] = U32x4{0, 0, 0, 0};
                }
            }
        }
        // Scores of this lane's SK_UNROLL keys for every head of the CTA.
        float s[SK_UNROLL][GQA_HEADS];
#pragma unroll
        for (int u = 0; u < SK_UNROLL; ++u) {
            const int j = base + u * C::KPC + key_in_warp;
            float kf[C::VPT][C::VEC];
#pragma unroll
            for (int v = 0; v < C::VPT; ++v) unpack16<T>(kr[u][v], kf[v]);
#pragma unroll
            for (int h = 0; h < GQA_HEADS; ++h) {
                float x = 0.0f;
#pragma unroll
                for (int v = 0; v < C::VPT; ++v) {
#pragma unroll
                    for (int e = 0; e < C::VEC; ++e) x += qf[h][v][e] * kf[v][e];
                }
#pragma unroll
                for (int off = C::TPK / 2; off > 0; off /= 2) {
                    x += __shfl_xor_sync(0xffffffffu, x, off);
                }
                s[u][h] = valid[u] ? x + slope2[h] * (float)(j - pos) : FERRUM_NEG_INF;
            }
        }
        // One online-softmax update per head for the step's keys: one rescale of the
        // accumulator per step rather than per key (GQA CTAs are bound by these instructions).
        float p[SK_UNROLL][GQA_HEADS];
#pragma unroll
        for (int h = 0; h < GQA_HEADS; ++h) {
            float m_new = m[h];
#pragma unroll
            for (int u = 0; u < SK_UNROLL; ++u) m_new = fmaxf(m_new, s[u][h]);
            const float m_use = m_new == FERRUM_NEG_INF ? 0.0f : m_new;
            const float corr = exp2f(m[h] - m_use);
            float l_new = l[h] * corr;
#pragma unroll
            for (int u = 0; u < SK_UNROLL; ++u) {
                p[u][h] = exp2f(s[u][h] - m_use);
                l_new += p[u][h];
            }
            l[h] = l_new;
            m[h] = m_new;
#pragma unroll
            for (int v = 0; v < C::VPT; ++v) {
#pragma unroll
                for (int e = 0; e < C::VEC; ++e) acc[h][v][e] *= corr;
            }
        }
#pragma unroll
        for (int u = 0; u < SK_UNROLL; ++u) {
            float vf[C::VPT][C::VEC];
#pragma unroll
            for (int v = 0; v < C::VPT; ++v) unpack16<T>(vr[u][v], vf[v]);
#pragma unroll
            for (int h = 0; h < GQA_HEADS; ++h) {
#pragma unroll
                for (int v = 0; v < C::VPT; ++v) {
#pragma unroll
                    for (int e = 0; e < C::VEC; ++e) acc[h][v][e] = fmaf(p[u][h], vf[v][e], acc[h][v][e]);
                }
            }
        }
    }

    // Merge the key groups of the warp (lanes sub, sub + TPK, ... hold the same dims).
#pragma unroll
    for (int off = C::TPK; off < FERRUM_WARP; off *= 2) {
#pragma unroll
        for (int h = 0; h < GQA_HEADS; ++h) {
            const float m_o = __shfl_xor_sync(0xffffffffu, m[h], off);
            const float l_o = __shfl_xor_sync(0xffffffffu, l[h], off);
            const float m_new = fmaxf(m[h], m_o);
            const float m_use = m_new == FERRUM_NEG_INF ? 0.0f : m_new;
            const float w_self = exp2f(m[h] - m_use);
            const float w_o = exp2f(m_o - m_use);
            l[h] = l[h] * w_self + l_o * w_o;
            m[h] = m_new;
#pragma unroll
            for (int v = 0; v < C::VPT; ++v) {
#pragma unroll
                for (int e = 0; e < C::VEC; ++e) {
                    const float a_o = __shfl_xor_sync(0xffffffffu, acc[h][v][e], off);
                    acc[h][v][e] = acc[h][v][e] * w_self + a_o * w_o;
                }
            }
        }
    }
    if (key_in_warp == 0) {
#pragma unroll
        for (int h = 0; h < GQA_HEADS; ++h) {
            if (sub == 0) {
                red_m[warp][h] = m[h];
                red_l[warp][h] = l[h];
            }
#pragma unroll
            for (int v = 0; v < C::VPT; ++v) {
                const int vi = sub + v * C::TPK;
                if (vi < C::NUM_VECS) {
#pragma unroll
                    for (int e = 0; e < C::VEC; ++e) red_acc[warp][h][vi * C::VEC + e] = acc[h][v][e];
                }
            }
        }
    }
    __syncthreads();

    splitk_finish<T>(red_m, red_l, red_acc, out, part_m, part_l, part_acc, r, num_heads,
                     num_splits);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variant for GQA in bf16/f16 (paged_attention_splitk_mma_{DTYPE}; same arguments,
// grid and results as paged_attention_splitk): the CTA's GQA_HEADS query heads are the rows of
// mma.m16n8k16 tiles (rows past GQA_HEADS are zero), so the scores of a 16-key tile are two
// Q.K^T products and its P.V update HEAD_DIM / 8 more, with one online-softmax rescale per tile
// and row. The SIMT kernel above spends most of its time in per-key dot-product shuffles and
// rescales once several heads share each K/V row; this one leaves the tile to the tensor cores.
//
// Each warp runs its own pipeline over tiles w, w + SK_WARPS, ... of its split: K and V of the
// next tile are copied (cp.async; keys past the split or in bad blocks zero-filled) into the
// warp's other stage while the current one is computed. Shared rows are padded by 8 elements so
// ldmatrix's 8 row addresses fall in different banks: K rows give the B fragments of Q.K^T
// (ldmatrix), V rows those of P.V (ldmatrix.trans), and P is built in registers from the score
// accumulators. Needs HEAD_DIM % 16 == 0 and 2 <= GQA_HEADS <= 8 (rows g + 8 of every fragment are
// padding); dynamic shared memory: SK_MMA_SMEM_BYTES.
#if SK_CAT(SK_DTYPE_ID_, DTYPE) != 1 && HEAD_DIM % 16 == 0 && GQA_HEADS >= 2 && GQA_HEADS <= 8
#define SK_MMA 1
#define SK_TILE 16
#define SK_ROW (HEAD_DIM + 8)
// Per warp: 2 stages x (K, V) x SK_TILE rows of SK_ROW 16-bit elements.
#define SK_MMA_STAGE_ELEMS (2 * SK_TILE * SK_ROW)
#define SK_MMA_WARP_ELEMS (2 * SK_MMA_STAGE_ELEMS)
#define SK_MMA_SMEM_BYTES (SK_WARPS * SK_MMA_WARP_ELEMS * 2)

// Starts the copy of K and V of keys t0 .. t0 + SK_TILE into stage (K rows then V rows); keys at
// or past `end` and keys of bad blocks are zero-filled (no read).
template <typename T>
__device__ __forceinline__ void sk_load_tile(unsigned short* stage, const T* k_cache,
                                             const T* v_cache, int t0, int end, const i32* table,
                                             int block_size, i64 num_blocks, int kv_dim,
                                             int kv_head, int lane) {
    constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
#pragma unroll
    for (int i = 0; i < SK_TILE * CHUNKS / FERRUM_WARP; ++i) {
        const int q = i * FERRUM_WARP + lane;
        const int key = q / CHUNKS, chunk = q % CHUNKS;
        const int j = t0 + key;
        i64 off = 0;
        int bytes = 0;
        if (j < end) {
            const i32 block_id = table[j / block_size];
            if (block_id >= 0 && (i64)block_id < num_blocks) {
                off = ((i64)block_id * block_size + j % block_size) * kv_dim + kv_head * HEAD_DIM +
                      chunk * 8;
                bytes = 16;
            }
        }
        cp_async_16(stage + key * SK_ROW + chunk * 8, k_cache + off, bytes);
        cp_async_16(stage + (SK_TILE + key) * SK_ROW + chunk * 8, v_cache + off, bytes);
    }
}

template <typename T>
__device__ void splitk_mma_impl(T* out, float* part_m, float* part_l, float* part_acc,
                                const T* q, int q_stride, const T* k_cache, const T* v_cache,
                                const i32* block_tables, int max_blocks_per_seq,
                                const i32* context_lens, const float* alibi_slopes,
                                int num_heads, int num_kv_heads, int block_size, i64 num_blocks,
                                float scale, int sliding_window, int num_splits) {
    constexpr int KSTEPS = HEAD_DIM / 16;  // Q.K^T k-steps; also P.V dim pairs of 8-wide tiles
    constexpr int NT = HEAD_DIM / 8;       // P.V output tiles
    extern __shared__ __align__(16) unsigned short sk_smem[];
    __shared__ float red_m[SK_WARPS][GQA_HEADS];
    __shared__ float red_l[SK_WARPS][GQA_HEADS];
    // The per-warp accumulators are merged through the stages' memory once every warp is done.
    float(*red_acc)[GQA_HEADS][HEAD_DIM] = reinterpret_cast<float(*)[GQA_HEADS][HEAD_DIM]>(sk_smem);
    static_assert(SK_WARPS * GQA_HEADS * HEAD_DIM * 4 <= SK_MMA_SMEM_BYTES, "red_acc must fit");

    const SplitRange r(block_tables, max_blocks_per_seq, context_lens, num_heads, num_kv_heads,
                       block_size, sliding_window, num_splits);
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    const int g = lane / 4, c = lane % 4;
    unsigned short* wsmem = sk_smem + warp * SK_MMA_WARP_ELEMS;

    // Q rows (the CTA's heads; rows GQA_HEADS..15 zero) through stage 0, into A fragments.
    {
        constexpr int CHUNKS = HEAD_DIM / 8;
        for (int i = lane; i < 16 * CHUNKS; i += FERRUM_WARP) {
            const int row = i / CHUNKS, chunk = i % CHUNKS;
            const T* src = q + (i64)r.seq * q_stride + (r.head0 + row) * HEAD_DIM + chunk * 8;
            cp_async_16(wsmem + row * SK_ROW + chunk * 8, row < GQA_HEADS ? src : q,
                        row < GQA_HEADS ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncwarp();
    }
    u32 qa[KSTEPS][4];
    {
        // Matrix lane / 8: rows 0-7 / 8-15 (bit 0), columns +0 / +8 (bit 1).
        const int row = (lane % 8) + 8 * ((lane / 8) % 2), col = 8 * (lane / 16);
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s) ldmatrix_x4(qa[s], wsmem + row * SK_ROW + s * 16 + col);
    }
    __syncwarp();

    const float scale2 = scale * SK_LOG2E;
    const float slope2 =
        alibi_slopes != nullptr && g < GQA_HEADS ? alibi_slopes[r.head0 + g] * SK_LOG2E : 0.0f;
    // Row g's state; l is this lane's share (its columns), summed over the row's 4 lanes at the end.
    float m = FERRUM_NEG_INF, l = 0.0f;
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    const int first = r.begin + warp * SK_TILE;
    const int step = SK_WARPS * SK_TILE;
    if (first < r.end) {
        sk_load_tile(wsmem, k_cache, v_cache, first, r.end, r.table, block_size, num_blocks,
                     r.kv_dim, r.kv_head, lane);
    }
    cp_async_commit();
    int stage = 0;
    for (int t0 = first; t0 < r.end; t0 += step) {
        // The next tile into the other stage (its reads of two tiles ago are done: __syncwarp
        // at the end of the last iteration), then wait for this one.
        if (t0 + step < r.end) {
            sk_load_tile(wsmem + (stage ^ 1) * SK_MMA_STAGE_ELEMS, k_cache, v_cache, t0 + step,
                         r.end, r.table, block_size, num_blocks, r.kv_dim, r.kv_head, lane);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncwarp();
        const unsigned short* ks = wsmem + stage * SK_MMA_STAGE_ELEMS;
        const unsigned short* vs = ks + SK_TILE * SK_ROW;

        // S = Q.K^T for keys t0 + 0..7 (s[0]) and t0 + 8..15 (s[1]).
        float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        {
            // Matrices: keys 0-7 dims +0, keys 0-7 dims +8, keys 8-15 dims +0, keys 8-15 dims +8.
            const int key = (lane % 8) + 8 * (lane / 16), col = 8 * ((lane / 8) % 2);
#pragma unroll
            for (int s = 0; s < KSTEPS; ++s) {
                u32 b[4];
                ldmatrix_x4(b, ks + key * SK_ROW + s * 16 + col);
                Mma<T>::run(sc[0], qa[s], b[0], b[1]);
                Mma<T>::run(sc[1], qa[s], b[2], b[3]);
            }
        }
        // Row g, keys t0 + 8h + 2c + e: scale, ALiBi, mask; one rescale for the tile.
        float tile_max = FERRUM_NEG_INF;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = t0 + 8 * h + 2 * c + e;
                bool valid = j < r.end;
                if (valid) {
                    // A bad block's key was zero-filled; it is skipped, as in the SIMT kernel.
                    const i32 block_id = r.table[j / block_size];
                    valid = block_id >= 0 && (i64)block_id < num_blocks;
                }
                const float x = sc[h][e] * scale2 + slope2 * (float)(j - r.pos);
                sc[h][e] = valid ? x : FERRUM_NEG_INF;
                tile_max = fmaxf(tile_max, sc[h][e]);
            }
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float m_new = fmaxf(m, tile_max);
        const float m_use = m_new == FERRUM_NEG_INF ? 0.0f : m_new;
        const float corr = exp2f(m - m_use);
        m = m_new;
        float p[2][2];
        float psum = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                p[h][e] = exp2f(sc[h][e] - m_use);
                psum += p[h][e];
            }
        }
        l = l * corr + psum;
        // P as the A fragment (rows g; rows g + 8 are padding): keys 2c.. then 8 + 2c...
        const u32 pa[4] = {Mma<T>::pack(p[0][0], p[0][1]), 0u, Mma<T>::pack(p[1][0], p[1][1]), 0u};
        {
            // Matrices: keys 0-7 dims +0, keys 8-15 dims +0, keys 0-7 dims +8, keys 8-15 dims +8.
            const int key = (lane % 8) + 8 * ((lane / 8) % 2), col = 8 * (lane / 16);
#pragma unroll
            for (int dp = 0; dp < KSTEPS; ++dp) {
                u32 b[4];
                ldmatrix_x4_trans(b, vs + key * SK_ROW + dp * 16 + col);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc[2 * dp][e] *= corr;
                    acc[2 * dp + 1][e] *= corr;
                }
                Mma<T>::run(acc[2 * dp], pa, b[0], b[1]);
                Mma<T>::run(acc[2 * dp + 1], pa, b[2], b[3]);
            }
        }
        __syncwarp();
        stage ^= 1;
    }
    cp_async_wait<0>();

    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    __syncthreads();  // every warp is past its last ldmatrix: red_acc may overwrite the stages
    if (g < GQA_HEADS) {
        if (c == 0) {
            red_m[warp][g] = m;
            red_l[warp][g] = l;
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            red_acc[warp][g][8 * n + 2 * c] = acc[n][0];
            red_acc[warp][g][8 * n + 2 * c + 1] = acc[n][1];
        }
    }
    __syncthreads();
    splitk_finish<T>(red_m, red_l, red_acc, out, part_m, part_l, part_acc, r, num_heads,
                     num_splits);
}
#endif

template <typename T>
__device__ void splitk_reduce_impl(T* out, const float* part_m, const float* part_l,
                                   const float* part_acc, int num_splits) {
    __shared__ float weight[SK_MAX_SPLITS];
    __shared__ float inv_l;
    const int head = blockIdx.x, num_heads = gridDim.x, seq = blockIdx.y;
    const i64 part0 = ((i64)seq * num_heads + head) * num_splits;
    if (threadIdx.x < FERRUM_WARP) {
        const int lane = threadIdx.x;
        float m_all = FERRUM_NEG_INF;
        for (int s = lane; s < num_splits; s += FERRUM_WARP) {
            if (part_l[part0 + s] > 0.0f) m_all = fmaxf(m_all, part_m[part0 + s]);
        }
#pragma unroll
        for (int offset = FERRUM_WARP / 2; offset > 0; offset /= 2) {
            m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, offset));
        }
        float l_sum = 0.0f;
        for (int s = lane; s < num_splits; s += FERRUM_WARP) {
            const float l = part_l[part0 + s];
            // A split that saw no key (l = 0) weighs 0 and its acc is never read.
            const float w = l > 0.0f ? exp2f(part_m[part0 + s] - m_all) : 0.0f;
            weight[s] = w;
            l_sum += l * w;
        }
        l_sum = warp_sum(l_sum);
        if (lane == 0) inv_l = l_sum > 0.0f ? 1.0f / l_sum : 0.0f;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float w = weight[s];
            if (w != 0.0f) o += w * part_acc[(part0 + s) * HEAD_DIM + d];
        }
        out[((i64)seq * num_heads + head) * HEAD_DIM + d] = from_f32<T>(o * inv_l);
    }
}

// Both decode kernels take the same arguments (the launcher picks the entry).
#define SK_SPLITK_ENTRY(name, T, impl)                                                         \
    extern "C" __global__ void __launch_bounds__(SK_THREADS)                                   \
        name(T* out, float* part_m, float* part_l, float* part_acc, const T* q, int q_stride,  \
             const T* k_cache, const T* v_cache, const i32* block_tables,                      \
             int max_blocks_per_seq, const i32* context_lens, const float* alibi_slopes,       \
             int num_heads, int num_kv_heads, int block_size, i64 num_blocks, float scale,     \
             int sliding_window, int num_splits) {                                             \
        impl<T>(out, part_m, part_l, part_acc, q, q_stride, k_cache, v_cache, block_tables,    \
                max_blocks_per_seq, context_lens, alibi_slopes, num_heads, num_kv_heads,       \
                block_size, num_blocks, scale, sliding_window, num_splits);                    \
    }
#define PAGED_ATTENTION_SPLITK(name, T) SK_SPLITK_ENTRY(name, T, splitk_impl)
SK_FOR_DTYPE(PAGED_ATTENTION_SPLITK, paged_attention_splitk)

#ifdef SK_MMA
#define PAGED_ATTENTION_SPLITK_MMA(name, T) SK_SPLITK_ENTRY(name, T, splitk_mma_impl)
SK_FOR_DTYPE(PAGED_ATTENTION_SPLITK_MMA, paged_attention_splitk_mma)
#endif

#define PAGED_ATTENTION_SPLITK_REDUCE(name, T)                                                 \
    extern "C" __global__ void __launch_bounds__(SK_THREADS)                                   \
        name(T* out, const float* part_m, const float* part_l, const float* part_acc,          \
             int num_splits) {                                                                 \
        splitk_reduce_impl<T>(out, part_m, part_l, part_acc, num_splits);                      \
    }
SK_FOR_DTYPE(PAGED_ATTENTION_SPLITK_REDUCE, paged_attention_splitk_reduce)
