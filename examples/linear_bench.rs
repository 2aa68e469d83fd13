//! Microbenchmark of `ops::linear` on the SmolLM2-135M shapes.
//!
//! For every (in → out) shape, m ∈ {1, 4, 16, 128} and weight format it prints the time per call
//! (minimum over samples: the machine is shared, the minimum is the least disturbed run), GFLOP/s
//! and GB/s of weight bytes. Weights are rotated over enough copies to exceed the last-level cache,
//! so every call streams its weights from DRAM as in real decode (`--hot` reuses one copy).
//! At the end it adds up the m = 1 times into a per-token estimate of the 30-layer model plus the
//! tied 49152-row lm_head, the number to compare with llama.cpp's decode speed.
//!
//! Usage: cargo run --release --example linear_bench -- [--hot] [--quick] [--json] [--outside-pool]
//!        [--filter TEXT] [--ms 1,8]
//! (threads: RAYON_NUM_THREADS, default all cores).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use triton_ferrum::loader::HostTensor;
use triton_ferrum::ops::linear::{Q8Kernel, Weight, WeightFormat, linear_with};
use triton_ferrum::ops::q8::Isa;

/// (in_features, out_features, calls per token in the 30-layer model).
const SHAPES: [(usize, usize, usize); 5] = [
    (576, 576, 60),
    (576, 192, 60),
    (576, 1536, 60),
    (1536, 576, 30),
    (576, 49152, 1),
];
const MS: [usize; 4] = [1, 4, 16, 128];
/// Weight bytes to rotate over in cold mode (well above the 32 MiB L3 of the test machine).
const COLD_BYTES: usize = 128 << 20;

fn random_values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 0.2 - 0.1
        })
        .collect()
}

/// Minimum time per call over samples of about 20 ms each (at least `min_samples` samples).
fn time_per_call(min_samples: usize, mut call: impl FnMut()) -> Duration {
    call();
    let start = Instant::now();
    call();
    let one = start.elapsed().max(Duration::from_micros(1));
    let iters =
        (Duration::from_millis(20).as_secs_f64() / one.as_secs_f64()).clamp(1.0, 10_000.0) as u32;
    let mut best = Duration::MAX;
    for _ in 0..min_samples {
        let start = Instant::now();
        for _ in 0..iters {
            call();
        }
        best = best.min(start.elapsed() / iters);
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The engine runs its forward pass on a rayon worker (`pool.install`), so each `linear` forks
    // its tasks without a cross-thread handoff; `--outside-pool` measures calls from a plain
    // thread, where every call pays for waking a worker and waiting on a latch.
    if args.iter().any(|a| a == "--outside-pool") {
        run(&args);
    } else {
        rayon::scope(|_| run(&args));
    }
}

fn run(args: &[String]) {
    let hot = args.iter().any(|a| a == "--hot");
    let quick = args.iter().any(|a| a == "--quick");
    let json = args.iter().any(|a| a == "--json");
    // --filter TEXT: only rows whose "shape kernel" label contains TEXT (e.g. "576->192 q8").
    let filter = args
        .iter()
        .position(|a| a == "--filter")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    let min_samples = if quick { 5 } else { 15 };
    // --ms 2,8: other batch sizes.
    let ms: Vec<usize> = match args
        .iter()
        .position(|a| a == "--ms")
        .and_then(|i| args.get(i + 1))
    {
        Some(list) => list.split(',').filter_map(|v| v.parse().ok()).collect(),
        None if quick => vec![1, 16],
        None => MS.to_vec(),
    };
    let variants = [
        ("f32", WeightFormat::F32, Q8Kernel::Auto),
        ("q8-row", WeightFormat::Q8, Q8Kernel::Int8(Isa::Scalar)),
        ("q8-simd", WeightFormat::Q8, Q8Kernel::Int8(Isa::detect())),
        ("q8-gemm", WeightFormat::Q8, Q8Kernel::DequantGemm),
    ];
    println!(
        "threads={} caller={} mode={}",
        rayon::current_num_threads(),
        if rayon::current_thread_index().is_some() {
            "rayon worker"
        } else {
            "outside the pool"
        },
        if hot {
            "hot (one weight copy, cache-resident when it fits)"
        } else {
            "cold (weights rotated over > L3)"
        }
    );
    println!(
        "{:<12} {:>4} {:<8} {:>10} {:>9} {:>8}",
        "shape", "m", "kernel", "us/call", "GFLOP/s", "GB/s"
    );
    let mut per_token_us = [0.0f64; 4];
    let mut records = Vec::new();
    for (shape_idx, &(cols, rows, calls_per_token)) in SHAPES.iter().enumerate() {
        let data = random_values(shape_idx as u64, rows * cols);
        for (variant_idx, &(name, format, kernel)) in variants.iter().enumerate() {
            if !format!("{cols}->{rows} {name}").contains(&filter) {
                continue;
            }
            let first = Weight::from_f32(
                HostTensor {
                    shape: vec![rows, cols],
                    data: data.clone(),
                },
                format,
            )
            .unwrap();
            let num_copies = if hot {
                1
            } else {
                COLD_BYTES.div_ceil(first.size_in_bytes()).max(1)
            };
            let weights: Vec<Weight> = std::iter::repeat_n(first, num_copies).collect();
            let bytes = weights[0].size_in_bytes();
            for &m in &ms {
                // The slow combinations say nothing new: the f32 path at large m is gemm either way.
                if kernel == Q8Kernel::Int8(Isa::Scalar) && m > 16 {
                    continue;
                }
                let x = random_values(99, m * cols);
                let bias = random_values(98, rows);
                let mut y = vec![0.0f32; m * rows];
                let mut next = 0;
                let t = time_per_call(min_samples, || {
                    linear_with(&x, m, &weights[next], Some(&bias), &mut y, kernel).unwrap();
                    next = (next + 1) % weights.len();
                });
                let secs = t.as_secs_f64();
                let gflops = 2.0 * (m * rows * cols) as f64 / secs / 1e9;
                let gbs = bytes as f64 / secs / 1e9;
                let shape = format!("{cols}->{rows}");
                println!(
                    "{shape:<12} {m:>4} {name:<8} {:>10.1} {gflops:>9.1} {gbs:>8.2}",
                    secs * 1e6
                );
                if m == 1 {
                    per_token_us[variant_idx] += secs * 1e6 * calls_per_token as f64;
                }
                records.push(format!(
                    "{{\"in\":{cols},\"out\":{rows},\"m\":{m},\"kernel\":\"{name}\",\"us\":{:.2},\"gflops\":{gflops:.2},\"gbs\":{gbs:.3}}}",
                    secs * 1e6
                ));
            }
        }
    }
    for (variant_idx, (name, _, _)) in variants.iter().enumerate() {
        println!(
            "model matmuls per decoded token (m=1, 30 layers + lm_head), {name}: {:.2} ms ({:.1} tok/s upper bound)",
            per_token_us[variant_idx] / 1e3,
            1e6 / per_token_us[variant_idx]
        );
    }
    if json {
        println!("[{}]", records.join(","));
    }
}
