//! Random weights for any `DecoderSpec` (benchmarks at real shapes without a checkpoint).
//! Values are a deterministic function of the tensor name and element index: N(0, 0.02²)-like
//! for matrices and biases, 1.0 for norm weights, so a random model is numerically tame.

use std::collections::BTreeMap;

use super::shard::plan_shard;
use super::{
    E4m3Tensor, HostTensor, LoadError, Q8Tensor, Shard, SourceDType, TensorInfo, TensorSource,
};

/// A `TensorSource` that invents deterministic weights for a fixed list of names and shapes (a
/// pure function of seed, name and element index), so benchmarks run at real shapes without a
/// checkpoint.
pub struct RandomSource {
    tensors: BTreeMap<String, Vec<usize>>,
    seed: u64,
}

impl RandomSource {
    /// `tensors`: every name and shape (PyTorch order) the model will ask for.
    pub fn new(tensors: impl IntoIterator<Item = (String, Vec<usize>)>, seed: u64) -> Self {
        RandomSource {
            tensors: tensors.into_iter().collect(),
            seed,
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i` of the tensor whose name hashes to `name_hash`.
fn value(name_hash: u64, i: u64) -> f32 {
    // Sum of two uniforms: triangular on (-1, 1), std 1/sqrt(6); scaled to ~0.02.
    let r = splitmix(name_hash ^ i);
    let u1 = (r >> 40) as f32 / (1u64 << 24) as f32;
    let u2 = ((r >> 16) & 0xFF_FFFF) as f32 / (1u64 << 24) as f32;
    (u1 + u2 - 1.0) * 0.049
}

/// `out[i]` = the value of element `first + i`, filled in parallel chunks (a 7B model is 7e9
/// values: minutes on one thread).
fn fill(name_hash: u64, first: u64, out: &mut [f32]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = out.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let start = first + (c * chunk) as u64;
                for (i, v) in part.iter_mut().enumerate() {
                    *v = value(name_hash, start + i as u64);
                }
            });
        }
    });
}

impl TensorSource for RandomSource {
    fn describe(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|shape| TensorInfo {
            shape: shape.clone(),
            dtype: SourceDType::F32,
        })
    }

    fn get(&self, name: &str, shard: Shard) -> Result<HostTensor, LoadError> {
        let shape = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.describe().into(),
                tensor: name.to_string(),
            })?;
        // Every value is a function of its index alone, so a shard computes only its runs.
        let plan = plan_shard(std::path::Path::new(&self.describe()), name, shape, shard)?;
        let is_norm = name.contains("norm") && name.ends_with("weight");
        let mut data = vec![1.0f32; plan.numel()];
        if !is_norm {
            let name_hash = name
                .bytes()
                .fold(self.seed, |h, b| splitmix(h ^ u64::from(b)));
            let mut pos = 0;
            for run in &plan.runs {
                fill(name_hash, run.start as u64, &mut data[pos..pos + run.len]);
                pos += run.len;
            }
        }
        Ok(HostTensor {
            shape: plan.shape,
            data,
        })
    }

    fn get_q8(&self, _name: &str, _shard: Shard) -> Result<Option<Q8Tensor>, LoadError> {
        Ok(None)
    }

    fn get_e4m3(&self, name: &str, _shard: Shard) -> Result<E4m3Tensor, LoadError> {
        // Random tensors are all F32.
        Err(LoadError::UnsupportedType {
            path: self.describe().into(),
            tensor: name.to_string(),
            dtype: "F32 (an F8_E4M3 tensor was expected)".to_string(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_is_the_slice_of_the_whole_tensor() {
        let src = RandomSource::new([("w".to_string(), vec![6, 5])], 3);
        let whole = src.get("w", Shard::Replicated).unwrap().data;
        let rows = src.get("w", Shard::OutRange { start: 2, len: 3 }).unwrap();
        assert_eq!(rows.shape, [3, 5]);
        assert_eq!(rows.data, whole[10..25]);
        let cols = src
            .get(
                "w",
                Shard::Row {
                    rank: 1,
                    world_size: 5,
                },
            )
            .unwrap();
        assert_eq!(cols.shape, [6, 1]);
        let want: Vec<f32> = (0..6).map(|r| whole[r * 5 + 1]).collect();
        assert_eq!(cols.data, want);
        assert!(
            src.get(
                "w",
                Shard::Column {
                    rank: 0,
                    world_size: 4
                }
            )
            .is_err()
        );
    }

    #[test]
    fn values_depend_on_name_seed_and_index_only_not_on_the_parallel_chunks() {
        let numel = 3 * (1 << 16) + 7;
        let src = RandomSource::new(
            [
                ("w".to_string(), vec![numel]),
                ("x.norm.weight".to_string(), vec![5]),
            ],
            9,
        );
        let a = src.get("w", Shard::Replicated).unwrap().data;
        let hash = "w".bytes().fold(9, |h, b| splitmix(h ^ u64::from(b)));
        assert_eq!(a.len(), numel);
        for i in [0, 1, 1 << 16, (1 << 16) + 1, numel - 1] {
            assert_eq!(a[i], value(hash, i as u64), "element {i}");
        }
        assert_eq!(a, src.get("w", Shard::Replicated).unwrap().data);
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / numel as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / numel as f64;
        assert!(
            mean.abs() < 1e-3 && (var.sqrt() - 0.02).abs() < 2e-3,
            "{mean} {var}"
        );
        assert_eq!(
            src.get("x.norm.weight", Shard::Replicated).unwrap().data,
            vec![1.0; 5]
        );
    }
}
