//! Random weights for any `DecoderSpec` (benchmarks at real shapes without a checkpoint).
//! Values are a deterministic function of the tensor name and element index: N(0, 0.02²)-like
//! for matrices and biases, 1.0 for norm weights, so a random model is numerically tame.

use std::collections::BTreeMap;

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
        if shard != Shard::Replicated {
            return Err(LoadError::BadShard {
                path: self.describe().into(),
                tensor: name.into(),
                shape: shape.clone(),
                shard,
            });
        }
        let numel: usize = shape.iter().product();
        let is_norm = name.contains("norm") && name.ends_with("weight");
        let data = if is_norm {
            vec![1.0; numel]
        } else {
            let name_hash = name
                .bytes()
                .fold(self.seed, |h, b| splitmix(h ^ u64::from(b)));
            let mut data = vec![0.0f32; numel];
            // A function of the index alone, so filled in parallel chunks (a 7B model is 7e9
            // values: minutes on one thread).
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let chunk = numel.div_ceil(threads).max(1 << 16);
            std::thread::scope(|s| {
                for (c, out) in data.chunks_mut(chunk).enumerate() {
                    s.spawn(move || {
                        let first = (c * chunk) as u64;
                        for (i, v) in out.iter_mut().enumerate() {
                            *v = value(name_hash, first + i as u64);
                        }
                    });
                }
            });
            data
        };
        Ok(HostTensor {
            shape: shape.clone(),
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
