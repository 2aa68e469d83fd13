//! The fast attention kernels (`cuda::attention`: flash-attention prefill over the paged cache,
//! split-K decode) against the CPU reference `ops::attention::paged_attention`, on random, ragged
//! and paged shapes (mixed prefill/decode batches, chunked prefill at an offset, GQA, MQA, ALiBi,
//! sliding window, head_dim 36..256, shuffled block tables, block sizes 16 and 32) in f32, bf16
//! and f16; NVRTC compiles both files for sm_80, sm_89 and sm_90 at every head size; launchers
//! reject bad arguments with errors; a micro-benchmark prints achieved TFLOP/s and GB/s.
//!
//! All need an NVIDIA GPU (the compile test only libnvrtc) and are ignored in CPU CI:
//! `ci/gpu.sh` builds them, the GPU machine runs them with `--include-ignored`.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use cuda_common::*;
use half::{bf16, f16};
use triton_ferrum::cuda::attention::{
    self, MAX_SPLITS, PrefillKernel, PrefillSeqs, SplitKKernel, SplitKPlan, SplitKWorkspace,
    splitk_heads_per_cta, splitk_mma_supported, splitk_num_splits, splitk_supported,
};
use triton_ferrum::cuda::kernels::DTYPES;
use triton_ferrum::cuda::ops::{self, BlockTables, DecodeAttention, KvCacheShape, PagedKv};
use triton_ferrum::cuda::{
    CudaError, CudaLibrary, Define, DeviceBuffer, FloatElem, KernelId, SmArch,
};
use triton_ferrum::dtype::DType;
use triton_ferrum::ops::attention::{
    AttnParams, AttnSeq, KvLayerCache, alibi_slopes, paged_attention,
};

// ---------------------------------------------------------------------------------------------
// helpers (the common ones: tests/cuda_common)

/// A paged cache with random contents and one shuffled block table per sequence.
struct Paged {
    shape: KvCacheShape,
    k: Vec<f32>,
    v: Vec<f32>,
    tables: Vec<Vec<u32>>,
    /// [num_seqs, max_blocks] (unused entries -1)
    flat_tables: Vec<i32>,
    max_blocks: usize,
}

fn paged<T: FloatElem>(
    rng: &mut Rng,
    context_lens: &[usize],
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Paged {
    let blocks_per_seq: Vec<usize> = context_lens
        .iter()
        .map(|l| l.div_ceil(block_size))
        .collect();
    let num_blocks = blocks_per_seq.iter().sum::<usize>() + 3;
    let max_blocks = *blocks_per_seq.iter().max().unwrap();
    // Physical blocks handed out in shuffled order: tables are out of order.
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut free);
    let tables: Vec<Vec<u32>> = blocks_per_seq
        .iter()
        .map(|&n| free.drain(..n).collect())
        .collect();
    let mut flat_tables = vec![-1i32; context_lens.len() * max_blocks];
    for (s, t) in tables.iter().enumerate() {
        for (j, &b) in t.iter().enumerate() {
            flat_tables[s * max_blocks + j] = b as i32;
        }
    }
    let shape = KvCacheShape {
        num_blocks,
        block_size,
        num_kv_heads,
        head_dim,
    };
    Paged {
        shape,
        k: round::<T>(&rng.vec(shape.num_elements(), 1.0)),
        v: round::<T>(&rng.vec(shape.num_elements(), 1.0)),
        tables,
        flat_tables,
        max_blocks,
    }
}

struct Case {
    name: &'static str,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    alibi: bool,
    sliding_window: Option<usize>,
    /// (q_len, context_len) per sequence
    seqs: &'static [(usize, usize)],
}

/// The brief's mixed batch: a 1-token decode, a 300-token prefill chunk at offset 0, a 77-token
/// chunk at offset 1000.
const MIXED: &[(usize, usize)] = &[(1, 500), (300, 300), (77, 1077)];

const PREFILL_CASES: &[Case] = &[
    Case {
        name: "mixed gqa4 hd128 bs16",
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        alibi: false,
        sliding_window: None,
        seqs: MIXED,
    },
    Case {
        name: "mixed mqa hd64 bs32",
        num_heads: 8,
        num_kv_heads: 1,
        head_dim: 64,
        block_size: 32,
        alibi: false,
        sliding_window: None,
        seqs: MIXED,
    },
    Case {
        name: "mixed alibi12 hd80 bs16",
        num_heads: 12,
        num_kv_heads: 12,
        head_dim: 80,
        block_size: 16,
        alibi: true,
        sliding_window: None,
        seqs: MIXED,
    },
    Case {
        name: "mixed window100 gqa4 hd96 bs16",
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 96,
        block_size: 16,
        alibi: false,
        sliding_window: Some(100),
        seqs: MIXED,
    },
    Case {
        name: "hd256 gqa2 bs32",
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 256,
        block_size: 32,
        alibi: false,
        sliding_window: None,
        seqs: &[(1, 100), (150, 150), (40, 400), (3, 33)],
    },
    Case {
        // head_dim 40 pads to 48 in the tensor-core kernel; 36 takes the SIMT fallback there.
        name: "hd40 padded, alibi, window 9",
        num_heads: 6,
        num_kv_heads: 3,
        head_dim: 40,
        block_size: 16,
        alibi: true,
        sliding_window: Some(9),
        seqs: &[(17, 17), (5, 60), (1, 2)],
    },
    Case {
        name: "hd36 (no tensor cores) gqa3",
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 36,
        block_size: 16,
        alibi: false,
        sliding_window: None,
        seqs: &[(20, 20), (7, 70)],
    },
];

fn params(c: &Case) -> DecodeAttention {
    DecodeAttention {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        sliding_window: c.sliding_window,
    }
}

/// The CPU reference for `c` on cache `pc`, queries `q` (fused rows of q_stride).
fn reference(c: &Case, pc: &Paged, q: &[f32], q_stride: usize, slopes: &[f32]) -> Vec<f32> {
    let mut q_start = 0;
    let seqs: Vec<AttnSeq<'_>> = c
        .seqs
        .iter()
        .zip(&pc.tables)
        .map(|(&(q_len, context_len), table)| {
            let s = AttnSeq {
                q_start,
                q_len,
                context_len,
                block_table: table,
            };
            q_start += q_len;
            s
        })
        .collect();
    let p = params(c);
    let cpu = AttnParams {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size: c.block_size,
        scale: p.scale,
        sliding_window: c.sliding_window,
        alibi_slopes: c.alibi.then_some(slopes),
    };
    let num_tokens: usize = c.seqs.iter().map(|s| s.0).sum();
    let mut want = vec![0.0f32; num_tokens * c.num_heads * c.head_dim];
    let cache = KvLayerCache::from_f32(pc.k.clone(), pc.v.clone());
    paged_attention(&mut want, q, q_stride, &cache, &seqs, &cpu);
    want
}

// ---------------------------------------------------------------------------------------------
// NVRTC (needs libnvrtc only)

#[test]
#[ignore = "needs libnvrtc (an NVIDIA GPU machine): run ci/gpu.sh"]
fn nvrtc_compiles_attention_kernels_for_every_tested_arch_and_head_size() {
    let nvrtc = triton_ferrum::cuda::probe_library(CudaLibrary::Nvrtc).unwrap();
    eprintln!("nvrtc: {} {}", nvrtc.file, nvrtc.version);
    // (arch, file, defines, the dtypes whose entry points the module must hold). Prefill holds
    // every dtype in one module; split-K is compiled per dtype (`DTYPE`). Head size 12 (the
    // llama_gqa_llama3 fixture): prefill compiles for every dtype (its 16-bit path falls back to
    // SIMT), split-K for f32 only (24-byte bf16/f16 rows, checked below).
    let mut jobs = vec![];
    for arch in SmArch::TESTED {
        for hd in [12usize, 64, 80, 96, 128, 256] {
            jobs.push((
                arch,
                KernelId::AttentionPrefill,
                vec![Define::new("HEAD_DIM", hd)],
                DTYPES.to_vec(),
            ));
            for dt in DTYPES {
                if !splitk_supported(dt, hd) {
                    continue;
                }
                let heads = splitk_heads_per_cta(dt, hd, 4);
                let mut defines =
                    vec![Define::new("HEAD_DIM", hd), Define::new("GQA_HEADS", heads)];
                defines.extend(KernelId::AttentionSplitK.dtype_defines(dt));
                jobs.push((arch, KernelId::AttentionSplitK, defines, vec![dt]));
            }
        }
    }
    assert!(
        jobs.iter()
            .any(|(_, k, d, dts)| *k == KernelId::AttentionSplitK
                && dts == &[DType::F32]
                && d.contains(&Define::new("HEAD_DIM", 12))),
        "split-K f32 at head_dim 12 is compiled"
    );
    // One thread per compile: each runs ptxas over six entry points.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(arch, kernel, defines, _)| {
                s.spawn(move || {
                    let t = std::time::Instant::now();
                    let r = triton_ferrum::cuda::compile(*kernel, *arch, defines);
                    (r, t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((arch, kernel, defines, dtypes), (compiled, elapsed)) in jobs.iter().zip(results) {
        let compiled = compiled.unwrap();
        assert_eq!(&compiled.cubin[..4], b"\x7fELF", "{kernel:?} {arch}");
        // The tensor-core split-K entry exists where the launcher may pick it.
        let mut ops: Vec<&str> = kernel.ops().to_vec();
        let head_dim = defines
            .iter()
            .find(|d| d.name == "HEAD_DIM")
            .map(|d| d.value.parse::<usize>().unwrap());
        let heads = defines
            .iter()
            .find(|d| d.name == "GQA_HEADS")
            .map(|d| d.value.parse::<usize>().unwrap());
        if let (KernelId::AttentionSplitK, Some(hd), Some(h), [dt]) =
            (kernel, head_dim, heads, dtypes.as_slice())
            && splitk_mma_supported(*dt, hd, h)
        {
            ops.push("paged_attention_splitk_mma");
        }
        for op in ops {
            for dt in dtypes {
                let entry = format!("{op}_{dt}\0");
                assert!(
                    compiled
                        .cubin
                        .windows(entry.len())
                        .any(|w| w == entry.as_bytes()),
                    "{} {defines:?} for {arch} lacks {entry}",
                    kernel.file_name()
                );
            }
        }
        println!(
            "NVRTC {} {arch} {:?}: {} bytes in {:.0} ms{}",
            kernel.file_name(),
            defines
                .iter()
                .map(|d| format!("{}={}", d.name, d.value))
                .collect::<Vec<_>>(),
            compiled.cubin.len(),
            elapsed.as_secs_f64() * 1e3,
            if compiled.log.is_empty() {
                String::new()
            } else {
                format!(", log: {}", compiled.log)
            }
        );
    }
    // Split-K's 16-bit modules refuse rows that are not 16-byte multiples (head_dim 12: 24
    // bytes) with a compile error naming the file; the f32 module of the same head size compiled
    // above.
    for dt in [DType::BF16, DType::F16] {
        assert!(!splitk_supported(dt, 12));
        let mut defines = vec![Define::new("HEAD_DIM", 12), Define::new("GQA_HEADS", 1)];
        defines.extend(KernelId::AttentionSplitK.dtype_defines(dt));
        let err = triton_ferrum::cuda::compile(KernelId::AttentionSplitK, SmArch::SM90, &defines)
            .unwrap_err();
        assert!(
            matches!(
                &err,
                CudaError::Compile {
                    file: "attention_splitk.cu",
                    ..
                }
            ),
            "{dt}: {err}"
        );
    }
    // A head_dim over the limit is a compile error naming the file, not a silent overflow.
    let err = triton_ferrum::cuda::compile(
        KernelId::AttentionPrefill,
        SmArch::SM90,
        &[Define::new("HEAD_DIM", 512)],
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            CudaError::Compile {
                file: "attention_prefill.cu",
                ..
            }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// prefill

fn prefill_case<T: FloatElem>() {
    let mut rng = Rng(11);
    for c in PREFILL_CASES {
        let context_lens: Vec<usize> = c.seqs.iter().map(|s| s.1).collect();
        let pc = paged::<T>(
            &mut rng,
            &context_lens,
            c.block_size,
            c.num_kv_heads,
            c.head_dim,
        );
        let num_tokens: usize = c.seqs.iter().map(|s| s.0).sum();
        // q inside fused qkv rows.
        let q_stride = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let q = round::<T>(&rng.vec(num_tokens * q_stride, 2.0));
        let slopes = alibi_slopes(c.num_heads, 8.0);
        let want = reference(c, &pc, &q, q_stride, &slopes);

        let (k_d, v_d, q_d) = (up::<T>(&pc.k), up::<T>(&pc.v), up::<T>(&q));
        let mut q_starts = vec![];
        let mut start = 0i32;
        for s in c.seqs {
            q_starts.push(start);
            start += s.0 as i32;
        }
        let q_lens: Vec<i32> = c.seqs.iter().map(|s| s.0 as i32).collect();
        let ctx: Vec<i32> = c.seqs.iter().map(|s| s.1 as i32).collect();
        let (q_starts_d, q_lens_d, ctx_d) = (
            dev().upload(&q_starts).unwrap(),
            dev().upload(&q_lens).unwrap(),
            dev().upload(&ctx).unwrap(),
        );
        let tables_d = dev().upload(&pc.flat_tables).unwrap();
        let slopes_d = dev().upload(&slopes).unwrap();
        let seqs = PrefillSeqs {
            q_starts: &q_starts_d,
            q_lens: &q_lens_d,
            context_lens: &ctx_d,
            block_tables: &tables_d,
            max_blocks_per_seq: pc.max_blocks,
            max_q_len: c.seqs.iter().map(|s| s.0).max().unwrap(),
        };
        let cache = PagedKv {
            k: &k_d,
            v: &v_d,
            shape: pc.shape,
        };
        for kernel in [PrefillKernel::Fast, PrefillKernel::Simt] {
            let launch = attention::prefill_launch(kernel, T::DTYPE, c.head_dim);
            let mut out_d = poisoned::<T>(num_tokens * c.num_heads * c.head_dim);
            attention::paged_attention_prefill(
                dev(),
                &mut out_d,
                &q_d,
                q_stride,
                &cache,
                &seqs,
                c.alibi.then_some(&slopes_d),
                &params(c),
                kernel,
            )
            .unwrap();
            dev().synchronize().unwrap();
            check::<T>(
                &format!(
                    "paged_attention_prefill {} [{kernel:?}{}]",
                    c.name,
                    if launch.tensor_cores { ", mma" } else { "" }
                ),
                &down(&out_d),
                &want,
            );
        }
        // q rows that do not start on 16-byte boundaries (stride + 4 elements): the tensor-core
        // kernel's element-wise Q load instead of its 16-byte copies.
        let padded_stride = q_stride + 4;
        let mut q_padded = vec![0.0f32; num_tokens * padded_stride];
        for (dst, src) in q_padded.chunks_mut(padded_stride).zip(q.chunks(q_stride)) {
            dst[..q_stride].copy_from_slice(src);
        }
        let q_padded_d = up::<T>(&q_padded);
        let mut out_d = poisoned::<T>(num_tokens * c.num_heads * c.head_dim);
        attention::paged_attention_prefill(
            dev(),
            &mut out_d,
            &q_padded_d,
            padded_stride,
            &cache,
            &seqs,
            c.alibi.then_some(&slopes_d),
            &params(c),
            PrefillKernel::Fast,
        )
        .unwrap();
        dev().synchronize().unwrap();
        check::<T>(
            &format!("paged_attention_prefill {} [Fast, q stride + 4]", c.name),
            &down(&out_d),
            &want,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn paged_attention_prefill_matches_cpu_on_mixed_gqa_mqa_alibi_window_and_paged_shapes() {
    for_each_dtype!(prefill_case);
}

// ---------------------------------------------------------------------------------------------
// split-K decode

const DECODE_CASES: &[Case] = &[
    Case {
        name: "alibi gqa4 hd64 bs16",
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        alibi: true,
        sliding_window: None,
        seqs: &[(1, 3), (1, 300), (1, 1029)],
    },
    Case {
        name: "gqa4 hd128 bs16",
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        alibi: false,
        sliding_window: None,
        seqs: &[(1, 1), (1, 17), (1, 513), (1, 4000), (1, 64)],
    },
    Case {
        name: "mqa12 hd80 bs16",
        num_heads: 12,
        num_kv_heads: 1,
        head_dim: 80,
        block_size: 16,
        alibi: false,
        sliding_window: None,
        seqs: &[(1, 33), (1, 2), (1, 1500)],
    },
    Case {
        name: "alibi12 hd96 bs32",
        num_heads: 12,
        num_kv_heads: 12,
        head_dim: 96,
        block_size: 32,
        alibi: true,
        sliding_window: None,
        seqs: &[(1, 5), (1, 777), (1, 3000)],
    },
    Case {
        name: "window300 gqa2 hd64 bs16",
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        alibi: false,
        sliding_window: Some(300),
        seqs: &[(1, 10), (1, 300), (1, 301), (1, 2500)],
    },
    Case {
        name: "hd256 bs32",
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 256,
        block_size: 32,
        alibi: false,
        sliding_window: None,
        seqs: &[(1, 100), (1, 1), (1, 2049)],
    },
];

/// A head size whose rows are 16-byte multiples in f32 (48 bytes) but not in bf16/f16 (24):
/// llama_gqa_llama3's (6 heads over 2 kv heads, head_dim 12).
const F32_ONLY_DECODE_CASES: &[Case] = &[Case {
    name: "gqa3 hd12 bs16",
    num_heads: 6,
    num_kv_heads: 2,
    head_dim: 12,
    block_size: 16,
    alibi: false,
    sliding_window: None,
    seqs: &[(1, 1), (1, 700), (1, 3000), (1, 40)],
}];

fn splitk_case<T: FloatElem>() {
    splitk_cases::<T>(DECODE_CASES, 12);
}

/// Split-K decode of every case in every plan worth trying, against the CPU reference.
fn splitk_cases<T: FloatElem>(cases: &[Case], seed: u64) {
    let mut rng = Rng(seed);
    for c in cases {
        let context_lens: Vec<usize> = c.seqs.iter().map(|s| s.1).collect();
        let pc = paged::<T>(
            &mut rng,
            &context_lens,
            c.block_size,
            c.num_kv_heads,
            c.head_dim,
        );
        let num_seqs = c.seqs.len();
        let q_stride = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let q = round::<T>(&rng.vec(num_seqs * q_stride, 2.0));
        let slopes = alibi_slopes(c.num_heads, 8.0);
        let want = reference(c, &pc, &q, q_stride, &slopes);

        let (k_d, v_d, q_d) = (up::<T>(&pc.k), up::<T>(&pc.v), up::<T>(&q));
        let lens: Vec<i32> = context_lens.iter().map(|&l| l as i32).collect();
        let lens_d = dev().upload(&lens).unwrap();
        let tables_d = dev().upload(&pc.flat_tables).unwrap();
        let slopes_d = dev().upload(&slopes).unwrap();
        let cache = PagedKv {
            k: &k_d,
            v: &v_d,
            shape: pc.shape,
        };
        let tables = BlockTables {
            block_tables: &tables_d,
            max_blocks_per_seq: pc.max_blocks,
            context_lens: &lens_d,
        };
        let max_ctx = *context_lens.iter().max().unwrap();
        let p = params(c);
        let auto = SplitKPlan::choose(
            dev().info().num_multiprocessors,
            T::DTYPE,
            num_seqs,
            &p,
            max_ctx,
        );
        let group = c.num_heads / c.num_kv_heads;
        let mut ws = SplitKWorkspace::new(dev(), num_seqs, c.num_heads, c.head_dim, 64).unwrap();
        // 1: the direct path; 3 and 64: more splits than some sequences have keys (empty
        // splits); auto: what the executor would pick; and one head per CTA for the GQA cases.
        let mut plans: Vec<SplitKPlan> = [1, 3, 64]
            .iter()
            .map(|&num_splits| SplitKPlan { num_splits, ..auto })
            .collect();
        plans.push(auto);
        if auto.heads_per_cta > 1 {
            plans.push(SplitKPlan {
                num_splits: 5,
                heads_per_cta: 1,
                kernel: SplitKKernel::Simt,
            });
        }
        // The tensor-core kernel where it applies, and the SIMT one at the same plan.
        assert_eq!(
            auto.kernel == SplitKKernel::TensorCore,
            splitk_mma_supported(T::DTYPE, c.head_dim, auto.heads_per_cta)
        );
        if auto.kernel == SplitKKernel::TensorCore {
            plans.push(SplitKPlan {
                kernel: SplitKKernel::Simt,
                ..auto
            });
            plans.push(SplitKPlan {
                num_splits: 7,
                ..auto
            });
        }
        assert_eq!(group % auto.heads_per_cta, 0);
        for plan in plans {
            let mut out_d = poisoned::<T>(num_seqs * c.num_heads * c.head_dim);
            attention::paged_attention_decode_splitk(
                dev(),
                &mut out_d,
                &q_d,
                q_stride,
                &cache,
                &tables,
                c.alibi.then_some(&slopes_d),
                &p,
                plan,
                &mut ws,
            )
            .unwrap();
            dev().synchronize().unwrap();
            check::<T>(
                &format!(
                    "paged_attention_decode_splitk {} splits={} heads/cta={}{}",
                    c.name,
                    plan.num_splits,
                    plan.heads_per_cta,
                    match plan.kernel {
                        SplitKKernel::TensorCore => " mma",
                        SplitKKernel::Simt => "",
                    }
                ),
                &down(&out_d),
                &want,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn paged_attention_decode_splitk_matches_cpu_for_every_split_count() {
    for_each_dtype!(splitk_case);
}

/// attention_splitk.cu is compiled per dtype, so f32 runs split-K at head_dim 12 although the
/// bf16/f16 modules of that head size do not compile (the executor's `use_splitk` relies on it).
#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn paged_attention_decode_splitk_f32_takes_head_dims_the_16_bit_types_cannot() {
    assert!(splitk_supported(DType::F32, 12) && !splitk_supported(DType::BF16, 12));
    splitk_cases::<f32>(F32_ONLY_DECODE_CASES, 13);
}

// ---------------------------------------------------------------------------------------------
// launcher checks

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn attention_launchers_reject_bad_arguments_without_panicking() {
    let d = dev();
    let shape = KvCacheShape {
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 128,
    };
    let k = d.alloc_zeros::<bf16>(shape.num_elements()).unwrap();
    let v = d.alloc_zeros::<bf16>(shape.num_elements()).unwrap();
    let cache = PagedKv {
        k: &k,
        v: &v,
        shape,
    };
    let p = DecodeAttention {
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 128,
        scale: 0.1,
        sliding_window: None,
    };
    let num_seqs = 2;
    let q = d.alloc_zeros::<bf16>(num_seqs * 8 * 128).unwrap();
    let lens = d.upload(&[5i32, 9]).unwrap();
    let tables_d = d.upload(&[0i32, 1, 2, 3]).unwrap();
    let tables = BlockTables {
        block_tables: &tables_d,
        max_blocks_per_seq: 2,
        context_lens: &lens,
    };
    let mut out = d.alloc_zeros::<bf16>(num_seqs * 8 * 128).unwrap();
    let mut small = SplitKWorkspace::new(d, 1, 8, 128, 2).unwrap();
    let plan = |num_splits| SplitKPlan {
        num_splits,
        heads_per_cta: 1,
        kernel: SplitKKernel::Simt,
    };
    // Workspace too small for 2 seqs x 8 heads x 4 splits.
    let err = attention::paged_attention_decode_splitk(
        d,
        &mut out,
        &q,
        1024,
        &cache,
        &tables,
        None,
        &p,
        plan(4),
        &mut small,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                what: "workspace",
                ..
            }
        ),
        "{err}"
    );
    // num_splits 0 and over MAX_SPLITS.
    for n in [0, MAX_SPLITS + 1] {
        let err = attention::paged_attention_decode_splitk(
            d,
            &mut out,
            &q,
            1024,
            &cache,
            &tables,
            None,
            &p,
            plan(n),
            &mut small,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                CudaError::InvalidArgument {
                    what: "num_splits",
                    ..
                }
            ),
            "{err}"
        );
    }
    // q_stride not 16-byte aligned rows.
    let q_odd = d.alloc_zeros::<bf16>(num_seqs * 1025).unwrap();
    let err = attention::paged_attention_decode_splitk(
        d,
        &mut out,
        &q_odd,
        1025,
        &cache,
        &tables,
        None,
        &p,
        plan(1),
        &mut small,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                what: "q_stride",
                ..
            }
        ),
        "{err}"
    );
    // heads_per_cta not dividing the group of 4.
    let err = attention::paged_attention_decode_splitk(
        d,
        &mut out,
        &q,
        1024,
        &cache,
        &tables,
        None,
        &p,
        SplitKPlan {
            num_splits: 1,
            heads_per_cta: 3,
            kernel: SplitKKernel::Simt,
        },
        &mut small,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                what: "heads_per_cta",
                ..
            }
        ),
        "{err}"
    );
    // Heads not divisible by kv heads.
    let bad = DecodeAttention {
        num_kv_heads: 3,
        ..p
    };
    let err = attention::paged_attention_decode_splitk(
        d,
        &mut out,
        &q,
        1024,
        &cache,
        &tables,
        None,
        &bad,
        plan(1),
        &mut small,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                what: "num_kv_heads",
                ..
            }
        ),
        "{err}"
    );

    // Prefill: out not a whole number of token rows; q_lens of the wrong length.
    let q_starts = d.upload(&[0i32, 1]).unwrap();
    let q_lens = d.upload(&[1i32, 1]).unwrap();
    let seqs = PrefillSeqs {
        q_starts: &q_starts,
        q_lens: &q_lens,
        context_lens: &lens,
        block_tables: &tables_d,
        max_blocks_per_seq: 2,
        max_q_len: 1,
    };
    let mut out_bad = d.alloc_zeros::<bf16>(8 * 128 + 3).unwrap();
    let err = attention::paged_attention_prefill(
        d,
        &mut out_bad,
        &q,
        1024,
        &cache,
        &seqs,
        None,
        &p,
        PrefillKernel::Fast,
    )
    .unwrap_err();
    assert!(
        matches!(err, CudaError::LengthMismatch { operand: "out", .. }),
        "{err}"
    );
    let short_lens = d.upload(&[1i32]).unwrap();
    let err = attention::paged_attention_prefill(
        d,
        &mut out,
        &q,
        1024,
        &cache,
        &PrefillSeqs {
            q_lens: &short_lens,
            ..seqs
        },
        None,
        &p,
        PrefillKernel::Fast,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::LengthMismatch {
                operand: "q_lens",
                ..
            }
        ),
        "{err}"
    );
    // Alibi slopes of the wrong length; head_dim over the limit.
    let slopes = d.upload(&[0.5f32; 7]).unwrap();
    let err = attention::paged_attention_prefill(
        d,
        &mut out,
        &q,
        1024,
        &cache,
        &seqs,
        Some(&slopes),
        &p,
        PrefillKernel::Fast,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::LengthMismatch {
                operand: "alibi_slopes",
                ..
            }
        ),
        "{err}"
    );
    let big = DecodeAttention { head_dim: 512, ..p };
    let err = attention::paged_attention_prefill(
        d,
        &mut out,
        &q,
        1024,
        &cache,
        &seqs,
        None,
        &big,
        PrefillKernel::Fast,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                what: "head_dim",
                ..
            }
        ),
        "{err}"
    );
    // A good call still works after all of that: two decode tokens through the prefill kernel.
    attention::paged_attention_prefill(
        d,
        &mut out,
        &q,
        1024,
        &cache,
        &seqs,
        None,
        &p,
        PrefillKernel::Fast,
    )
    .unwrap();
    d.synchronize().unwrap();
}

/// The three paged-attention launchers (decode, split-K decode, prefill) share one argument
/// check (`ops::check_paged_attention`): the same bad head, cache, stride, ALiBi or window
/// argument fails each of them with the same field, the error naming the launcher's own op.
#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn paged_attention_launchers_share_one_argument_check() {
    let d = dev();
    let shape = KvCacheShape {
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 64,
    };
    let k = d.alloc_zeros::<f16>(shape.num_elements()).unwrap();
    let v = d.alloc_zeros::<f16>(shape.num_elements()).unwrap();
    let v_short = d.alloc_zeros::<f16>(shape.num_elements() - 1).unwrap();
    let p = DecodeAttention {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        sliding_window: None,
    };
    let num_seqs = 2;
    let q_stride = 4 * 64;
    let q = d.alloc_zeros::<f16>(num_seqs * q_stride).unwrap();
    let lens = d.upload(&[5i32, 9]).unwrap();
    let tables_d = d.upload(&[0i32, 1, 2, 3]).unwrap();
    let q_starts = d.upload(&[0i32, 1]).unwrap();
    let q_lens = d.upload(&[1i32, 1]).unwrap();
    let slopes7 = d.upload(&[0.5f32; 7]).unwrap();
    let mut out = d.alloc_zeros::<f16>(num_seqs * q_stride).unwrap();
    let mut ws = SplitKWorkspace::new(d, num_seqs, 4, 64, 4).unwrap();
    let tables = BlockTables {
        block_tables: &tables_d,
        max_blocks_per_seq: 2,
        context_lens: &lens,
    };
    let seqs = PrefillSeqs {
        q_starts: &q_starts,
        q_lens: &q_lens,
        context_lens: &lens,
        block_tables: &tables_d,
        max_blocks_per_seq: 2,
        max_q_len: 1,
    };
    let plan = SplitKPlan {
        num_splits: 1,
        heads_per_cta: 1,
        kernel: SplitKKernel::Simt,
    };
    let good = PagedKv {
        k: &k,
        v: &v,
        shape,
    };
    /// One bad call: what is wrong, the arguments, and the field the error must name.
    struct Bad<'a> {
        wrong: &'static str,
        cache: PagedKv<'a, f16>,
        q_stride: usize,
        alibi: Option<&'a DeviceBuffer<f32>>,
        params: DecodeAttention,
        field: &'static str,
    }
    let bad = |wrong, field| Bad {
        wrong,
        cache: good,
        q_stride,
        alibi: None,
        params: p,
        field,
    };
    let cases = [
        Bad {
            params: DecodeAttention {
                num_kv_heads: 3,
                ..p
            },
            ..bad("heads", "num_kv_heads")
        },
        Bad {
            params: DecodeAttention { head_dim: 0, ..p },
            ..bad("head_dim", "head_dim")
        },
        Bad {
            cache: PagedKv {
                shape: KvCacheShape {
                    num_kv_heads: 1,
                    ..shape
                },
                ..good
            },
            ..bad("cache shape", "cache shape")
        },
        Bad {
            cache: PagedKv {
                v: &v_short,
                ..good
            },
            ..bad("v cache length", "v cache")
        },
        Bad {
            q_stride: q_stride - 8,
            ..bad("q_stride", "q_stride")
        },
        Bad {
            alibi: Some(&slopes7),
            ..bad("alibi length", "alibi_slopes")
        },
        Bad {
            params: DecodeAttention {
                sliding_window: Some(0),
                ..p
            },
            ..bad("window 0", "sliding_window")
        },
    ];
    for Bad {
        wrong,
        cache,
        q_stride: stride,
        alibi,
        params,
        field,
    } in cases
    {
        let errs = [
            (
                "paged_attention_decode",
                ops::paged_attention_decode(
                    d, &mut out, &q, stride, &cache, &tables, alibi, &params,
                )
                .unwrap_err(),
            ),
            (
                "paged_attention_decode_splitk",
                attention::paged_attention_decode_splitk(
                    d, &mut out, &q, stride, &cache, &tables, alibi, &params, plan, &mut ws,
                )
                .unwrap_err(),
            ),
            (
                "paged_attention_prefill",
                attention::paged_attention_prefill(
                    d,
                    &mut out,
                    &q,
                    stride,
                    &cache,
                    &seqs,
                    alibi,
                    &params,
                    PrefillKernel::Fast,
                )
                .unwrap_err(),
            ),
        ];
        for (launcher, err) in errs {
            let (op, named) = match &err {
                CudaError::InvalidArgument { op, what, .. } => (*op, *what),
                CudaError::LengthMismatch { op, operand, .. } => (*op, *operand),
                other => panic!("{wrong}: {launcher}: unexpected {other:?}"),
            };
            assert_eq!((op, named), (launcher, field), "{wrong}: {err}");
            let msg = err.to_string();
            assert!(
                msg.contains(launcher) && msg.contains(field),
                "{wrong}: {msg}"
            );
        }
    }
    d.synchronize().unwrap();
}

// ---------------------------------------------------------------------------------------------
// micro-benchmark

/// Median of `iters` timed runs of `f(i)` (device events around each), after 3 warm-ups.
fn time_ms(iters: usize, mut f: impl FnMut(usize)) -> f64 {
    use cudarc::driver::sys::CUevent_flags;
    let stream = dev().stream();
    for i in 0..3 {
        f(i);
    }
    dev().synchronize().unwrap();
    let mut times = vec![];
    for i in 0..iters {
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        f(i);
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        times.push(start.elapsed_ms(&end).unwrap() as f64);
    }
    dev().synchronize().unwrap();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// A bf16 cache of `num_slots` random rows, filled on the device by kv_cache_write from a 4096-row
/// random source (uploading gigabytes from the host would take longer than the benchmark).
fn random_cache(
    rng: &mut Rng,
    num_slots: usize,
    num_kv_heads: usize,
) -> (DeviceBuffer<bf16>, DeviceBuffer<bf16>, KvCacheShape) {
    let head_dim = 128;
    let block_size = 16;
    let shape = KvCacheShape {
        num_blocks: num_slots / block_size,
        block_size,
        num_kv_heads,
        head_dim,
    };
    let kv_dim = shape.kv_dim();
    let mut k = dev().alloc_zeros::<bf16>(shape.num_elements()).unwrap();
    let mut v = dev().alloc_zeros::<bf16>(shape.num_elements()).unwrap();
    let rows = 4096;
    let src = up::<bf16>(&rng.vec(rows * 2 * kv_dim, 1.0));
    let layout = ops::KvSource {
        row_stride: 2 * kv_dim,
        k_offset: 0,
        v_offset: kv_dim,
    };
    let mut slot0 = 0;
    while slot0 < shape.num_slots() {
        let mapping: Vec<i64> = (0..rows as i64).map(|i| slot0 as i64 + i).collect();
        let mapping_d = dev().upload(&mapping).unwrap();
        ops::kv_cache_write(dev(), &mut k, &mut v, &shape, &src, &layout, &mapping_d).unwrap();
        slot0 += rows;
    }
    dev().synchronize().unwrap();
    (k, v, shape)
}

fn emit(json: String, lines: &mut Vec<String>) {
    println!("BENCH {json}");
    lines.push(json);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh (benchmark, prints JSON)"]
fn bench_attention() {
    let d = dev();
    let mut rng = Rng(99);
    let mut lines = vec![];
    let device = d.info().name.clone();
    let num_sms = d.info().num_multiprocessors;
    let head_dim = 128;
    let shapes = [("llama2-7b", 32usize, 32usize), ("llama3-8b", 32, 8)];
    let mut table = vec![];

    // Prefill: causal, all query tokens new (context = q_len), bf16.
    for &(model, num_heads, num_kv_heads) in &shapes {
        for &(num_seqs, q_len) in &[(1usize, 2048usize), (8, 512)] {
            let num_tokens = num_seqs * q_len;
            let (k, v, shape) =
                random_cache(&mut rng, num_tokens.next_multiple_of(4096), num_kv_heads);
            let blocks_per_seq = q_len / shape.block_size;
            let tables: Vec<i32> = (0..(num_seqs * blocks_per_seq) as i32).collect();
            let tables_d = d.upload(&tables).unwrap();
            let q_stride = (num_heads + 2 * num_kv_heads) * head_dim;
            let q = up::<bf16>(&rng.vec(num_tokens * q_stride, 1.0));
            let q_starts: Vec<i32> = (0..num_seqs as i32).map(|s| s * q_len as i32).collect();
            let (q_starts_d, q_lens_d, ctx_d) = (
                d.upload(&q_starts).unwrap(),
                d.upload(&vec![q_len as i32; num_seqs]).unwrap(),
                d.upload(&vec![q_len as i32; num_seqs]).unwrap(),
            );
            let seqs = PrefillSeqs {
                q_starts: &q_starts_d,
                q_lens: &q_lens_d,
                context_lens: &ctx_d,
                block_tables: &tables_d,
                max_blocks_per_seq: blocks_per_seq,
                max_q_len: q_len,
            };
            let p = DecodeAttention {
                num_heads,
                num_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                sliding_window: None,
            };
            let cache = PagedKv {
                k: &k,
                v: &v,
                shape,
            };
            let mut out = d
                .alloc_zeros::<bf16>(num_tokens * num_heads * head_dim)
                .unwrap();
            // Causal work: query i sees i + 1 keys; 2 matmuls of 2 flops per multiply-add.
            let keys_seen = num_seqs * q_len * (q_len + 1) / 2;
            let flops = 4.0 * (keys_seen * num_heads * head_dim) as f64;
            for kernel in [PrefillKernel::Fast, PrefillKernel::Simt] {
                let ms = time_ms(10, |_| {
                    attention::paged_attention_prefill(
                        d, &mut out, &q, q_stride, &cache, &seqs, None, &p, kernel,
                    )
                    .unwrap()
                });
                let tflops = flops / (ms * 1e-3) / 1e12;
                emit(
                    format!(
                        r#"{{"bench":"prefill","device":"{device}","model":"{model}","num_seqs":{num_seqs},"q_len":{q_len},"kernel":"{kernel:?}","dtype":"bf16","ms":{ms:.4},"tflops":{tflops:.2}}}"#
                    ),
                    &mut lines,
                );
                table.push(format!(
                    "prefill {model:10} {num_seqs:>2}x{q_len:<5} {:>5}  {ms:8.3} ms  {tflops:7.1} TFLOP/s",
                    format!("{kernel:?}")
                ));
            }
        }
    }

    // Decode: one query per sequence; KV bytes read = num_seqs * ctx * kv_dim * 2 (K, V) * 2 B.
    // The cache holds 64 x 16384 tokens; timed runs rotate over disjoint block ranges so that
    // small cases are not served from L2 (50 MB).
    for &(model, num_heads, num_kv_heads) in &shapes {
        let max_tokens = 64 * 16384;
        let (k, v, shape) = random_cache(&mut rng, max_tokens, num_kv_heads);
        let cache = PagedKv {
            k: &k,
            v: &v,
            shape,
        };
        let p = DecodeAttention {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
        };
        let mut ws = SplitKWorkspace::new(d, 64, num_heads, head_dim, MAX_SPLITS).unwrap();
        for &num_seqs in &[1usize, 16, 64] {
            for &ctx in &[512usize, 4096, 16384] {
                let blocks_per_seq = ctx / shape.block_size;
                let needed = num_seqs * blocks_per_seq;
                let kv_bytes = (num_seqs * ctx * shape.kv_dim() * 2 * 2) as f64;
                let rotations = (shape.num_blocks / needed).clamp(1, 16);
                let tables: Vec<DeviceBuffer<i32>> = (0..rotations)
                    .map(|r| {
                        let t: Vec<i32> = (0..needed as i32)
                            .map(|b| (r * needed) as i32 + b)
                            .collect();
                        d.upload(&t).unwrap()
                    })
                    .collect();
                let lens = d.upload(&vec![ctx as i32; num_seqs]).unwrap();
                let q_stride = (num_heads + 2 * num_kv_heads) * head_dim;
                let q = up::<bf16>(&rng.vec(num_seqs * q_stride, 1.0));
                let mut out = d
                    .alloc_zeros::<bf16>(num_seqs * num_heads * head_dim)
                    .unwrap();
                let bt = |r: usize| BlockTables {
                    block_tables: &tables[r % rotations],
                    max_blocks_per_seq: blocks_per_seq,
                    context_lens: &lens,
                };
                let auto = SplitKPlan::choose(num_sms, DType::BF16, num_seqs, &p, ctx);
                // The GQA alternative: one head per CTA (fewer registers, more CTAs, K/V rows
                // re-read from L2 by each head of the group).
                let one_head = SplitKPlan {
                    num_splits: splitk_num_splits(num_sms, num_seqs, num_heads, 1, ctx),
                    heads_per_cta: 1,
                    kernel: SplitKKernel::Simt,
                };
                let iters = 20;
                let base_ms = time_ms(iters, |i| {
                    ops::paged_attention_decode(d, &mut out, &q, q_stride, &cache, &bt(i), None, &p)
                        .unwrap()
                });
                let mut runs = vec![("decode", base_ms, 1, 1)];
                let mut plans = vec![auto];
                if auto.kernel == SplitKKernel::TensorCore {
                    // The SIMT kernel at the same plan.
                    plans.push(SplitKPlan {
                        kernel: SplitKKernel::Simt,
                        ..auto
                    });
                }
                if auto.heads_per_cta > 1 {
                    plans.push(one_head);
                }
                for plan in plans {
                    let ms = time_ms(iters, |i| {
                        attention::paged_attention_decode_splitk(
                            d,
                            &mut out,
                            &q,
                            q_stride,
                            &cache,
                            &bt(i),
                            None,
                            &p,
                            plan,
                            &mut ws,
                        )
                        .unwrap()
                    });
                    let kernel = match plan.kernel {
                        SplitKKernel::TensorCore => "splitk_mma",
                        SplitKKernel::Simt => "splitk",
                    };
                    runs.push((kernel, ms, plan.num_splits, plan.heads_per_cta));
                }
                for (kernel, ms, n, h) in runs {
                    let gbs = kv_bytes / (ms * 1e-3) / 1e9;
                    emit(
                        format!(
                            r#"{{"bench":"decode","device":"{device}","model":"{model}","num_seqs":{num_seqs},"context":{ctx},"kernel":"{kernel}","num_splits":{n},"heads_per_cta":{h},"dtype":"bf16","ms":{ms:.4},"kv_gb_per_s":{gbs:.1},"copy_roofline_fraction":{:.3}}}"#,
                            gbs / 3020.0
                        ),
                        &mut lines,
                    );
                    table.push(format!(
                        "decode  {model:10} b{num_seqs:<3} ctx {ctx:<6} {kernel:10} splits {n:<3} heads/cta {h} {ms:8.4} ms  {gbs:7.0} GB/s ({:4.1}% of 3.02 TB/s)",
                        gbs / 30.2
                    ));
                }
            }
        }
    }
    if let Ok(dir) = std::env::var("OUT") {
        std::fs::write(
            format!("{dir}/attention_bench.jsonl"),
            lines.join("\n") + "\n",
        )
        .unwrap();
    }
    println!("\n{}", table.join("\n"));
}
