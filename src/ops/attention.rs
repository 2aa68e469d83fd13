//! Causal attention computed directly over the paged KV cache (no contiguous copy per step).
//!
//! Cache layout of one layer (K and V alike):
//! ```text
//!   [num_blocks, block_size, num_kv_heads, head_dim]
//!   token position p of a sequence lives in block block_table[p / block_size],
//!   at row p % block_size: slot = block_id * block_size + p % block_size
//! ```
//! One call handles a whole mixed batch: each sequence contributes `q_len` query tokens (a prefill
//! chunk or one decode token) whose positions are `context_len - q_len .. context_len`; a query at
//! position p sees keys 0..=p (minus those outside a sliding window).

use multiversion::multiversion;
use rayon::prelude::*;

use crate::ops::fp8::{e4m3_to_f32, f32_to_e4m3};

/// KV cache of one layer on the host: f32, or FP8 E4M3 with one scale for K and one for V
/// (`kv_cache_dtype: fp8`; a quarter of the memory), dequantized as attention reads each row.
pub struct KvLayerCache {
    storage: KvStorage,
}

enum KvStorage {
    /// [num_blocks, block_size, num_kv_heads, head_dim] each.
    F32 { k: Vec<f32>, v: Vec<f32> },
    /// The same layout in E4M3 codes: value = e4m3_to_f32(code) * scale.
    Fp8 {
        k: Vec<u8>,
        v: Vec<u8>,
        k_scale: f32,
        v_scale: f32,
    },
}

impl KvLayerCache {
    /// A zeroed f32 cache of `num_blocks * block_size` slots, each `kv_dim` (= num_kv_heads *
    /// head_dim) elements wide, for K and for V.
    pub fn new(num_blocks: usize, block_size: usize, kv_dim: usize) -> Self {
        let n = num_blocks * block_size * kv_dim;
        KvLayerCache {
            storage: KvStorage::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
        }
    }

    /// An f32 cache holding `k` and `v` as they are (`[num_blocks, block_size, kv_dim]` each,
    /// the same length): for tests that lay the cache out themselves.
    pub fn from_f32(k: Vec<f32>, v: Vec<f32>) -> Self {
        KvLayerCache {
            storage: KvStorage::F32 { k, v },
        }
    }

    /// A zeroed FP8 E4M3 cache of the same shape, K stored as `k / k_scale` and V as
    /// `v / v_scale` (saturating at ±448).
    pub fn new_fp8(
        num_blocks: usize,
        block_size: usize,
        kv_dim: usize,
        k_scale: f32,
        v_scale: f32,
    ) -> Self {
        let n = num_blocks * block_size * kv_dim;
        KvLayerCache {
            storage: KvStorage::Fp8 {
                k: vec![0; n],
                v: vec![0; n],
                k_scale,
                v_scale,
            },
        }
    }

    /// Writes the k/v rows (`[kv_dim]` each) of one token at `slot`.
    pub fn write(&mut self, slot: usize, k: &[f32], v: &[f32]) {
        let kv_dim = k.len();
        let range = slot * kv_dim..(slot + 1) * kv_dim;
        match &mut self.storage {
            KvStorage::F32 { k: kc, v: vc } => {
                kc[range.clone()].copy_from_slice(k);
                vc[range].copy_from_slice(v);
            }
            KvStorage::Fp8 {
                k: kc,
                v: vc,
                k_scale,
                v_scale,
            } => {
                for (c, &x) in kc[range.clone()].iter_mut().zip(k) {
                    *c = f32_to_e4m3(x / *k_scale);
                }
                for (c, &x) in vc[range].iter_mut().zip(v) {
                    *c = f32_to_e4m3(x / *v_scale);
                }
            }
        }
    }

    /// The largest |k| and |v| over the first `slots` slots (an f32 cache; 0 for an FP8 one):
    /// what a calibration pass measures to choose the FP8 scales.
    pub fn amax(&self, slots: usize, kv_dim: usize) -> (f32, f32) {
        match &self.storage {
            KvStorage::F32 { k, v } => {
                let n = (slots * kv_dim).min(k.len());
                let m = |x: &[f32]| x.iter().fold(0.0f32, |a, b| a.max(b.abs()));
                (m(&k[..n]), m(&v[..n]))
            }
            KvStorage::Fp8 { .. } => (0.0, 0.0),
        }
    }

    /// `len` values of K (`key`) or V from element `start`: the cache's own slice for f32, the
    /// dequantized values in `buf` for FP8.
    #[inline(always)]
    fn row<'a>(&'a self, key: bool, start: usize, len: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        match &self.storage {
            KvStorage::F32 { k, v } => &(if key { k } else { v })[start..start + len],
            KvStorage::Fp8 {
                k,
                v,
                k_scale,
                v_scale,
            } => {
                let (codes, scale) = if key { (k, *k_scale) } else { (v, *v_scale) };
                buf.clear();
                buf.extend(
                    codes[start..start + len]
                        .iter()
                        .map(|&c| E4M3_VALUES[c as usize] * scale),
                );
                buf
            }
        }
    }
}

/// The value of every E4M3 code (the attention read's lookup table).
static E4M3_VALUES: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|c| e4m3_to_f32(c as u8)));

/// The queries of one sequence in the batch.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// Index of the sequence's first query token in the batch.
    pub q_start: usize,
    /// Query tokens of the sequence in this step (a prefill chunk's length, or 1 for a decode).
    pub q_len: usize,
    /// Tokens in the cache for this sequence after this step's writes (start_pos + q_len).
    pub context_len: usize,
    /// Physical block ids covering positions 0..context_len.
    pub block_table: &'a [u32],
}

/// Head configuration and options of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams<'a> {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; divides `num_heads` (GQA groups of `num_heads / num_kv_heads` query heads).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Token slots per cache block.
    pub block_size: usize,
    /// Multiplies q·k before the softmax (usually 1/sqrt(head_dim)).
    pub scale: f32,
    /// Attend only to the last `w` positions, the query's own included; None: the whole context.
    pub sliding_window: Option<usize>,
    /// ALiBi: per-head slopes, bias = slope * (key_pos - query_pos).
    pub alibi_slopes: Option<&'a [f32]>,
}

/// out[t, h, :] = softmax(q[t, h] · K[seq(t)]ᵀ * scale + bias) · V[seq(t)]
///
/// q: [num_tokens, q_stride] with head h at `h * head_dim` (q may sit inside a fused qkv row);
/// out: [num_tokens, num_heads * head_dim].
pub fn paged_attention(
    out: &mut [f32],
    q: &[f32],
    q_stride: usize,
    cache: &KvLayerCache,
    seqs: &[AttnSeq<'_>],
    p: &AttnParams<'_>,
) {
    let (num_heads, head_dim) = (p.num_heads, p.head_dim);
    let q_dim = num_heads * head_dim;
    let kv_dim = p.num_kv_heads * head_dim;
    let group = num_heads / p.num_kv_heads;
    // token index in batch -> (sequence index, position)
    let mut token_seq = Vec::with_capacity(out.len() / q_dim);
    for (seq_idx, s) in seqs.iter().enumerate() {
        for i in 0..s.q_len {
            token_seq.push((seq_idx, s.context_len - s.q_len + i));
        }
    }
    // One task per (token, kv head): the `group` query heads sharing a K/V head read each cached
    // row once (SmolLM2: 3 query heads per K/V head).
    out.par_chunks_mut(group * head_dim)
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (idx, o)| {
            let (token_idx, kv_head) = (idx / p.num_kv_heads, idx % p.num_kv_heads);
            let (seq_idx, pos) = token_seq[token_idx];
            let head0 = kv_head * group;
            let heads = Heads {
                q: &q[token_idx * q_stride + head0 * head_dim..][..group * head_dim],
                kv_offset: kv_head * head_dim,
                first: p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                pos,
                slopes: p.alibi_slopes.map(|s| &s[head0..head0 + group]),
            };
            attend_heads(o, &heads, cache, &seqs[seq_idx], kv_dim, p, scratch);
        });
    debug_assert_eq!(token_seq.len() * q_dim, out.len());
}

/// The query heads of one token that share a K/V head.
struct Heads<'a> {
    /// [group, head_dim]
    q: &'a [f32],
    /// Offset of the K/V head within a cache slot (`kv_head * head_dim`).
    kv_offset: usize,
    /// First key position attended (sliding window), and the query's own position.
    first: usize,
    pos: usize,
    /// ALiBi slopes of the heads, [group].
    slopes: Option<&'a [f32]>,
}

/// Per-task buffers of `attend_heads`.
#[derive(Default)]
struct Scratch {
    /// [group, num_keys]
    scores: Vec<f32>,
    /// 1 / Σ exp per head, [group]
    inv_sums: Vec<f32>,
    /// [head_dim]: one dequantized K or V row of an FP8 cache
    row: Vec<f32>,
}

/// o[g, :] = softmax(q[g] · K[first..=pos]ᵀ * scale + bias_g) · V[first..=pos] for each head g of
/// the group; o: [group, head_dim].
///
/// Multiversioned: the baseline x86-64 target has 4-wide SSE only, and this loop is most of a
/// long-context step. Every version computes the same values (same operations per element, no
/// reassociation and no FMA contraction), so the choice does not change outputs; neither does the
/// grouping (each head's operations and their order are those of a head computed alone).
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn attend_heads(
    o: &mut [f32],
    heads: &Heads<'_>,
    cache: &KvLayerCache,
    seq: &AttnSeq<'_>,
    kv_dim: usize,
    p: &AttnParams<'_>,
    scratch: &mut Scratch,
) {
    let head_dim = p.head_dim;
    let group = o.len() / head_dim;
    let num_keys = heads.pos + 1 - heads.first;
    let Scratch {
        scores,
        inv_sums,
        row,
    } = scratch;
    scores.clear();
    scores.resize(group * num_keys, 0.0);
    for (kpos0, slot0, len) in slot_runs(heads.first, heads.pos, seq, p.block_size) {
        for r in 0..len {
            let k = cache.row(true, (slot0 + r) * kv_dim + heads.kv_offset, head_dim, row);
            let key_idx = kpos0 + r - heads.first;
            for (g, q) in heads.q.chunks_exact(head_dim).enumerate() {
                let mut s = dot(q, k) * p.scale;
                let slope = heads.slopes.map_or(0.0, |slopes| slopes[g]);
                if slope != 0.0 {
                    s += slope * ((kpos0 + r) as f32 - heads.pos as f32);
                }
                scores[g * num_keys + key_idx] = s;
            }
        }
    }
    inv_sums.clear();
    for head_scores in scores.chunks_exact_mut(num_keys) {
        let max = head_scores
            .iter()
            .fold(f32::NEG_INFINITY, |acc, &s| acc.max(s));
        let mut sum = 0.0f32;
        for s in head_scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        inv_sums.push(1.0 / sum);
    }
    o.fill(0.0);
    for (kpos0, slot0, len) in slot_runs(heads.first, heads.pos, seq, p.block_size) {
        for r in 0..len {
            let v = cache.row(false, (slot0 + r) * kv_dim + heads.kv_offset, head_dim, row);
            let key_idx = kpos0 + r - heads.first;
            for (g, o) in o.chunks_exact_mut(head_dim).enumerate() {
                let w = scores[g * num_keys + key_idx] * inv_sums[g];
                for (oi, vi) in o.iter_mut().zip(v) {
                    *oi += w * vi;
                }
            }
        }
    }
}

/// The key positions `first..=pos` as runs of consecutive cache slots, one per block:
/// (first position, its slot, run length). Saves a division per key in the loops above.
fn slot_runs<'a>(
    first: usize,
    pos: usize,
    seq: &'a AttnSeq<'_>,
    block_size: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let end = pos + 1;
    let first_block = first / block_size;
    (first_block..end.div_ceil(block_size)).map(move |block_idx| {
        let start = (block_idx * block_size).max(first);
        let stop = ((block_idx + 1) * block_size).min(end);
        let slot = seq.block_table[block_idx] as usize * block_size + start % block_size;
        (start, slot, stop - start)
    })
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorize without reassociation flags
    // (iterators, not indices: bounds checks kept the indexed loop scalar).
    let mut acc = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((acc, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (&x, &y) in a_tail.iter().zip(b_tail) {
        s += x * y;
    }
    s
}

/// ALiBi slopes for `num_heads` heads (BLOOM's construction; `max_bias` 8 gives BLOOM's values):
/// the closest power of two `c <= n` gets slopes `2^(-max_bias * i / c)`, i = 1..=c, and the
/// remaining heads take every other slope of the `2c` series. MPT's construction (the `2c` series,
/// even i first, then odd i) and llama.cpp's (`m0^(h+1)`, then `m1^(2(h-c)+1)`) give the same
/// values in the same order (tested).
pub fn alibi_slopes(num_heads: usize, max_bias: f32) -> Vec<f32> {
    let c = if num_heads == 0 {
        0
    } else {
        1usize << num_heads.ilog2()
    };
    let series = |n: usize| (1..=n).map(move |i| 2f32.powf(-max_bias * i as f32 / n as f32));
    let mut slopes: Vec<f32> = series(c).collect();
    slopes.extend(series(2 * c).step_by(2).take(num_heads - c));
    slopes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense reference: contiguous k/v per sequence.
    fn reference(
        q: &[f32],
        ks: &[Vec<f32>],
        vs: &[Vec<f32>],
        pos: usize,
        p: &AttnParams<'_>,
        h: usize,
    ) -> Vec<f32> {
        let hd = p.head_dim;
        let kvh = h / (p.num_heads / p.num_kv_heads);
        let first = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut scores: Vec<f64> = (first..=pos)
            .map(|j| {
                let k = &ks[j][kvh * hd..][..hd];
                let s: f64 = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * p.scale as f64;
                s + p
                    .alibi_slopes
                    .map_or(0.0, |sl| sl[h] as f64 * (j as f64 - pos as f64))
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores
            .iter_mut()
            .map(|s| {
                *s = (*s - m).exp();
                *s
            })
            .sum();
        let mut out = vec![0.0f64; hd];
        for (w, j) in scores.iter().zip(first..=pos) {
            for d in 0..hd {
                out[d] += w / sum * vs[j][kvh * hd + d] as f64;
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    /// The batch of `(context_len, q_len, block_table)` sequences, queries packed in order.
    fn attn_seqs(specs: &[(usize, usize, Vec<u32>)]) -> Vec<AttnSeq<'_>> {
        let mut q_start = 0;
        specs
            .iter()
            .map(|(ctx, q_len, table)| {
                let s = AttnSeq {
                    q_start,
                    q_len: *q_len,
                    context_len: *ctx,
                    block_table: table,
                };
                q_start += q_len;
                s
            })
            .collect()
    }

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn paged_matches_dense_reference_on_ragged_batch() {
        let mut rng = 7u64;
        let block_size = 4;
        let (num_heads, num_kv_heads, head_dim) = (6, 2, 5);
        let kv_dim = num_kv_heads * head_dim;
        let num_blocks = 32;
        let mut cache = KvLayerCache::new(num_blocks, block_size, kv_dim);
        // three sequences: a decode with 9 cached tokens, a prefill chunk of 3 after 5 cached,
        // and a fresh prefill of 6; blocks deliberately scattered.
        let specs = [
            (9usize, 1usize, vec![7u32, 3, 30]),
            (8, 3, vec![1, 12]),
            (6, 6, vec![20, 5]),
        ];
        let slopes = alibi_slopes(num_heads, 8.0);
        for (window, alibi) in [(None, None), (Some(3), None), (None, Some(&slopes[..]))] {
            let p = AttnParams {
                num_heads,
                num_kv_heads,
                head_dim,
                block_size,
                scale: 0.4,
                sliding_window: window,
                alibi_slopes: alibi,
            };
            let mut dense_k = vec![];
            let mut dense_v = vec![];
            for (ctx, _, table) in &specs {
                let ks: Vec<Vec<f32>> = (0..*ctx)
                    .map(|_| (0..kv_dim).map(|_| lcg(&mut rng)).collect())
                    .collect();
                let vs: Vec<Vec<f32>> = (0..*ctx)
                    .map(|_| (0..kv_dim).map(|_| lcg(&mut rng)).collect())
                    .collect();
                for pos in 0..*ctx {
                    let slot = table[pos / block_size] as usize * block_size + pos % block_size;
                    cache.write(slot, &ks[pos], &vs[pos]);
                }
                dense_k.push(ks);
                dense_v.push(vs);
            }
            let num_tokens: usize = specs.iter().map(|s| s.1).sum();
            let q_dim = num_heads * head_dim;
            let q: Vec<f32> = (0..num_tokens * q_dim).map(|_| lcg(&mut rng)).collect();
            let seqs = attn_seqs(&specs);
            let mut out = vec![0.0; num_tokens * q_dim];
            paged_attention(&mut out, &q, q_dim, &cache, &seqs, &p);
            for (s_idx, s) in seqs.iter().enumerate() {
                for i in 0..s.q_len {
                    let t = s.q_start + i;
                    let pos = s.context_len - s.q_len + i;
                    for h in 0..num_heads {
                        let want = reference(
                            &q[t * q_dim + h * head_dim..][..head_dim],
                            &dense_k[s_idx],
                            &dense_v[s_idx],
                            pos,
                            &p,
                            h,
                        );
                        let got = &out[t * q_dim + h * head_dim..][..head_dim];
                        for d in 0..head_dim {
                            assert!(
                                (want[d] - got[d]).abs() < 1e-5,
                                "seq {s_idx} tok {i} head {h}: {want:?} vs {got:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// An FP8 cache gives exactly what an f32 cache holding its dequantized values gives (the
    /// rows are decoded to the same f32 values before the same arithmetic), on a ragged, paged
    /// batch; values past 448 * scale saturate.
    #[test]
    fn fp8_cache_equals_the_f32_cache_of_its_dequantized_values() {
        use crate::ops::fp8::{e4m3_to_f32, f32_to_e4m3};
        let mut rng = 11u64;
        let (block_size, num_heads, num_kv_heads, head_dim) = (4, 4, 2, 8);
        let kv_dim = num_kv_heads * head_dim;
        let (k_scale, v_scale) = (0.004, 0.0025);
        let mut fp8 = KvLayerCache::new_fp8(16, block_size, kv_dim, k_scale, v_scale);
        let mut f32c = KvLayerCache::new(16, block_size, kv_dim);
        let specs = [(7usize, 1usize, vec![9u32, 2]), (5, 5, vec![4, 13])];
        for (ctx, _, table) in &specs {
            for pos in 0..*ctx {
                let slot = table[pos / block_size] as usize * block_size + pos % block_size;
                let k: Vec<f32> = (0..kv_dim).map(|_| 2.0 * lcg(&mut rng)).collect();
                let mut v: Vec<f32> = (0..kv_dim).map(|_| lcg(&mut rng)).collect();
                v[0] = 50.0; // past 448 * v_scale = 1.12: saturates
                fp8.write(slot, &k, &v);
                let deq = |x: &[f32], s: f32| -> Vec<f32> {
                    x.iter()
                        .map(|&x| e4m3_to_f32(f32_to_e4m3(x / s)) * s)
                        .collect()
                };
                assert_eq!(deq(&v, v_scale)[0], 448.0 * v_scale);
                f32c.write(slot, &deq(&k, k_scale), &deq(&v, v_scale));
            }
        }
        let seqs = attn_seqs(&specs);
        let q_start: usize = specs.iter().map(|s| s.1).sum();
        let q_dim = num_heads * head_dim;
        let q: Vec<f32> = (0..q_start * q_dim).map(|_| lcg(&mut rng)).collect();
        let p = AttnParams {
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale: 0.35,
            sliding_window: None,
            alibi_slopes: None,
        };
        let (mut a, mut b) = (vec![0.0; q_start * q_dim], vec![0.0; q_start * q_dim]);
        paged_attention(&mut a, &q, q_dim, &fp8, &seqs, &p);
        paged_attention(&mut b, &q, q_dim, &f32c, &seqs, &p);
        assert_eq!(a, b);
        assert_eq!(fp8.amax(64, kv_dim), (0.0, 0.0));
        assert!(f32c.amax(64, kv_dim).1 == 448.0 * v_scale);
    }

    #[test]
    fn alibi_slopes_match_bloom_values() {
        // 8 heads: 2^-1 .. 2^-8
        let s8 = alibi_slopes(8, 8.0);
        for (i, s) in s8.iter().enumerate() {
            assert!((s - 2f32.powi(-(i as i32 + 1))).abs() < 1e-7);
        }
        // 12 heads: the 8 above, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
        let s12 = alibi_slopes(12, 8.0);
        assert_eq!(&s12[..8], &s8[..]);
        for (j, s) in s12[8..].iter().enumerate() {
            assert!((s - 2f32.powf(-(0.5 + j as f32))).abs() < 1e-6, "{s12:?}");
        }
    }

    /// MPT's `build_mpt_alibi_tensor` construction, written out: the series 2^(-max * i / p) for
    /// the next power of two p >= n, reordered [1::2] + [::2] when p != n, cut to n.
    fn mpt_slopes(num_heads: usize, max_bias: f32) -> Vec<f32> {
        let p = num_heads.next_power_of_two();
        let series: Vec<f32> = (1..=p)
            .map(|i| 2f32.powf(-max_bias * i as f32 / p as f32))
            .collect();
        if p == num_heads {
            return series;
        }
        let evens = series.iter().skip(1).step_by(2);
        let odds = series.iter().step_by(2);
        evens.chain(odds).take(num_heads).copied().collect()
    }

    /// llama.cpp's construction (`ggml_soft_max` with max_bias): m0 = 2^(-max/c), m1 =
    /// 2^(-max/2/c), head h < c gets m0^(h+1), else m1^(2(h-c)+1).
    fn llama_cpp_slopes(num_heads: usize, max_bias: f32) -> Vec<f32> {
        let c = 1usize << num_heads.ilog2();
        let m0 = 2f32.powf(-max_bias / c as f32);
        let m1 = 2f32.powf(-max_bias / 2.0 / c as f32);
        (0..num_heads)
            .map(|h| {
                if h < c {
                    m0.powi(h as i32 + 1)
                } else {
                    m1.powi(2 * (h - c) as i32 + 1)
                }
            })
            .collect()
    }

    #[test]
    fn bloom_mpt_and_llama_cpp_slopes_agree() {
        for num_heads in [1, 4, 6, 12, 16, 20, 71, 96] {
            for max_bias in [8.0f32, 6.0, 4.0] {
                let ours = alibi_slopes(num_heads, max_bias);
                for (name, other) in [
                    ("mpt", mpt_slopes(num_heads, max_bias)),
                    ("llama.cpp", llama_cpp_slopes(num_heads, max_bias)),
                ] {
                    assert_eq!(ours.len(), other.len());
                    for (a, b) in ours.iter().zip(&other) {
                        assert!(
                            (a - b).abs() <= 1e-5 * a.abs(),
                            "{name} n={num_heads} max={max_bias}: {ours:?} vs {other:?}"
                        );
                    }
                }
            }
        }
    }
}
