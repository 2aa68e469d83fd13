//! FP8 linears as an FP8 checkpoint stores them: E4M3 codes with their weight scales (per
//! tensor, per channel or per tile) and input scales, fused shards each keeping their own scale,
//! and the FP8 KV-cache scales (`model::quant` says which tensors hold them).

use super::loader::Loader;
use super::pieces::Piece;
use super::{KvScales, Linear};
use crate::loader::{LoadError, Shard, SourceDType};
use crate::model::arch::LayerTensor;
use crate::model::quant::{Activations, Fp8Scheme, Quantization, WeightScales};
use crate::ops::fp8::{Fp8Rows, Fp8Scale, Fp8Weight};

impl Loader<'_> {
    /// The FP8 scheme of the checkpoint, if it has one.
    pub(super) fn fp8_scheme(&self) -> Option<&Fp8Scheme> {
        match &self.arch.quant {
            Quantization::Fp8(s) => Some(s),
            Quantization::None | Quantization::Fp8Online => None,
        }
    }

    /// The read `piece` of a linear (`[rows, cols]` as stored) with its scales (sliced with
    /// it) when it is stored in F8_E4M3; None when it is stored in a float type.
    pub(super) fn fp8_part(&self, piece: &Piece) -> Result<Option<Fp8Weight>, LoadError> {
        let (name, rows, cols) = (piece.name.as_str(), piece.rows, piece.cols);
        let dtype = self.src.info(name).map(|i| i.dtype);
        match dtype {
            Some(SourceDType::F8E4M3) => {}
            Some(SourceDType::F8E5M2) => {
                return Err(self.bad(
                    name,
                    "F8_E5M2 weights are not supported: ferrum loads FP8 E4M3 (F8_E4M3) weights",
                ));
            }
            _ => return Ok(None),
        }
        let Some(scheme) = self.fp8_scheme() else {
            return Err(self.bad(
                name,
                "stored F8_E4M3, but the checkpoint has no FP8 quantization_config in config.json (nor an hf_quant_config.json): its scales are unknown",
            ));
        };
        let module = name.strip_suffix(".weight").unwrap_or(name);
        if !scheme.quantizes(module) {
            return Err(self.bad(
                name,
                &format!(
                    "stored F8_E4M3, but {} lists module '{module}' as unquantized",
                    scheme.ignore.key
                ),
            ));
        }
        self.check_shape(name, &[rows, cols])?;
        let codes = self.src.get_e4m3(name, piece.shard)?.codes;
        let scale = piece
            .slice_scale(&self.weight_scale(scheme, module, rows, cols)?)
            .map_err(|e| self.bad(name, &e))?;
        let input_name = scheme.input_scale_name(module);
        let input_scale = match self.src.contains(&input_name) {
            true => Some(self.scalar(&input_name)?),
            false if scheme.activations == Activations::Static => {
                return Err(LoadError::MissingTensor {
                    path: self.src.describe().into(),
                    tensor: input_name,
                });
            }
            false => None,
        };
        let w = Fp8Weight {
            rows: piece.local_rows(),
            cols: piece.local_cols(),
            codes,
            scale,
            input_scale,
        };
        w.check().map_err(|e| self.bad(name, &e))?;
        Ok(Some(w))
    }

    /// A one-element tensor (scalar `[]`, or `[1]`).
    pub(super) fn scalar(&self, name: &str) -> Result<f32, LoadError> {
        let data = self.vector(name, 1)?;
        Ok(data[0])
    }

    /// The weight scales of `module` in the scheme's granularity, shape-checked.
    pub(super) fn weight_scale(
        &self,
        scheme: &Fp8Scheme,
        module: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Fp8Scale, LoadError> {
        let name = scheme.weight_scale_name(module);
        let info = self
            .src
            .info(&name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.src.describe().into(),
                tensor: name.clone(),
            })?;
        let shape = info.shape;
        let numel: usize = shape.iter().product();
        let (ok, expected) = match scheme.weights {
            WeightScales::Tensor => (numel == 1, vec![1]),
            WeightScales::Channel => (
                shape == [rows, 1] || shape == [rows] || (rows == 1 && numel == 1),
                vec![rows, 1],
            ),
            WeightScales::Block { rows: br, cols: bc } => {
                let grid = vec![rows.div_ceil(br), cols.div_ceil(bc)];
                (shape == grid, grid)
            }
        };
        if !ok {
            return Err(LoadError::ShapeMismatch {
                path: self.src.describe().into(),
                tensor: name,
                expected,
                actual: shape,
            });
        }
        let data = self.src.get(&name, Shard::Replicated)?.data;
        Ok(match scheme.weights {
            WeightScales::Tensor => Fp8Scale::Tensor(data[0]),
            WeightScales::Channel => Fp8Scale::Channel(data),
            WeightScales::Block { rows: br, cols: bc } => Fp8Scale::Block {
                block: (br, bc),
                scales: data,
            },
        })
    }

    /// Row-concatenation of the reads `pieces` of linears: FP8 when every part is stored in FP8
    /// and their scales share one form (`Fp8Weight::concat_rows`), else dense (FP8 parts
    /// dequantized exactly).
    pub(super) fn linear_rows(&self, pieces: &[Piece]) -> Result<Linear, LoadError> {
        let mut parts = Vec::with_capacity(pieces.len());
        for p in pieces {
            parts.push(self.fp8_part(p)?);
        }
        if parts.iter().all(Option::is_none) {
            return self.matrix(pieces).map(Linear::Dense);
        }
        if let Some(all) = parts.iter().cloned().collect::<Option<Vec<Fp8Weight>>>()
            && let Some(w) = Fp8Weight::concat_rows(&all)
        {
            return Ok(Linear::Fp8(w));
        }
        let total: usize = pieces.iter().map(Piece::local_rows).sum();
        let cols = pieces.first().map_or(0, Piece::local_cols);
        let mut data = Vec::with_capacity(total * cols);
        for (p, part) in pieces.iter().zip(parts) {
            match part {
                Some(w) => data.extend(w.dequantize()),
                None => data.extend(self.src.get(&p.name, p.shard)?.data),
            }
        }
        let mut names: Vec<&str> = pieces.iter().map(|p| p.name.as_str()).collect();
        names.dedup();
        self.weight_from_f32(&names.join("+"), total, cols, data)
            .map(Linear::Dense)
    }

    /// The first of `candidates` the checkpoint has, read as a scalar.
    pub(super) fn first_scalar(&self, candidates: &[String]) -> Result<Option<f32>, LoadError> {
        match candidates.iter().find(|n| self.src.contains(n)) {
            Some(n) => self.scalar(n).map(Some),
            None => Ok(None),
        }
    }

    pub(super) fn kv_scales(&self, i: usize) -> Result<Option<KvScales>, LoadError> {
        use LayerTensor::*;
        let Some(scheme) = self.fp8_scheme() else {
            return Ok(None);
        };
        let module = |t: LayerTensor| {
            let fused = self.arch.names.layer(i, Qkv);
            self.arch
                .names
                .layer(i, t)
                .or(fused)
                .map(|n| n.trim_end_matches(".weight").to_string())
        };
        // ModelOpt `k_proj.k_scale`, renamed `self_attn.k_scale`, compressed-tensors
        // `k_proj.output_scale`, vLLM's `self_attn.attn.k_scale`.
        let candidates = |proj: Option<String>, s: &str| -> Vec<String> {
            let Some(proj) = proj else { return vec![] };
            let parent = proj
                .rsplit_once('.')
                .map_or(proj.as_str(), |p| p.0)
                .to_string();
            vec![
                format!("{proj}.{s}"),
                format!("{parent}.{s}"),
                format!("{proj}.output_scale"),
                format!("{parent}.attn.{s}"),
            ]
        };
        let (kc, vc) = (
            candidates(module(K), "k_scale"),
            candidates(module(V), "v_scale"),
        );
        let (k, v) = (self.first_scalar(&kc)?, self.first_scalar(&vc)?);
        match (k, v) {
            (Some(k), Some(v)) => Ok(Some(KvScales { k, v })),
            (None, None) if !scheme.kv_cache_scales => Ok(None),
            (k, _) => {
                let missing = if k.is_none() { kc } else { vc };
                Err(LoadError::MissingTensor {
                    path: self.src.describe().into(),
                    tensor: missing.first().cloned().unwrap_or_default(),
                })
            }
        }
    }

    /// `w` quantized to FP8 E4M3 per output channel (amax / 448) when the checkpoint is
    /// quantized at load; anything else as it is.
    pub(super) fn quantize_online(&self, w: Linear) -> Linear {
        match (&self.arch.quant, w) {
            (Quantization::Fp8Online, Linear::Dense(d)) if d.cols() > 0 => {
                let (rows, cols) = (d.rows(), d.cols());
                let mut data = vec![0f32; rows * cols];
                for (r, out) in data.chunks_mut(cols).enumerate() {
                    d.row_to_f32(r, out);
                }
                Linear::Fp8(Fp8Weight::from(Fp8Rows::quantize(&data, rows, cols)))
            }
            (_, w) => w,
        }
    }
}
