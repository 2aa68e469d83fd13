//! Tensor parallelism on the GPU machine, until the NCCL path exists: several ranks with
//! `device: cuda` fail the load with a clear error, never silently run as one rank; two ranks
//! on one GPU are refused before NCCL would refuse them. These need an NVIDIA GPU and are
//! ignored in CPU CI (`ci/gpu.sh` runs them; `FERRUM_FIXTURES` points at the packed fixtures).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use triton_ferrum::engine::{Device, EngineOptions, options};

fn start_err(tp: usize, ids: &[usize]) -> String {
    let mut o = EngineOptions::new(fixtures().join("models/llama_gqa_llama3"));
    o.device = Device::Cuda { ordinal: 0 };
    o.parallel.tensor_parallel_size = tp;
    o.parallel.gpu_device_ids = ids.to_vec();
    match options::start(&o) {
        Ok(_) => panic!("tp {tp} on {ids:?} must fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (ci/gpu.sh)"]
fn several_ranks_on_the_gpu_fail_the_load_clearly() {
    let visible = triton_ferrum::cuda::device_count().unwrap();
    let err = start_err(2, &[0, 0]);
    assert!(
        err.starts_with("gpu_device_ids = 0,0 lists GPU 0 twice"),
        "{err}"
    );
    let err = start_err(2, &[]);
    let want = match visible {
        1 => "tensor_parallel_size = 2 needs one GPU per rank, but only 1 GPUs are visible",
        _ => "tensor_parallel_size = 2 on the GPU is not available yet",
    };
    assert!(err.starts_with(want), "{visible} GPUs: {err}");
    eprintln!("{visible} GPUs visible; tp 2 refused: {err}");
    // One rank still serves.
    let mut o = EngineOptions::new(fixtures().join("models/llama_gqa_llama3"));
    o.device = Device::Cuda { ordinal: 0 };
    o.parallel.tensor_parallel_size = 1;
    let engine = options::start(&o).unwrap().engine;
    let got = collect(&engine.handle(), greedy(vec![5, 6, 7], 4, None));
    assert_eq!(got.output_ids.len(), 4);
}
