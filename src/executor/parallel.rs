//! Tensor-parallel settings (`EngineOptions::parallel`) and the checks a model load makes on
//! them before any weight is read: the rank count against the model's heads (`model::tp`), and
//! for the GPU the placement of ranks on devices (one rank per GPU: NCCL refuses two ranks on
//! one device, and ferrum says so first).

use crate::executor::build::Device;
use crate::model::DecoderSpec;
use crate::model::ModelError;

/// How many ranks the model is split over, and on which GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelOptions {
    /// Ranks the model is split over (`tensor_parallel_size`; default 1). On the CPU each rank
    /// is a thread of the engine's process.
    pub tensor_parallel_size: usize,
    /// GPU ordinals, one per rank (`gpu_device_ids`); empty: the first `tensor_parallel_size`
    /// visible GPUs (a plain `cuda:N` device: GPU N for one rank).
    pub gpu_device_ids: Vec<usize>,
}

impl Default for ParallelOptions {
    fn default() -> Self {
        ParallelOptions {
            tensor_parallel_size: 1,
            gpu_device_ids: vec![],
        }
    }
}

/// The setting-level checks (no model needed): a rank count of at least 1, no GPU listed
/// twice, and as many listed GPUs as ranks.
pub fn check_options(p: &ParallelOptions, device: Device) -> Result<(), ModelError> {
    let tp = p.tensor_parallel_size;
    let err = ModelError::TensorParallel;
    if tp == 0 {
        return Err(err("tensor_parallel_size must be at least 1, got 0".into()));
    }
    let ids = &p.gpu_device_ids;
    let list = || {
        ids.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(i, id)| ids[..*i].contains(id))
    {
        return Err(err(format!(
            "gpu_device_ids = {} lists GPU {id} twice (positions {} and {}): each rank needs its \
             own GPU, and two ranks on one GPU are refused (NCCL does not support it)",
            list(),
            ids.iter().position(|x| *x == id).unwrap_or(i),
            i
        )));
    }
    if device == Device::Cpu || tp == 1 {
        return Ok(());
    }
    if !ids.is_empty() && ids.len() < tp {
        return Err(err(format!(
            "tensor_parallel_size = {tp} needs one GPU per rank, but gpu_device_ids = {} lists \
             only {}",
            list(),
            ids.len()
        )));
    }
    if let Device::Cuda { ordinal } = device
        && ordinal != 0
        && ids.is_empty()
    {
        return Err(err(format!(
            "device cuda:{ordinal} names one GPU, but tensor_parallel_size = {tp} needs one GPU \
             per rank (two ranks on one GPU are refused): list them in gpu_device_ids"
        )));
    }
    Ok(())
}

/// The model-level check: `spec` can be split over the ranks (`model::tp::check`).
pub fn check_model(p: &ParallelOptions, spec: &DecoderSpec) -> Result<(), ModelError> {
    crate::model::tp::check(spec, p.tensor_parallel_size).map_err(ModelError::TensorParallel)
}

/// The GPU engine with several ranks: refused until the NCCL path exists, after the placement
/// checks (so a misplaced configuration is named first); `visible` is the number of GPUs CUDA
/// sees.
pub fn check_cuda(p: &ParallelOptions, visible: usize) -> Result<(), ModelError> {
    let tp = p.tensor_parallel_size;
    if tp <= 1 {
        return Ok(());
    }
    let err = ModelError::TensorParallel;
    if let Some(&id) = p.gpu_device_ids.iter().find(|&&id| id >= visible) {
        return Err(err(format!(
            "gpu_device_ids lists GPU {id}, but only {visible} GPUs are visible"
        )));
    }
    if p.gpu_device_ids.is_empty() && tp > visible {
        return Err(err(format!(
            "tensor_parallel_size = {tp} needs one GPU per rank, but only {visible} GPUs are \
             visible (two ranks on one GPU are refused)"
        )));
    }
    Err(err(format!(
        "tensor_parallel_size = {tp} on the GPU is not available yet in this build (the NCCL \
         path is not implemented): use tensor_parallel_size 1 on the GPU, or device cpu for \
         tensor-parallel ranks on the CPU"
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts(tp: usize, ids: &[usize]) -> ParallelOptions {
        ParallelOptions {
            tensor_parallel_size: tp,
            gpu_device_ids: ids.to_vec(),
        }
    }

    #[test]
    fn placement_errors_name_the_setting_and_the_values() {
        let cuda = Device::Cuda { ordinal: 0 };
        let cases: [(ParallelOptions, Device, &str); 5] = [
            (
                opts(0, &[]),
                Device::Cpu,
                "tensor_parallel_size must be at least 1, got 0",
            ),
            (
                opts(2, &[0, 0]),
                cuda,
                "gpu_device_ids = 0,0 lists GPU 0 twice (positions 0 and 1): each rank needs its own GPU, and two ranks on one GPU are refused (NCCL does not support it)",
            ),
            (
                opts(4, &[0, 1]),
                cuda,
                "tensor_parallel_size = 4 needs one GPU per rank, but gpu_device_ids = 0,1 lists only 2",
            ),
            (
                opts(2, &[]),
                Device::Cuda { ordinal: 3 },
                "device cuda:3 names one GPU, but tensor_parallel_size = 2 needs one GPU per rank (two ranks on one GPU are refused): list them in gpu_device_ids",
            ),
            (
                opts(1, &[2, 1, 2]),
                Device::Auto,
                "gpu_device_ids = 2,1,2 lists GPU 2 twice (positions 0 and 2)",
            ),
        ];
        for (o, device, want) in cases {
            let err = check_options(&o, device).unwrap_err().to_string();
            assert!(err.starts_with(want), "{o:?}: {err}");
        }
        assert!(check_options(&opts(4, &[]), Device::Cpu).is_ok());
        assert!(check_options(&opts(2, &[1, 0]), cuda).is_ok());
    }

    #[test]
    fn the_gpu_refuses_several_ranks_after_the_placement_checks() {
        assert!(check_cuda(&opts(1, &[]), 1).is_ok());
        let err = |o: ParallelOptions, visible| check_cuda(&o, visible).unwrap_err().to_string();
        assert_eq!(
            err(opts(2, &[]), 1),
            "tensor_parallel_size = 2 needs one GPU per rank, but only 1 GPUs are visible (two ranks on one GPU are refused)"
        );
        assert_eq!(
            err(opts(2, &[0, 5]), 2),
            "gpu_device_ids lists GPU 5, but only 2 GPUs are visible"
        );
        assert!(err(opts(2, &[0, 1]), 2).contains("is not available yet"));
    }
}
