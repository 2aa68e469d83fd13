//! Architectures as data: every checkpoint is normalized into a `DecoderSpec`
//! (`arch::from_hf_config` / `arch::from_gguf`), its weights are loaded format-agnostically into
//! `DecoderWeights` (`weights`), and one generic decoder (`decoder`) runs all of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::loader::gguf::GgufFile;
use crate::loader::safetensors::{SafetensorsSource, read_json};
use crate::loader::{E4m3Tensor, HostTensor, LoadError, Q8Tensor, Shard, TensorInfo, TensorSource};
use crate::model::spec::{Norm, PosEmbedding, Residual, RopeScaling};
use crate::tokenizer::Tokenizer;

pub mod arch;
pub mod decoder;
pub mod presets;
pub mod quant;
pub mod spec;
pub mod tp;
pub mod weights;

pub use arch::{ArchInfo, GlobalTensor, LayerTensor, TensorNames};
pub use spec::DecoderSpec;

/// A checkpoint that does not describe a model ferrum can build (as opposed to a file that cannot
/// be read: `LoadError`).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The config's architecture (HF `architectures`/`model_type`, GGUF `general.architecture`) is
    /// not one ferrum implements; the message names it and the supported ones.
    #[error("unsupported architecture: {0}")]
    UnsupportedArchitecture(String),
    /// The checkpoint's config is missing a field, has a bad value or an inconsistent combination;
    /// the message names the file and field.
    #[error("{0}")]
    Config(String),
    /// The model cannot be split over `tensor_parallel_size` ranks (or the ranks cannot be placed
    /// on the devices asked for); the message names the setting, the bound and the values.
    #[error("{0}")]
    TensorParallel(String),
    /// The path is neither a `.gguf` file, a folder with exactly one `.gguf`, nor a folder with
    /// config.json.
    #[error("{path}: no model found: expected a .gguf file or a folder with config.json")]
    NotAModel {
        /// The path given.
        path: PathBuf,
    },
}

/// Which format a checkpoint came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A Hugging Face folder: config.json + safetensors.
    HuggingFace {
        /// The checkpoint folder (config.json, safetensors, tokenizer files).
        dir: PathBuf,
    },
    /// A single GGUF file (metadata, tensors and tokenizer in one).
    Gguf {
        /// The `.gguf` file.
        file: PathBuf,
    },
    /// Random weights at a preset's shapes (benchmarks).
    Random {
        /// The preset's name (`presets::PRESETS`).
        preset: String,
    },
}

/// An opened checkpoint: spec, tensor source and tokenizer; weights not yet read.
pub struct Checkpoint {
    /// Where the checkpoint came from.
    pub format: CheckpointFormat,
    /// The model as data (`DecoderSpec`) plus how its tensors are named.
    pub arch: ArchInfo,
    /// Reads the weights by name (safetensors, GGUF or random), sliced per `Shard` at load.
    pub source: Box<dyn TensorSource>,
    /// The checkpoint's tokenizer (or the override's); None for random checkpoints and for a folder
    /// without tokenizer files.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// EOS ids from the checkpoint config (used when there is no tokenizer).
    pub config_eos_ids: Vec<u32>,
    /// Load notes: where the tensors overruled the config, and the FP8 scheme detected (one line
    /// each). `open` logs them to stderr as `ferrum: <path>: <note>`, like the engine's load
    /// lines.
    pub notes: Vec<String>,
}

impl Checkpoint {
    /// Opens a `.gguf` file or a Hugging Face checkpoint folder. `tokenizer_override` points at
    /// a folder with tokenizer.json to use instead of the checkpoint's own tokenizer.
    pub fn open(path: &Path, tokenizer_override: Option<&Path>) -> crate::Result<Checkpoint> {
        let mut ckpt = if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(ModelError::NotAModel {
                    path: path.to_path_buf(),
                }
                .into());
            }
            Self::open_gguf(path)?
        } else if path.join("config.json").is_file() {
            Self::open_hf(path)?
        } else if path.is_dir() {
            // A folder holding exactly one .gguf file (the Triton model repository layout).
            let ggufs = list_ggufs(path)?;
            match ggufs.as_slice() {
                [one] => Self::open_gguf(one)?,
                _ => {
                    return Err(ModelError::NotAModel {
                        path: path.to_path_buf(),
                    }
                    .into());
                }
            }
        } else {
            return Err(LoadError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            }
            .into());
        };
        if let Some(dir) = tokenizer_override {
            ckpt.tokenizer = Some(Arc::new(Tokenizer::from_hf_dir(dir)?.ok_or_else(|| {
                ModelError::Config(format!(
                    "tokenizer override {}: no tokenizer.json (or vocab.json + merges.txt) there",
                    dir.display()
                ))
            })?));
        }
        for note in &ckpt.notes {
            eprintln!("ferrum: {}: {note}", path.display());
        }
        Ok(ckpt)
    }

    fn open_hf(dir: &Path) -> crate::Result<Checkpoint> {
        let config = read_json(dir.join("config.json"))?;
        let mut arch = arch::from_hf_config(&config)?;
        arch.quant = quant::detect(dir, &config)?;
        let source = SafetensorsSource::open_dir(dir)?;
        let tokenizer = Tokenizer::from_hf_dir(dir)?.map(Arc::new);
        let config_eos_ids = match config.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        };
        let mut ckpt = Checkpoint {
            format: CheckpointFormat::HuggingFace {
                dir: dir.to_path_buf(),
            },
            source: BarePrefixSource::wrap_if_bare(Box::new(source), arch.names),
            arch,
            tokenizer,
            config_eos_ids,
            notes: vec![],
        };
        ckpt.fix_up_from_tensors()?;
        if let quant::Quantization::Fp8(scheme) = &ckpt.arch.quant {
            let note = quant::describe_linears(scheme, &ckpt.arch, ckpt.source.as_ref());
            ckpt.notes.push(note);
        }
        Ok(ckpt)
    }

    fn open_gguf(file: &Path) -> crate::Result<Checkpoint> {
        let gguf = GgufFile::open(file)?;
        let arch = arch::from_gguf(gguf.metadata())?;
        let tokenizer = Tokenizer::from_gguf_metadata(gguf.metadata())?.map(Arc::new);
        let config_eos_ids = gguf
            .metadata()
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        let mut ckpt = Checkpoint {
            format: CheckpointFormat::Gguf {
                file: file.to_path_buf(),
            },
            arch,
            source: Box::new(gguf),
            tokenizer,
            config_eos_ids,
            notes: vec![],
        };
        ckpt.fix_up_from_tensors()?;
        Ok(ckpt)
    }

    /// Settles what the config leaves implicit from the tensors present: a missing LM head means
    /// tied embeddings (in GGUF, a present one means untied); GGUF bias tensors switch biases on (and LayerNorm biases), a GGUF Falcon
    /// with `attn_norm_2` has two norms; GGUF rope frequency factors; the MLP width of Hugging
    /// Face MPT (`mpt::ffn_width_from_tensors`, which adds a note); checkpoints that omit the
    /// base model's `transformer.` prefix were wrapped in `BarePrefixSource` by `open_hf`.
    fn fix_up_from_tensors(&mut self) -> Result<(), LoadError> {
        let names = self.arch.names;
        if names == TensorNames::HfMpt {
            let note = arch::mpt::ffn_width_from_tensors(&mut self.arch.spec, self.source.as_ref());
            self.notes.extend(note);
        }
        let rope_freqs = match names.global(GlobalTensor::RopeFreqs) {
            Some(n) if self.source.contains(&n) => {
                Some(self.source.get(&n, Shard::Replicated)?.data)
            }
            _ => None,
        };
        let has = |n: Option<String>| n.is_some_and(|n| self.source.contains(&n));
        let spec = &mut self.arch.spec;
        if !has(names.global(GlobalTensor::LmHead)) {
            spec.tie_embeddings = true;
        }
        if names.is_gguf() {
            // GGUF has no tie flag: llama.cpp writes `output.weight` exactly when the head is
            // separate (BLOOM conversions of untied checkpoints keep it).
            spec.tie_embeddings = !has(names.global(GlobalTensor::LmHead));
            spec.biases.qkv = has(names.layer(0, LayerTensor::QBias))
                || has(names.layer(0, LayerTensor::QkvBias));
            spec.biases.attn_out = has(names.layer(0, LayerTensor::AttnOutBias));
            spec.biases.mlp = has(names.layer(0, LayerTensor::DownBias));
            spec.biases.lm_head = has(names.global(GlobalTensor::LmHeadBias));
            if let Norm::Layer { bias, .. } = &mut spec.norm {
                *bias = has(names.layer(0, LayerTensor::AttnNormBias));
            }
            if names == TensorNames::GgufFalcon && has(names.layer(0, LayerTensor::MlpNorm)) {
                spec.residual = Residual::Parallel { shared_norm: false };
            }
        }
        if let (Some(factors), PosEmbedding::Rope(rope)) = (rope_freqs, &mut spec.pos)
            && rope.scaling == RopeScaling::None
        {
            rope.scaling = RopeScaling::FreqFactors { factors };
        }
        Ok(())
    }

    /// A checkpoint of random weights at the shapes of a named preset (see `presets::PRESETS`).
    pub fn random(preset: &str, seed: u64) -> crate::Result<Checkpoint> {
        let arch = presets::preset(preset).ok_or_else(|| {
            ModelError::Config(format!(
                "unknown preset '{preset}'; known: {}",
                presets::PRESETS.join(", ")
            ))
        })?;
        let source =
            crate::loader::random::RandomSource::new(weights::expected_tensors(&arch), seed);
        Ok(Checkpoint {
            format: CheckpointFormat::Random {
                preset: preset.to_string(),
            },
            arch,
            source: Box::new(source),
            tokenizer: None,
            config_eos_ids: vec![],
            notes: vec![],
        })
    }

    /// EOS token ids: the tokenizer's, else the config's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.tokenizer {
            Some(t) if !t.eos_token_ids().is_empty() => t.eos_token_ids().to_vec(),
            _ => self.config_eos_ids.clone(),
        }
    }
}

fn list_ggufs(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().and_then(|e| e.to_str()) == Some("gguf") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint whose base-model tensors lack the `prefix` the architecture's names use (the
/// original GPT-2 and BLOOM uploads): names are looked up with the prefix stripped.
struct BarePrefixSource {
    inner: Box<dyn TensorSource>,
    prefix: &'static str,
}

impl BarePrefixSource {
    /// Wraps `inner` when it names the token embedding without the architecture's optional
    /// prefix.
    fn wrap_if_bare(inner: Box<dyn TensorSource>, names: TensorNames) -> Box<dyn TensorSource> {
        let (Some(prefix), Some(embedding)) = (
            names.optional_prefix(),
            names.global(GlobalTensor::TokenEmbedding),
        ) else {
            return inner;
        };
        let bare = embedding.strip_prefix(prefix).unwrap_or(&embedding);
        if !inner.contains(&embedding) && inner.contains(bare) {
            Box::new(BarePrefixSource { inner, prefix })
        } else {
            inner
        }
    }

    fn resolve<'n>(&self, name: &'n str) -> &'n str {
        match name.strip_prefix(self.prefix) {
            Some(bare) if !self.inner.contains(name) => bare,
            _ => name,
        }
    }
}

impl TensorSource for BarePrefixSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.inner.info(self.resolve(name))
    }
    fn get(&self, name: &str, shard: Shard) -> Result<HostTensor, LoadError> {
        self.inner.get(self.resolve(name), shard)
    }
    fn get_q8(&self, name: &str, shard: Shard) -> Result<Option<Q8Tensor>, LoadError> {
        self.inner.get_q8(self.resolve(name), shard)
    }
    fn get_e4m3(&self, name: &str, shard: Shard) -> Result<E4m3Tensor, LoadError> {
        self.inner.get_e4m3(self.resolve(name), shard)
    }
}
