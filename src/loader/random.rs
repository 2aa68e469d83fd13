//! Random weights for any `DecoderSpec` (benchmarks at real shapes without a checkpoint).
//! Values are a deterministic function of the tensor name and element index: N(0, 0.02²)-like
//! for matrices and biases, 1.0 for norm weights, so a random model is numerically tame.

use std::collections::BTreeMap;

use super::{HostTensor, LoadError, Q8Tensor, Shard, SourceDType, TensorInfo, TensorSource};

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
            (0..numel as u64)
                .map(|i| {
                    // Sum of two uniforms: triangular on (-1, 1), std 1/sqrt(6); scaled to ~0.02.
                    let r = splitmix(name_hash ^ i);
                    let u1 = (r >> 40) as f32 / (1u64 << 24) as f32;
                    let u2 = ((r >> 16) & 0xFF_FFFF) as f32 / (1u64 << 24) as f32;
                    (u1 + u2 - 1.0) * 0.049
                })
                .collect()
        };
        Ok(HostTensor {
            shape: shape.clone(),
            data,
        })
    }

    fn get_q8(&self, _name: &str, _shard: Shard) -> Result<Option<Q8Tensor>, LoadError> {
        Ok(None)
    }
}
