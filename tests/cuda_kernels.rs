//! Every CUDA kernel against its CPU reference (`triton_ferrum::ops`, or a plain loop where ops
//! has none) on random, ragged and paged shapes, in f32, bf16 and f16, with dtype-aware
//! tolerances; NVRTC compiles every kernel file for sm_80, sm_89 and sm_90; launchers reject bad
//! shapes with errors. These need an NVIDIA GPU (or libnvrtc for the compile test) and are
//! ignored in CPU CI: `ci/gpu.sh` builds them and runs them on the GPU machine with `--ignored`.
//!
//! The one test that runs everywhere checks the CPU-only case: without a driver, `probe()` and
//! `CudaDevice::open` return an error naming libcuda instead of panicking.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use cuda_common::*;
use half::{bf16, f16};
use triton_ferrum::cuda::kernels::DTYPES;
use triton_ferrum::cuda::ops::{
    self, BlockTables, DecodeAttention, KvCacheShape, KvSource, LearnedPositions, PagedKv,
    RotaryLayout,
};
use triton_ferrum::cuda::{
    CudaDevice, CudaError, CudaLibrary, Define, FloatElem, KernelId, SmArch,
};
use triton_ferrum::model::spec::{Activation, Norm, RopeStyle};
use triton_ferrum::ops::attention::{
    AttnParams, AttnSeq, KvLayerCache, alibi_slopes, paged_attention,
};
use triton_ferrum::ops::rope::RopeTable;

// ---------------------------------------------------------------------------------------------
// CPU-only behaviour (runs in CI)

/// On a machine without the NVIDIA driver, probing and opening a device fail with an error
/// naming libcuda, and nothing panics. On a machine with one, both succeed.
#[test]
fn probe_names_libcuda_when_no_driver() {
    let has_driver = std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidiactl").exists();
    let probed = std::panic::catch_unwind(triton_ferrum::cuda::probe).expect("probe panicked");
    let opened = std::panic::catch_unwind(|| CudaDevice::open(0).map(|_| ()))
        .expect("CudaDevice::open panicked");
    if has_driver {
        let libs = probed.unwrap();
        assert!(libs.driver.file.starts_with("libcuda"), "{libs:?}");
        opened.unwrap();
    } else {
        for err in [probed.unwrap_err(), opened.unwrap_err()] {
            assert!(
                matches!(
                    err,
                    CudaError::LibraryNotFound {
                        library: CudaLibrary::Driver,
                        ..
                    }
                ),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("libcuda"), "{msg}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NVRTC (needs libnvrtc only)

#[test]
#[ignore = "needs libnvrtc (an NVIDIA GPU machine): run ci/gpu.sh"]
fn nvrtc_compiles_every_kernel_for_every_tested_arch() {
    let nvrtc = triton_ferrum::cuda::probe_library(CudaLibrary::Nvrtc).unwrap();
    eprintln!("nvrtc: {} {}", nvrtc.file, nvrtc.version);
    for arch in SmArch::TESTED {
        for kernel in KernelId::ALL {
            // One module, or one per dtype (`DTYPE`) for a per-dtype file: together they hold
            // every entry point.
            for module in kernel.dtype_modules() {
                let t = std::time::Instant::now();
                let compiled = triton_ferrum::cuda::compile(kernel, arch, &module.defines).unwrap();
                assert_eq!(&compiled.cubin[..4], b"\x7fELF", "{kernel:?} {arch}");
                for op in kernel.ops() {
                    for dt in DTYPES {
                        // NUL-terminated: `op_f16` must not match inside `op_f16x` or a longer
                        // name; a per-dtype module holds its own dtype only.
                        let entry = format!("{op}_{dt}\0");
                        let present = compiled
                            .cubin
                            .windows(entry.len())
                            .any(|w| w == entry.as_bytes());
                        assert_eq!(
                            present,
                            module.dtypes.contains(&dt),
                            "{} {:?} for {arch}: {op}_{dt} present = {present}",
                            kernel.file_name(),
                            module.defines
                        );
                    }
                }
                println!(
                    "NVRTC {} {arch} {:?}: {} bytes in {:.0} ms{}",
                    kernel.file_name(),
                    module
                        .defines
                        .iter()
                        .map(|d| format!("{}={}", d.name, d.value))
                        .collect::<Vec<_>>(),
                    compiled.cubin.len(),
                    t.elapsed().as_secs_f64() * 1e3,
                    if compiled.log.is_empty() {
                        String::new()
                    } else {
                        format!(", log: {}", compiled.log)
                    }
                );
            }
        }
    }
    // A per-dtype file without its DTYPE (or with an unknown one) is a compile error naming it.
    for defines in [vec![], vec![Define::new("DTYPE", "f64")]] {
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
            "{defines:?}: {err}"
        );
    }
    // Defines reach the source, and a compile error names the file and carries NVRTC's log.
    let err = triton_ferrum::cuda::compile(
        KernelId::Norm,
        SmArch::SM90,
        &[Define::new("rms_norm_impl", "(")],
    )
    .unwrap_err();
    match &err {
        CudaError::Compile { file, log, .. } => {
            assert_eq!(*file, "norm.cu");
            assert!(!log.is_empty());
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    // Informational: does this NVRTC ship cuda_bf16.h as a builtin header? (The kernels do not
    // need it; see kernels/prelude.cuh.)
    let builtin = cudarc::nvrtc::compile_ptx_with_opts(
        "#include <cuda_bf16.h>\nextern \"C\" __global__ void k(__nv_bfloat16* x) { x[0] = __float2bfloat16(1.0f); }",
        cudarc::nvrtc::CompileOptions {
            arch: Some("sm_90"),
            ..Default::default()
        },
    );
    match builtin {
        Ok(_) => println!("NVRTC builtin cuda_bf16.h: available"),
        Err(e) => println!("NVRTC builtin cuda_bf16.h: not available ({e})"),
    }
}

// ---------------------------------------------------------------------------------------------
// embedding

fn embedding_case<T: FloatElem>() {
    let mut rng = Rng(1);
    for &(vocab, hidden, num_tokens) in &[(1000usize, 96usize, 37usize), (517, 80, 5)] {
        let table = round::<T>(&rng.vec(vocab * hidden, 1.0));
        let max_pos = 64;
        let pos_table = round::<T>(&rng.vec(max_pos * hidden, 0.5));
        let mut ids: Vec<u32> = (0..num_tokens).map(|_| rng.below(vocab) as u32).collect();
        ids[num_tokens / 2] = vocab as u32 + 3; // out of range: zero row
        let positions: Vec<u32> = (0..num_tokens).map(|_| rng.below(max_pos) as u32).collect();
        let (table_d, pos_d) = (up::<T>(&table), up::<T>(&pos_table));
        let ids_d = dev().upload(&ids).unwrap();
        let positions_d = dev().upload(&positions).unwrap();
        for learned in [false, true] {
            let mut out = dev().alloc_zeros::<T>(num_tokens * hidden).unwrap();
            let lp = learned.then_some(LearnedPositions {
                table: &pos_d,
                positions: &positions_d,
            });
            ops::embedding(dev(), &mut out, &table_d, &ids_d, lp, hidden).unwrap();
            let mut want = vec![0.0f32; num_tokens * hidden];
            for (t, &id) in ids.iter().enumerate() {
                for i in 0..hidden {
                    let mut v = if (id as usize) < vocab {
                        table[id as usize * hidden + i]
                    } else {
                        0.0
                    };
                    if learned {
                        v += pos_table[positions[t] as usize * hidden + i];
                    }
                    want[t * hidden + i] = v;
                }
            }
            check_nan_propagating::<T>(
                &format!("embedding v{vocab} h{hidden} learned={learned}"),
                &down(&out),
                &want,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn embedding_gathers_rows_and_adds_learned_positions() {
    for_each_dtype!(embedding_case);
}

// ---------------------------------------------------------------------------------------------
// norms

fn norm_case<T: FloatElem>() {
    let mut rng = Rng(2);
    let norms = [
        (Norm::Rms { eps: 1e-6 }, false),
        (
            Norm::Layer {
                eps: 1e-5,
                bias: true,
            },
            true,
        ),
        (
            Norm::Layer {
                eps: 1e-5,
                bias: false,
            },
            false,
        ),
    ];
    // 102 is not a whole number of 16-byte vectors (RMSNorm's vector path) in any dtype.
    for &(num_rows, dim) in &[(7usize, 80usize), (3, 96), (5, 4096), (2, 5120), (3, 102)] {
        // Offset mean, as hidden states have, so LayerNorm's two passes matter.
        let x: Vec<f32> = round::<T>(
            &rng.vec(num_rows * dim, 2.0)
                .iter()
                .map(|v| v + 0.7)
                .collect::<Vec<_>>(),
        );
        let residual = round::<T>(&rng.vec(num_rows * dim, 3.0));
        let weight = round::<T>(&rng.vec(dim, 1.0));
        let bias = round::<T>(&rng.vec(dim, 0.5));
        let (x_d, w_d, b_d) = (up::<T>(&x), up::<T>(&weight), up::<T>(&bias));
        for &(norm, with_bias) in &norms {
            for fused in [false, true] {
                let mut out = dev().alloc_zeros::<T>(num_rows * dim).unwrap();
                let mut res_d = up::<T>(&residual);
                ops::norm(
                    dev(),
                    norm,
                    &mut out,
                    &x_d,
                    fused.then_some(&mut res_d),
                    &w_d,
                    with_bias.then_some(&b_d),
                )
                .unwrap();
                // residual += x, stored in T; the norm reads the stored values.
                let src = if fused {
                    let summed: Vec<f32> = x.iter().zip(&residual).map(|(a, b)| a + b).collect();
                    round::<T>(&summed)
                } else {
                    x.clone()
                };
                let mut want = vec![0.0f32; num_rows * dim];
                triton_ferrum::ops::norm::norm_rows(
                    norm,
                    &src,
                    &weight,
                    with_bias.then_some(&bias[..]),
                    &mut want,
                );
                let name = format!("norm {norm:?} fused={fused} rows{num_rows} dim{dim}");
                check_nan_propagating::<T>(&name, &down(&out), &want);
                let res_after = down(&res_d);
                if fused {
                    assert_eq!(res_after, src, "{name}: residual");
                } else {
                    assert_eq!(res_after, residual, "{name}: residual untouched");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn rms_and_layer_norm_with_and_without_residual_match_cpu() {
    for_each_dtype!(norm_case);
}

// ---------------------------------------------------------------------------------------------
// rotary

fn rotary_case<T: FloatElem>() {
    let mut rng = Rng(3);
    // (num_q_heads, num_kv_heads, head_dim, rotary_dim)
    let shapes = [
        (8usize, 2usize, 128usize, 128usize),
        (6, 6, 80, 32),
        (4, 1, 96, 96),
        (4, 4, 256, 64),
    ];
    for &(nq, nkv, hd, rd) in &shapes {
        for style in [RopeStyle::NeoX, RopeStyle::GptJ] {
            let num_tokens = 9;
            let row_stride = (nq + 2 * nkv) * hd;
            let k_offset = nq * hd;
            let qkv = round::<T>(&rng.vec(num_tokens * row_stride, 1.0));
            let positions: Vec<u32> = (0..num_tokens).map(|_| rng.below(8192) as u32).collect();
            // llama3-style scaled frequencies are just another table: scale some pairs down.
            let inv_freq: Vec<f32> = (0..rd / 2)
                .map(|i| {
                    let f = 500000f32.powf(-(2.0 * i as f32) / rd as f32);
                    if i > rd / 4 { f / 8.0 } else { f }
                })
                .collect();
            let mut qkv_d = up::<T>(&qkv);
            let layout = RotaryLayout {
                row_stride,
                num_q_heads: nq,
                num_kv_heads: nkv,
                k_offset,
                head_dim: hd,
                rotary_dim: rd,
                style,
            };
            ops::rotary(
                dev(),
                &mut qkv_d,
                &dev().upload(&positions).unwrap(),
                &dev().upload(&inv_freq).unwrap(),
                &layout,
            )
            .unwrap();
            let pos_usize: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
            let table = RopeTable::new(&inv_freq, &pos_usize);
            let mut want = qkv.clone();
            table.apply(&mut want, row_stride, nq, hd, style);
            table.apply(&mut want[k_offset..], row_stride, nkv, hd, style);
            check_nan_propagating::<T>(
                &format!("rotary {style:?} q{nq} kv{nkv} hd{hd} rd{rd}"),
                &down(&qkv_d),
                &want,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn rotary_neox_and_gptj_partial_on_fused_qkv_match_cpu() {
    for_each_dtype!(rotary_case);
}

// ---------------------------------------------------------------------------------------------
// activations

fn activation_case<T: FloatElem>() {
    use triton_ferrum::ops::activation;
    let mut rng = Rng(4);
    // 1376 is a whole number of 16-byte vectors in every dtype (the vector path); 1373 is not.
    for (num_tokens, inter) in [(7usize, 1376usize), (5, 1373)] {
        let gate_up = round::<T>(&rng.vec(num_tokens * 2 * inter, 6.0));
        let gate_up_d = up::<T>(&gate_up);
        for act in [
            Activation::Silu,
            Activation::GeluTanh,
            Activation::Gelu,
            Activation::Relu,
        ] {
            let mut out = dev().alloc_zeros::<T>(num_tokens * inter).unwrap();
            ops::gated_activation(dev(), act, &mut out, &gate_up_d, inter).unwrap();
            let mut want = vec![0.0f32; num_tokens * inter];
            activation::gated(act, &gate_up, inter, &mut want);
            check_nan_propagating::<T>(&format!("gated {act:?} inter {inter}"), &down(&out), &want);

            let mut x_d = up::<T>(&gate_up);
            ops::activation_in_place(dev(), act, &mut x_d).unwrap();
            let mut want = gate_up.clone();
            activation::in_place(act, &mut want);
            check_nan_propagating::<T>(&format!("act {act:?}"), &down(&x_d), &want);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn gated_and_plain_activations_match_cpu() {
    for_each_dtype!(activation_case);
}

// ---------------------------------------------------------------------------------------------
// KV-cache write

fn kv_write_case<T: FloatElem>() {
    let mut rng = Rng(5);
    let shape = KvCacheShape {
        num_blocks: 16,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 80,
    };
    let (nq, kv_dim) = (8usize, shape.kv_dim());
    let row_stride = nq * shape.head_dim + 2 * kv_dim;
    let layout = KvSource {
        row_stride,
        k_offset: nq * shape.head_dim,
        v_offset: nq * shape.head_dim + kv_dim,
    };
    let num_tokens = 29;
    let src = round::<T>(&rng.vec(num_tokens * row_stride, 1.0));
    let mut slots: Vec<i64> = (0..shape.num_slots() as i64).collect();
    rng.shuffle(&mut slots);
    slots.truncate(num_tokens);
    slots[3] = -1; // padding token
    slots[11] = shape.num_slots() as i64 + 5; // past the cache: skipped
    let initial_k = round::<T>(&rng.vec(shape.num_elements(), 1.0));
    let initial_v = round::<T>(&rng.vec(shape.num_elements(), 1.0));
    let (mut k_d, mut v_d) = (up::<T>(&initial_k), up::<T>(&initial_v));
    ops::kv_cache_write(
        dev(),
        &mut k_d,
        &mut v_d,
        &shape,
        &up::<T>(&src),
        &layout,
        &dev().upload(&slots).unwrap(),
    )
    .unwrap();
    let (mut want_k, mut want_v) = (initial_k, initial_v);
    for (t, &slot) in slots.iter().enumerate() {
        if slot < 0 || slot as usize >= shape.num_slots() {
            continue;
        }
        let s = slot as usize;
        let row = &src[t * row_stride..];
        want_k[s * kv_dim..(s + 1) * kv_dim]
            .copy_from_slice(&row[layout.k_offset..layout.k_offset + kv_dim]);
        want_v[s * kv_dim..(s + 1) * kv_dim]
            .copy_from_slice(&row[layout.v_offset..layout.v_offset + kv_dim]);
    }
    assert_eq!(down(&k_d), want_k, "k cache [{}]", T::DTYPE);
    assert_eq!(down(&v_d), want_v, "v cache [{}]", T::DTYPE);
    println!("CHECK kv_cache_write [{}]: exact", T::DTYPE);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn kv_cache_write_by_slot_mapping_skips_padding_and_bad_slots() {
    for_each_dtype!(kv_write_case);
}

fn rotary_kv_write_case<T: FloatElem>() {
    let mut rng = Rng(15);
    for (nkv, hd, rd, style) in [
        (2usize, 80usize, 32usize, RopeStyle::NeoX),
        (2, 80, 80, RopeStyle::GptJ),
        (8, 128, 128, RopeStyle::NeoX),
    ] {
        let shape = KvCacheShape {
            num_blocks: 12,
            block_size: 16,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let (nq, kv_dim) = (8usize, shape.kv_dim());
        let row_stride = nq * hd + 2 * kv_dim;
        let kv = KvSource {
            row_stride,
            k_offset: nq * hd,
            v_offset: nq * hd + kv_dim,
        };
        let rot = RotaryLayout {
            row_stride,
            num_q_heads: nq,
            num_kv_heads: nkv,
            k_offset: nq * hd,
            head_dim: hd,
            rotary_dim: rd,
            style,
        };
        let num_tokens = 23;
        let qkv = round::<T>(&rng.vec(num_tokens * row_stride, 1.0));
        let positions: Vec<u32> = (0..num_tokens).map(|_| rng.below(4096) as u32).collect();
        let inv_freq: Vec<f32> = (0..rd / 2)
            .map(|i| 10000f32.powf(-(2.0 * i as f32) / rd as f32))
            .collect();
        let mut slots: Vec<i64> = (0..shape.num_slots() as i64).collect();
        rng.shuffle(&mut slots);
        slots.truncate(num_tokens);
        slots[4] = -1; // padding token: rotates, writes no cache row
        let initial_k = round::<T>(&rng.vec(shape.num_elements(), 1.0));
        let initial_v = round::<T>(&rng.vec(shape.num_elements(), 1.0));
        let (pos_d, freq_d, slots_d) = (
            dev().upload(&positions).unwrap(),
            dev().upload(&inv_freq).unwrap(),
            dev().upload(&slots).unwrap(),
        );
        // The reference: the two kernels it replaces (each checked against the CPU above).
        let (mut qkv_a, mut k_a, mut v_a) =
            (up::<T>(&qkv), up::<T>(&initial_k), up::<T>(&initial_v));
        ops::rotary(dev(), &mut qkv_a, &pos_d, &freq_d, &rot).unwrap();
        ops::kv_cache_write(dev(), &mut k_a, &mut v_a, &shape, &qkv_a, &kv, &slots_d).unwrap();
        let (mut qkv_b, mut k_b, mut v_b) =
            (up::<T>(&qkv), up::<T>(&initial_k), up::<T>(&initial_v));
        ops::rotary_kv_cache_write(
            dev(),
            &mut qkv_b,
            &pos_d,
            &freq_d,
            &rot,
            &mut k_b,
            &mut v_b,
            &shape,
            &kv,
            &slots_d,
        )
        .unwrap();
        let what = format!(
            "rotary_kv_write {style:?} kv{nkv} hd{hd} rd{rd} [{}]",
            T::DTYPE
        );
        assert_eq!(down(&qkv_b), down(&qkv_a), "{what}: qkv");
        assert_eq!(down(&k_b), down(&k_a), "{what}: k cache");
        assert_eq!(down(&v_b), down(&v_a), "{what}: v cache");
        assert_ne!(down(&k_b), initial_k, "{what}: the cache was written");
        println!("CHECK {what}: equal to rotary + kv_cache_write");
    }
    // A kv source that disagrees with the rotary layout is refused, naming it.
    let shape = KvCacheShape {
        num_blocks: 2,
        block_size: 4,
        num_kv_heads: 1,
        head_dim: 8,
    };
    let rot = RotaryLayout {
        row_stride: 24,
        num_q_heads: 1,
        num_kv_heads: 1,
        k_offset: 8,
        head_dim: 8,
        rotary_dim: 8,
        style: RopeStyle::NeoX,
    };
    // A 1-token qkv row [q 0..8 | k 8..16 | v 16..24] with the kv source `kv`: the error.
    let refused = |kv: KvSource| {
        ops::rotary_kv_cache_write(
            dev(),
            &mut dev().alloc_zeros::<T>(24).unwrap(),
            &dev().upload(&[0u32]).unwrap(),
            &dev().upload(&[1.0f32; 4]).unwrap(),
            &rot,
            &mut dev().alloc_zeros::<T>(shape.num_elements()).unwrap(),
            &mut dev().alloc_zeros::<T>(shape.num_elements()).unwrap(),
            &shape,
            &kv,
            &dev().upload(&[0i64]).unwrap(),
        )
        .unwrap_err()
        .to_string()
    };
    let err = refused(KvSource {
        row_stride: 24,
        k_offset: 16,
        v_offset: 16,
    });
    assert!(
        err.contains("kv source") && err.contains("k_offset 16"),
        "{err}"
    );
    // v over the k heads would race with their rotation in the one kernel: refused.
    let err = refused(KvSource {
        row_stride: 24,
        k_offset: 8,
        v_offset: 12,
    });
    assert!(err.contains("v_offset") && err.contains("overlap"), "{err}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn rotary_fused_with_kv_cache_write_equals_the_two_kernels() {
    for_each_dtype!(rotary_kv_write_case);
}

// ---------------------------------------------------------------------------------------------
// paged attention (decode)

struct AttnCase {
    name: &'static str,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    alibi: bool,
    sliding_window: Option<usize>,
    context_lens: &'static [usize],
}

const ATTN_CASES: &[AttnCase] = &[
    AttnCase {
        name: "gqa4",
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 128,
        block_size: 16,
        alibi: false,
        sliding_window: None,
        context_lens: &[1, 17, 200, 513, 64],
    },
    AttnCase {
        name: "mqa",
        num_heads: 12,
        num_kv_heads: 1,
        head_dim: 80,
        block_size: 16,
        alibi: false,
        sliding_window: None,
        context_lens: &[33, 2, 150],
    },
    AttnCase {
        name: "alibi12",
        num_heads: 12,
        num_kv_heads: 12,
        head_dim: 96,
        block_size: 8,
        alibi: true,
        sliding_window: None,
        context_lens: &[5, 77, 300],
    },
    AttnCase {
        name: "window",
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 128,
        block_size: 16,
        alibi: false,
        sliding_window: Some(37),
        context_lens: &[10, 37, 38, 250],
    },
    AttnCase {
        name: "hd256",
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 256,
        block_size: 32,
        alibi: false,
        sliding_window: None,
        context_lens: &[100, 1, 64],
    },
    AttnCase {
        name: "long",
        num_heads: 8,
        num_kv_heads: 8,
        head_dim: 64,
        block_size: 16,
        alibi: false,
        sliding_window: None,
        context_lens: &[4000],
    },
];

fn attention_case<T: FloatElem>() {
    let mut rng = Rng(6);
    for c in ATTN_CASES {
        let blocks_per_seq: Vec<usize> = c
            .context_lens
            .iter()
            .map(|l| l.div_ceil(c.block_size))
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
        let mut flat_tables = vec![0i32; c.context_lens.len() * max_blocks];
        for (s, t) in tables.iter().enumerate() {
            for (j, &b) in t.iter().enumerate() {
                flat_tables[s * max_blocks + j] = b as i32;
            }
        }
        let shape = KvCacheShape {
            num_blocks,
            block_size: c.block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let k = round::<T>(&rng.vec(shape.num_elements(), 1.0));
        let v = round::<T>(&rng.vec(shape.num_elements(), 1.0));
        // q inside fused qkv rows.
        let q_stride = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let num_seqs = c.context_lens.len();
        let q = round::<T>(&rng.vec(num_seqs * q_stride, 2.0));
        let slopes = alibi_slopes(c.num_heads, 8.0);
        let scale = 1.0 / (c.head_dim as f32).sqrt();

        let (k_d, v_d, q_d) = (up::<T>(&k), up::<T>(&v), up::<T>(&q));
        let tables_d = dev().upload(&flat_tables).unwrap();
        let lens: Vec<i32> = c.context_lens.iter().map(|&l| l as i32).collect();
        let lens_d = dev().upload(&lens).unwrap();
        let slopes_d = dev().upload(&slopes).unwrap();
        let mut out_d = dev()
            .alloc_zeros::<T>(num_seqs * c.num_heads * c.head_dim)
            .unwrap();
        let p = DecodeAttention {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale,
            sliding_window: c.sliding_window,
        };
        ops::paged_attention_decode(
            dev(),
            &mut out_d,
            &q_d,
            q_stride,
            &PagedKv {
                k: &k_d,
                v: &v_d,
                shape,
            },
            &BlockTables {
                block_tables: &tables_d,
                max_blocks_per_seq: max_blocks,
                context_lens: &lens_d,
            },
            c.alibi.then_some(&slopes_d),
            &p,
        )
        .unwrap();

        let cache = KvLayerCache::from_f32(k, v);
        let seqs: Vec<AttnSeq<'_>> = tables
            .iter()
            .zip(c.context_lens)
            .enumerate()
            .map(|(s, (t, &len))| AttnSeq {
                q_start: s,
                q_len: 1,
                context_len: len,
                block_table: t,
            })
            .collect();
        let params = AttnParams {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: c.block_size,
            scale,
            sliding_window: c.sliding_window,
            alibi_slopes: c.alibi.then_some(&slopes[..]),
        };
        let mut want = vec![0.0f32; num_seqs * c.num_heads * c.head_dim];
        paged_attention(&mut want, &q, q_stride, &cache, &seqs, &params);
        check_nan_propagating::<T>(
            &format!("paged_attention_decode {}", c.name),
            &down(&out_d),
            &want,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn paged_attention_decode_matches_cpu_on_gqa_mqa_alibi_window_and_paged_shapes() {
    for_each_dtype!(attention_case);
}

// ---------------------------------------------------------------------------------------------
// argmax

// ---------------------------------------------------------------------------------------------
// launcher checks and copies

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn launchers_and_copies_reject_bad_lengths_without_panicking() {
    let d = dev();
    let mut buf = d.alloc_zeros::<f32>(8).unwrap();
    let err = d.copy_to_device(&[1.0f32; 7], &mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::LengthMismatch {
                expected: 8,
                actual: 7,
                ..
            }
        ),
        "{err}"
    );
    let mut host = [0.0f32; 9];
    assert!(d.copy_to_host(&buf, &mut host).is_err());
    d.copy_to_device(&[2.5f32; 8], &mut buf).unwrap();
    assert_eq!(d.download(&buf).unwrap(), vec![2.5f32; 8]);
    let empty = d.upload::<f32>(&[]).unwrap();
    assert!(empty.is_empty());

    // norm: out shorter than x
    let x = d.alloc_zeros::<bf16>(4 * 64).unwrap();
    let w = d.alloc_zeros::<bf16>(64).unwrap();
    let mut out = d.alloc_zeros::<bf16>(3 * 64).unwrap();
    let err = ops::norm(d, Norm::Rms { eps: 1e-6 }, &mut out, &x, None, &w, None).unwrap_err();
    assert!(
        matches!(err, CudaError::LengthMismatch { operand: "out", .. }),
        "{err}"
    );
    // LayerNorm with bias declared but not passed
    let mut out = d.alloc_zeros::<bf16>(4 * 64).unwrap();
    let err = ops::norm(
        d,
        Norm::Layer {
            eps: 1e-5,
            bias: true,
        },
        &mut out,
        &x,
        None,
        &w,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, CudaError::InvalidArgument { what: "bias", .. }),
        "{err}"
    );
    // rotary: odd rotary_dim
    let mut qkv = d.alloc_zeros::<f16>(2 * 3 * 64).unwrap();
    let positions = d.upload(&[0u32, 1]).unwrap();
    let inv = d.alloc_zeros::<f32>(16).unwrap();
    let layout = RotaryLayout {
        row_stride: 3 * 64,
        num_q_heads: 1,
        num_kv_heads: 1,
        k_offset: 64,
        head_dim: 64,
        rotary_dim: 33,
        style: RopeStyle::NeoX,
    };
    let err = ops::rotary(d, &mut qkv, &positions, &inv, &layout).unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InvalidArgument {
                what: "rotary_dim",
                ..
            }
        ),
        "{err}"
    );
    // attention: head_dim over the kernel's limit, and heads not divisible by kv heads
    let shape = KvCacheShape {
        num_blocks: 1,
        block_size: 16,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let kc = d.alloc_zeros::<f16>(shape.num_elements()).unwrap();
    let tables = d.alloc_zeros::<i32>(1).unwrap();
    let lens = d.upload(&[1i32]).unwrap();
    let q = d.alloc_zeros::<f16>(8 * 64).unwrap();
    let mut o = d.alloc_zeros::<f16>(8 * 64).unwrap();
    let err = ops::paged_attention_decode(
        d,
        &mut o,
        &q,
        8 * 64,
        &PagedKv {
            k: &kc,
            v: &kc,
            shape,
        },
        &BlockTables {
            block_tables: &tables,
            max_blocks_per_seq: 1,
            context_lens: &lens,
        },
        None,
        &DecodeAttention {
            num_heads: 8,
            num_kv_heads: 3,
            head_dim: 64,
            scale: 0.125,
            sliding_window: None,
        },
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
    d.synchronize().unwrap();
}
