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

    const int group = num_heads / num_kv_heads;
    const int blocks_per_kv = group / GQA_HEADS;
    const int kv_head = blockIdx.x / blocks_per_kv;
    const int head0 = kv_head * group + (blockIdx.x % blocks_per_kv) * GQA_HEADS;
    const int seq = blockIdx.y;
    const int split = blockIdx.z;
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    const int key_in_warp = lane / C::TPK;
    const int sub = lane % C::TPK;

    int ctx = context_lens[seq];
    const int table_tokens = max_blocks_per_seq * block_size;
    if (ctx > table_tokens) ctx = table_tokens;
    if (ctx < 0) ctx = 0;
    const int pos = ctx - 1;
    const int lo = sliding_window > 0 ? max(0, ctx - sliding_window) : 0;
    const int chunk = ((ctx - lo + num_splits - 1) / num_splits + 15) / 16 * 16;
    const int begin = lo + split * chunk;
    const int end = min(ctx, begin + chunk);
    const i32* table = block_tables + (i64)seq * max_blocks_per_seq;
    const int kv_dim = num_kv_heads * HEAD_DIM;

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

#define PAGED_ATTENTION_SPLITK(name, T)                                                        \
    extern "C" __global__ void __launch_bounds__(SK_THREADS)                                   \
        name(T* out, float* part_m, float* part_l, float* part_acc, const T* q, int q_stride,  \
             const T* k_cache, const T* v_cache, const i32* block_tables,                      \
             int max_blocks_per_seq, const i32* context_lens, const float* alibi_slopes,       \
             int num_heads, int num_kv_heads, int block_size, i64 num_blocks, float scale,     \
             int sliding_window, int num_splits) {                                             \
        splitk_impl<T>(out, part_m, part_l, part_acc, q, q_stride, k_cache, v_cache,           \
                       block_tables, max_blocks_per_seq, context_lens, alibi_slopes,           \
                       num_heads, num_kv_heads, block_size, num_blocks, scale, sliding_window, \
                       num_splits);                                                            \
    }
SK_FOR_DTYPE(PAGED_ATTENTION_SPLITK, paged_attention_splitk)

#define PAGED_ATTENTION_SPLITK_REDUCE(name, T)                                                 \
    extern "C" __global__ void __launch_bounds__(SK_THREADS)                                   \
        name(T* out, const float* part_m, const float* part_l, const float* part_acc,          \
             int num_splits) {                                                                 \
        splitk_reduce_impl<T>(out, part_m, part_l, part_acc, num_splits);                      \
    }
SK_FOR_DTYPE(PAGED_ATTENTION_SPLITK_REDUCE, paged_attention_splitk_reduce)
