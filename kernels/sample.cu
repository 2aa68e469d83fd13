// Batched sampling on the GPU: one CTA of SAMPLE_THREADS threads per row of logits, mirroring
// the CPU sampler (src/sampling) step for step so that a seeded request draws the same tokens on
// both (see src/cuda/sampling.rs for the host side and the determinism design).
//
// Per row, in the CPU sampler's order:
//  1. work = sanitize(logits) (NaN -> -inf, +inf -> FLT_MAX); suppressed ids -> -inf;
//  2. logprobs (if asked): log-sum-exp and the top-n of these logits (radix select on logit keys);
//  3. penalties on the row's history entries (repetition on every entry, presence/frequency on
//     entries with an output count > 0), in place in `work`;
//  4. greedy (temperature 0): argmax, lowest id on ties;
//     random: work = weights exp((v - max) / T) with the CPU's own exp (exp_nonpositive, plain f32
//     arithmetic with explicit _rn intrinsics so no FMA contraction changes a bit), then
//     top-k -> top-p -> min-p and one inverse-CDF draw with the uniform the host drew for the row.
//  5. a row where nothing can be drawn gets the lowest id that is not suppressed (CPU fallback).
//
// The CPU draws over its candidate list in one of two orders, and so does this kernel:
//  - "ranked" (whenever top-k cut the list or top-p ran): most likely first, ties by lower id, i.e.
//    descending 64-bit key (weight bits << 32 | ~id). Top-k, top-p and the draw are all "find the
//    first key, walking keys downwards, where the running count/mass reaches a target": a radix
//    select over the key with 10-bit digits (1024 bins, one per thread; counts and f64 masses per
//    bin in shared memory, warp-aggregated atomics), at most 7 passes over the row and usually
//    2-4. No sort of the row.
//  - "id order" (no top-k cut, no top-p): a block-wide scan of per-thread chunk masses, then the
//    thread whose chunk holds the crossing walks it.
// Masses are summed in f64 (as on the CPU), in a different order, so a draw can differ from the
// CPU's only when the uniform lands within ~1e-15 (relative) of a boundary.
//
// Shapes: logits [num_rows, vocab_size] (T = f32/bf16/f16, never written); work
// [num_rows, vocab_size] f32 scratch; params [num_rows, PARAM_WORDS] u32; history
// [num_history, 2] (token_id, output_count) u32; suppressed [num_suppressed] u32; token_ids
// [num_rows]; sampled_logprobs [num_rows], top_ids / top_logprobs [num_rows, max_top] (all three
// null when no row asks for logprobs; missing top entries are id 0xffffffff, logprob -inf);
// candidate_mask [num_rows, vocab_size] (null unless a test asks: 1 for the tokens the draw chose
// from; a greedy row marks only its token, a random row with nothing possible marks nothing).

typedef unsigned long long u64;

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / FERRUM_WARP)
#define RADIX_BINS 1024
#define PARAM_WORDS 16
#define MAX_TOP 20
#define LOGPROBS_OFF 0xffffffffu
#define NO_ID 0xffffffffu
#define TOP_P_REL_TOL 1e-5
#define FULL_MASK 0xffffffffu
#define NEG_INF_F64 (-__longlong_as_double(0x7ff0000000000000ll))

// One row's parameters: PARAM_WORDS u32 words, written by src/cuda/sampling.rs (RowParams there).
struct RowParams {
    float temperature;
    u32 top_k;
    float top_p;
    float min_p;
    float repetition;
    float presence;
    float frequency;
    u32 num_logprobs;  // LOGPROBS_OFF: none
    double uniform;    // words 8, 9
    u32 history_start;
    u32 history_len;
    u32 suppressed_start;
    u32 suppressed_len;
    u32 reserved[2];
};

struct SampleShared {
    u32 bin_count[RADIX_BINS];
    double bin_mass[RADIX_BINS];
    u32 scan_count[RADIX_BINS];
    double scan_mass[RADIX_BINS];
    double warp_mass[SAMPLE_WARPS];
    u32 warp_count[SAMPLE_WARPS];
    u64 warp_key[SAMPLE_WARPS];
    int chosen;
    int last_nonempty;
    double stage[SAMPLE_WARPS][FERRUM_WARP];
    u64 top_keys[MAX_TOP];
    u32 num_top;
};

// ---------------------------------------------------------------------------------------------
// The CPU's exp (src/sampling/exp.rs), operation for operation.

__device__ __forceinline__ float exp_nonpositive(float x) {
    const float MIN_X = -87.33654f;
    const float LOG2_E = 1.44269504088896340736f;
    const float LN2_HI = 0.69314575f;
    const float LN2_LO = 1.4286068e-6f;
    const float ROUND_MAGIC = 12582912.0f;
    // Rust's clamp: NaN stays NaN (mapped to 0 by the final select).
    float clamped = x;
    if (clamped < MIN_X) clamped = MIN_X;
    if (clamped > 0.0f) clamped = 0.0f;
    const float shifted = __fadd_rn(__fmul_rn(clamped, LOG2_E), ROUND_MAGIC);
    const float n = __fsub_rn(shifted, ROUND_MAGIC);
    const int n_int = (int)(__float_as_uint(shifted) - __float_as_uint(ROUND_MAGIC));
    const float r = __fsub_rn(__fsub_rn(clamped, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float t = 1.0f / 5040.0f;
    t = __fadd_rn(1.0f / 720.0f, __fmul_rn(r, t));
    t = __fadd_rn(1.0f / 120.0f, __fmul_rn(r, t));
    t = __fadd_rn(1.0f / 24.0f, __fmul_rn(r, t));
    t = __fadd_rn(1.0f / 6.0f, __fmul_rn(r, t));
    t = __fadd_rn(1.0f / 2.0f, __fmul_rn(r, t));
    t = __fadd_rn(1.0f, __fmul_rn(r, t));
    const float p = __fadd_rn(1.0f, __fmul_rn(r, t));
    const float scale = __uint_as_float(((u32)(n_int + 127)) << 23);
    return x >= MIN_X ? __fmul_rn(p, scale) : 0.0f;
}

__device__ __forceinline__ float sanitize(float v) {
    const float flt_max = __uint_as_float(0x7f7fffffu);
    return isnan(v) ? FERRUM_NEG_INF : fminf(v, flt_max);
}

// Keys: larger = ranked first; the low word is ~id so equal values rank the lower id first.
__device__ __forceinline__ u64 weight_key(float w, int id) {
    return ((u64)__float_as_uint(w) << 32) | (u64)(NO_ID - (u32)id);
}
__device__ __forceinline__ u64 logit_key(float v, int id) {
    const u32 bits = __float_as_uint(v);
    const u32 ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)ordered << 32) | (u64)(NO_ID - (u32)id);
}
__device__ __forceinline__ u32 key_id(u64 key) { return NO_ID - (u32)(key & 0xffffffffu); }

// ---------------------------------------------------------------------------------------------
// Block reductions (all threads call; all get the result).

__device__ double block_sum_f64(double v, SampleShared& s) {
    const int lane = threadIdx.x % FERRUM_WARP, warp = threadIdx.x / FERRUM_WARP;
#pragma unroll
    for (int o = FERRUM_WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) s.warp_mass[warp] = v;
    __syncthreads();
    v = lane < SAMPLE_WARPS ? s.warp_mass[lane] : 0.0;
#pragma unroll
    for (int o = FERRUM_WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ u64 block_max_u64(u64 v, SampleShared& s) {
    const int lane = threadIdx.x % FERRUM_WARP, warp = threadIdx.x / FERRUM_WARP;
#pragma unroll
    for (int o = FERRUM_WARP / 2; o > 0; o /= 2) {
        const u64 other = __shfl_xor_sync(FULL_MASK, v, o);
        v = other > v ? other : v;
    }
    __syncthreads();
    if (lane == 0) s.warp_key[warp] = v;
    __syncthreads();
    v = lane < SAMPLE_WARPS ? s.warp_key[lane] : 0ull;
#pragma unroll
    for (int o = FERRUM_WARP / 2; o > 0; o /= 2) {
        const u64 other = __shfl_xor_sync(FULL_MASK, v, o);
        v = other > v ? other : v;
    }
    return v;
}

__device__ u64 block_min_u64(u64 v, SampleShared& s) {
    return ~block_max_u64(~v, s);
}

__device__ float block_max_f32(float v, SampleShared& s) {
    // Sanitized values only (no NaN): order-preserving keys make the max exact.
    const u32 bits = __float_as_uint(v);
    const u32 ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    const u32 best = (u32)(block_max_u64((u64)ordered, s));
    return __uint_as_float((best & 0x80000000u) ? (best & 0x7fffffffu) : ~best);
}

// Inclusive scan over threads of (count, mass) in thread order; results in s.scan_*[threadIdx.x].
__device__ void block_inclusive_scan(u32 c, double m, SampleShared& s) {
    const int lane = threadIdx.x % FERRUM_WARP, warp = threadIdx.x / FERRUM_WARP;
#pragma unroll
    for (int o = 1; o < FERRUM_WARP; o *= 2) {
        const u32 uc = __shfl_up_sync(FULL_MASK, c, o);
        const double um = __shfl_up_sync(FULL_MASK, m, o);
        if (lane >= o) {
            c += uc;
            m += um;
        }
    }
    __syncthreads();
    if (lane == FERRUM_WARP - 1) {
        s.warp_count[warp] = c;
        s.warp_mass[warp] = m;
    }
    __syncthreads();
    if (warp == 0) {
        u32 wc = lane < SAMPLE_WARPS ? s.warp_count[lane] : 0u;
        double wm = lane < SAMPLE_WARPS ? s.warp_mass[lane] : 0.0;
        // exclusive prefix of the warp totals
#pragma unroll
        for (int o = 1; o < FERRUM_WARP; o *= 2) {
            const u32 uc = __shfl_up_sync(FULL_MASK, wc, o);
            const double um = __shfl_up_sync(FULL_MASK, wm, o);
            if (lane >= o) {
                wc += uc;
                wm += um;
            }
        }
        const u32 ec = __shfl_up_sync(FULL_MASK, wc, 1);
        const double em = __shfl_up_sync(FULL_MASK, wm, 1);
        __syncwarp();
        if (lane < SAMPLE_WARPS) {
            s.warp_count[lane] = lane == 0 ? 0u : ec;
            s.warp_mass[lane] = lane == 0 ? 0.0 : em;
        }
    }
    __syncthreads();
    s.scan_count[threadIdx.x] = s.warp_count[warp] + c;
    s.scan_mass[threadIdx.x] = s.warp_mass[warp] + m;
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Radix select.
//
// Walking the keys of the set {i : elem(i) is valid} from the largest down, finds the first key K
// where the running measure (count, or mass when by_mass) reaches the target (`>` when strict,
// else `>=`). The target is `target_count`, or `frac * total_mass * factor` with total_mass the
// set's mass (so callers need no separate pass for it). Returns false when the whole set never
// reaches the target; else writes a cutoff C such that {keys >= C} within the set is exactly the
// keys >= K (C == K, or K's bin prefix when K is alone in its bin or its bin ends the count).

#define RADIX_PASSES 7
#define UNROLL 4

template <typename Elem>
__device__ bool radix_select(const Elem& elem, int n, bool by_mass, double frac, double factor,
                             u32 target_count, bool strict, u64* cutoff, SampleShared& s) {
    u64 prefix = 0, prefix_mask = 0;
    double above_mass = 0.0, target = (double)target_count;
    u32 above_count = 0;
    for (int pass = 0; pass < RADIX_PASSES; ++pass) {
        const int shift = pass < RADIX_PASSES - 1 ? 54 - 10 * pass : 0;
        const int width = pass < RADIX_PASSES - 1 ? 10 : 4;
        const u32 digit_mask = (1u << width) - 1u;
        s.bin_count[threadIdx.x] = 0u;
        s.bin_mass[threadIdx.x] = 0.0;
        if (threadIdx.x == 0) {
            s.chosen = 0x7fffffff;
            s.last_nonempty = -1;
        }
        __syncthreads();
        // Histogram. UNROLL elements are loaded before any atomic (the passes are latency-bound).
        // Count passes use one atomic per element; mass passes aggregate lanes that hit the same
        // bin (common: similar weights share their top bits) into one f64 atomic by their lowest
        // lane. The loop runs the same number of times on every lane so the warp stays converged.
        const int lane = threadIdx.x % FERRUM_WARP, warp = threadIdx.x / FERRUM_WARP;
        for (int i0 = 0; i0 < n; i0 += SAMPLE_THREADS * UNROLL) {
            u32 bins[UNROLL];
            double masses[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int i = i0 + u * SAMPLE_THREADS + (int)threadIdx.x;
                u64 key = 0;
                double mass = 0.0;
                u32 bin = NO_ID;
                if (i < n && elem(i, key, mass) && (key & prefix_mask) == prefix) {
                    bin = (u32)(key >> shift) & digit_mask;
                }
                bins[u] = bin;
                masses[u] = mass;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const u32 bin = bins[u];
                if (!by_mass) {
                    if (bin != NO_ID) atomicAdd(&s.bin_count[bin], 1u);
                    continue;
                }
                const u32 peers = __match_any_sync(FULL_MASK, bin);
                s.stage[warp][lane] = masses[u];
                __syncwarp();
                if (bin != NO_ID && lane == __ffs(peers) - 1) {
                    atomicAdd(&s.bin_count[bin], (u32)__popc(peers));
                    double sum = 0.0;
                    for (u32 rest = peers; rest != 0; rest &= rest - 1) {
                        sum += s.stage[warp][__ffs(rest) - 1];
                    }
                    if (sum != 0.0) atomicAdd(&s.bin_mass[bin], sum);
                }
                __syncwarp();
            }
        }
        __syncthreads();
        // Thread t owns bin (RADIX_BINS - 1 - t): thread order is descending key order.
        const int bin = RADIX_BINS - 1 - (int)threadIdx.x;
        const u32 my_count = s.bin_count[bin];
        block_inclusive_scan(my_count, s.bin_mass[bin], s);
        if (pass == 0 && by_mass) {
            target = frac * s.scan_mass[RADIX_BINS - 1] * factor;
        }
        const u32 after_count = above_count + s.scan_count[threadIdx.x];
        const u32 before_count = threadIdx.x > 0 ? above_count + s.scan_count[threadIdx.x - 1]
                                                  : above_count;
        const double after_mass = above_mass + s.scan_mass[threadIdx.x];
        const double before_mass =
            threadIdx.x > 0 ? above_mass + s.scan_mass[threadIdx.x - 1] : above_mass;
        const double after_v = by_mass ? after_mass : (double)after_count;
        const double before_v = by_mass ? before_mass : (double)before_count;
        const bool reached_after = strict ? after_v > target : after_v >= target;
        const bool reached_before = strict ? before_v > target : before_v >= target;
        if (my_count > 0 && reached_after && !(before_count > 0 && reached_before)) {
            atomicMin(&s.chosen, (int)threadIdx.x);
        }
        if (my_count > 0) atomicMax(&s.last_nonempty, (int)threadIdx.x);
        __syncthreads();
        int chosen = s.chosen;
        if (chosen == 0x7fffffff) {
            // Pass 0: the set never reaches the target. Later passes: the previous pass found the
            // crossing in this region, only rounding moved it: take the region's last element.
            if (pass == 0 || s.last_nonempty < 0) return false;
            chosen = s.last_nonempty;
        }
        const u32 chosen_bin = (u32)(RADIX_BINS - 1 - chosen);
        const u32 chosen_count = s.bin_count[chosen_bin];
        above_count = chosen > 0 ? above_count + s.scan_count[chosen - 1] : above_count;
        above_mass = chosen > 0 ? above_mass + s.scan_mass[chosen - 1] : above_mass;
        prefix |= (u64)chosen_bin << shift;
        prefix_mask |= (u64)digit_mask << shift;
        __syncthreads();  // everyone has read the shared scan before the next pass clears it
        const bool count_done = !by_mass && above_count + chosen_count == target_count;
        if (chosen_count == 1 || count_done || pass == RADIX_PASSES - 1) {
            *cutoff = prefix;
            return true;
        }
    }
    *cutoff = prefix;
    return true;
}

// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ void sample_impl(const T* __restrict__ logits, float* __restrict__ work,
                            const u32* param_words,
                            const u32* history, int num_history, const u32* suppressed,
                            int num_suppressed, int vocab_size, u32* token_ids,
                            float* sampled_logprobs, u32* top_ids, float* top_logprobs,
                            int max_top, u32* candidate_mask) {
    __shared__ SampleShared s;
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int n = vocab_size;
    const RowParams p = *reinterpret_cast<const RowParams*>(param_words + (i64)row * PARAM_WORDS);
    const T* raw = logits + (i64)row * n;
    float* w = work + (i64)row * n;
    // Bound the row's ranges by the buffers (the host checks them too).
    const u32 h_start = min(p.history_start, (u32)num_history);
    const u32 h_end = h_start + min(p.history_len, (u32)num_history - h_start);
    const u32 s_start = min(p.suppressed_start, (u32)num_suppressed);
    const u32 s_end = s_start + min(p.suppressed_len, (u32)num_suppressed - s_start);

    // 1. sanitize, suppress
    for (int i = tid; i < n; i += SAMPLE_THREADS) w[i] = sanitize(to_f32(raw[i]));
    __syncthreads();
    for (u32 j = s_start + tid; j < s_end; j += SAMPLE_THREADS) {
        const u32 id = suppressed[j];
        if (id < (u32)n) w[id] = FERRUM_NEG_INF;
    }
    __syncthreads();

    // 2. logprobs of the suppressed raw logits
    const bool want_logprobs = p.num_logprobs != LOGPROBS_OFF && sampled_logprobs != nullptr;
    double lse = NEG_INF_F64;
    if (want_logprobs) {
        float m = FERRUM_NEG_INF;
        for (int i = tid; i < n; i += SAMPLE_THREADS) m = fmaxf(m, w[i]);
        m = block_max_f32(m, s);
        if (m != FERRUM_NEG_INF) {
            double sum = 0.0;
            for (int i = tid; i < n; i += SAMPLE_THREADS) {
                sum += (double)exp_nonpositive(__fsub_rn(w[i], m));
            }
            sum = block_sum_f64(sum, s);
            lse = (double)m + log(sum);
        }
        const int num_top = min((int)min(p.num_logprobs, (u32)MAX_TOP), max_top);
        if (tid == 0) s.num_top = 0;
        __syncthreads();
        if (num_top > 0) {
            auto logit_elem = [&](int i, u64& key, double& mass) {
                const float v = w[i];
                key = logit_key(v, i);
                mass = 0.0;
                return v != FERRUM_NEG_INF;
            };
            u64 cut = 0;
            const bool found =
                radix_select(logit_elem, n, false, 0.0, 0.0, (u32)num_top, false, &cut, s);
            if (!found) cut = 0;
            for (int i = tid; i < n; i += SAMPLE_THREADS) {
                u64 key;
                double mass;
                if (logit_elem(i, key, mass) && key >= cut) {
                    const u32 slot = atomicAdd(&s.num_top, 1u);
                    if (slot < MAX_TOP) s.top_keys[slot] = key;
                }
            }
            __syncthreads();
        }
        if (tid == 0 && max_top > 0) {
            const int found = min((int)s.num_top, num_top);
            for (int a = 1; a < found; ++a) {  // insertion sort, descending
                const u64 k = s.top_keys[a];
                int b = a - 1;
                while (b >= 0 && s.top_keys[b] < k) {
                    s.top_keys[b + 1] = s.top_keys[b];
                    --b;
                }
                s.top_keys[b + 1] = k;
            }
            for (int j = 0; j < max_top; ++j) {
                u32 id = NO_ID;
                float lp = FERRUM_NEG_INF;
                if (j < found) {
                    id = key_id(s.top_keys[j]);
                    lp = (float)((double)w[id] - lse);
                }
                top_ids[(i64)row * max_top + j] = id;
                top_logprobs[(i64)row * max_top + j] = lp;
            }
        }
        __syncthreads();
    }

    // 3. penalties (history ids are distinct: each entry is one thread's)
    const bool repetition_on = p.repetition != 1.0f;
    const bool additive_on = p.presence != 0.0f || p.frequency != 0.0f;
    if (repetition_on || additive_on) {
        for (u32 j = h_start + tid; j < h_end; j += SAMPLE_THREADS) {
            const u32 id = history[2 * j];
            const u32 count = history[2 * j + 1];
            if (id >= (u32)n) continue;
            float v = w[id];
            if (repetition_on) v = v > 0.0f ? __fdiv_rn(v, p.repetition) : __fmul_rn(v, p.repetition);
            if (additive_on && count > 0) {
                v = __fsub_rn(v, __fadd_rn(p.presence, __fmul_rn(p.frequency, __uint2float_rn(count))));
            }
            w[id] = v;
        }
    }
    __syncthreads();

    // 4. choose
    float max_v = FERRUM_NEG_INF;
    for (int i = tid; i < n; i += SAMPLE_THREADS) max_v = fmaxf(max_v, w[i]);
    max_v = block_max_f32(max_v, s);

    bool have = false;
    u32 token = 0;
    const bool greedy = p.temperature == 0.0f;
    // Final candidate set for the mask: ranked -> key >= lower (and min-p); id order -> min-p.
    bool ranked = false, min_p_on = false, empty = true;
    u64 lower = 0;
    float min_p_threshold = 0.0f;
    if (greedy) {
        u64 best = 0;
        for (int i = tid; i < n; i += SAMPLE_THREADS) {
            const float v = w[i];
            if (v != FERRUM_NEG_INF) {
                const u64 k = logit_key(v, i);
                best = k > best ? k : best;
            }
        }
        best = block_max_u64(best, s);
        if (best != 0) {
            have = true;
            token = key_id(best);
        }
    } else if (max_v != FERRUM_NEG_INF) {
        empty = false;
        const float temperature = p.temperature;
        for (int i = tid; i < n; i += SAMPLE_THREADS) {
            w[i] = exp_nonpositive(__fdiv_rn(__fsub_rn(w[i], max_v), temperature));
        }
        __syncthreads();
        const bool top_k_on = p.top_k >= 1 && p.top_k < (u32)n;
        const u32 num_items = top_k_on ? p.top_k : (u32)n;
        const bool top_p_on = !isnan(p.top_p) && p.top_p < 1.0f && num_items > 1;
        min_p_on = !isnan(p.min_p) && p.min_p > 0.0f;
        ranked = top_k_on || top_p_on;
        // The largest weight is exp(0 / T) (1 for a valid temperature).
        min_p_threshold = __fmul_rn(p.min_p, exp_nonpositive(__fdiv_rn(0.0f, temperature)));
        if (top_k_on) {
            auto all = [&](int i, u64& key, double& mass) {
                const float wi = w[i];
                key = weight_key(wi, i);
                mass = (double)wi;
                return true;
            };
            u64 cut = 0;
            if (radix_select(all, n, false, 0.0, 0.0, p.top_k, false, &cut, s)) lower = cut;
        }
        if (top_p_on) {
            auto kept = [&](int i, u64& key, double& mass) {
                const float wi = w[i];
                key = weight_key(wi, i);
                mass = (double)wi;
                return key >= lower;
            };
            u64 cut = 0;
            if (radix_select(kept, n, true, (double)p.top_p, 1.0 - TOP_P_REL_TOL, 0u, false, &cut,
                             s)) {
                lower = cut;
            }
        }
        auto final_set = [&](int i, u64& key, double& mass) {
            const float wi = w[i];
            key = weight_key(wi, i);
            mass = (double)wi;
            return key >= lower && (!min_p_on || wi >= min_p_threshold);
        };
        if (ranked) {
            u64 cut = 0;
            if (radix_select(final_set, n, true, p.uniform, 1.0, 0u, true, &cut, s)) {
                // The crossing key is the lowest key >= cut in the set.
                u64 best = ~0ull;
                for (int i = tid; i < n; i += SAMPLE_THREADS) {
                    u64 key;
                    double mass;
                    if (final_set(i, key, mass) && key >= cut && key < best) best = key;
                }
                best = block_min_u64(best, s);
                if (best != ~0ull) {
                    have = true;
                    token = key_id(best);
                }
            }
        } else {
            // Id order: contiguous chunks per thread, scanned in thread order.
            const int chunk = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
            const int begin = min(n, tid * chunk), end = min(n, begin + chunk);
            double local = 0.0;
            for (int i = begin; i < end; ++i) {
                u64 key;
                double mass;
                if (final_set(i, key, mass)) local += mass;
            }
            block_inclusive_scan(0u, local, s);
            const double total = s.scan_mass[SAMPLE_THREADS - 1];
            const double threshold = p.uniform * total;
            const double before = tid > 0 ? s.scan_mass[tid - 1] : 0.0;
            const double after = s.scan_mass[tid];
            if (tid == 0) s.chosen = 0x7fffffff;
            __syncthreads();
            if (total > 0.0 && !(before > threshold) && after > threshold) {
                atomicMin(&s.chosen, tid);
            }
            __syncthreads();
            if (tid == s.chosen) {
                double mass_sum = before;
                int pick = -1, last_positive = -1;
                for (int i = begin; i < end; ++i) {
                    u64 key;
                    double mass;
                    if (!final_set(i, key, mass) || mass == 0.0) continue;
                    last_positive = i;
                    mass_sum += mass;
                    if (mass_sum > threshold) {
                        pick = i;
                        break;
                    }
                }
                if (pick < 0) pick = last_positive;  // rounding only
                s.warp_key[0] = pick < 0 ? ~0ull : (u64)pick;
            }
            __syncthreads();
            if (s.chosen != 0x7fffffff && s.warp_key[0] != ~0ull) {
                have = true;
                token = (u32)s.warp_key[0];
            }
            __syncthreads();
        }
    }

    // 5. fallback: the lowest id that is not suppressed (it is <= the number of suppressed ids)
    if (!have) {
        u64 best = ~0ull;
        const u32 limit = min((u32)n, s_end - s_start + 1u);
        for (u32 c = tid; c < limit; c += SAMPLE_THREADS) {
            bool listed = false;
            for (u32 j = s_start; j < s_end && !listed; ++j) listed = suppressed[j] == c;
            if (!listed && (u64)c < best) best = c;
        }
        best = block_min_u64(best, s);
        token = best == ~0ull ? 0u : (u32)best;
    }

    if (tid == 0) {
        token_ids[row] = token;
        if (want_logprobs) {
            bool listed = false;
            for (u32 j = s_start; j < s_end && !listed; ++j) listed = suppressed[j] == token;
            const float raw_v = listed ? FERRUM_NEG_INF : sanitize(to_f32(raw[token]));
            sampled_logprobs[row] = (raw_v == FERRUM_NEG_INF || lse == NEG_INF_F64)
                                        ? FERRUM_NEG_INF
                                        : (float)((double)raw_v - lse);
        } else if (sampled_logprobs != nullptr) {
            sampled_logprobs[row] = FERRUM_NEG_INF;
        }
    }
    if (candidate_mask != nullptr) {
        u32* mask = candidate_mask + (i64)row * n;
        for (int i = tid; i < n; i += SAMPLE_THREADS) {
            u32 in = 0;
            if (greedy) {
                in = (u32)i == token;
            } else if (!empty) {
                const float wi = w[i];
                const bool min_p_ok = !min_p_on || wi >= min_p_threshold;
                in = ranked ? (weight_key(wi, i) >= lower && min_p_ok) : min_p_ok;
            }
            mask[i] = in;
        }
    }
}

#define SAMPLE(name, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) name(                           \
        const T* logits, float* work, const u32* params, const u32* history, int num_history,    \
        const u32* suppressed, int num_suppressed, int vocab_size, u32* token_ids,               \
        float* sampled_logprobs, u32* top_ids, float* top_logprobs, int max_top,                 \
        u32* candidate_mask) {                                                                   \
        sample_impl<T>(logits, work, params, history, num_history, suppressed, num_suppressed,   \
                       vocab_size, token_ids, sampled_logprobs, top_ids, top_logprobs, max_top,  \
                       candidate_mask);                                                          \
    }
FERRUM_FOR_EACH_DTYPE(SAMPLE, sample)
