//! Pre-quantized FP8 checkpoints: which scheme a Hugging Face checkpoint was saved with, read
//! from its config files with no flag, and where each linear's scales live.
//!
//! It owns the parsing of `config.json`'s `quantization_config` and of ModelOpt's
//! `hf_quant_config.json`, the module filters (ignore lists) of each producer, and the load
//! note that says what was detected. It reads no tensor data except to count the linears
//! stored in FP8 (`describe_linears`); the scales themselves are read with the weights
//! (`weights::WeightReader`), which hands on `ops::fp8::Fp8Weight`.
//!
//! | producer | detected by | weight scale | activations | unquantized modules |
//! |---|---|---|---|---|
//! | compressed-tensors | `quant_method: "compressed-tensors"`, `format: "float-quantized"` | `weight_scale`: `[1]` tensor, `[out, 1]` channel, `[ceil(out/b0), ceil(in/b1)]` block | static `input_scale` or dynamic (token / tensor / group) | `ignore` (names, `re:` regexes) |
//! | ModelOpt | `hf_quant_config.json` `quantization.quant_algo: "FP8"` (or `quant_method: "modelopt"`) | scalar `weight_scale` | static `input_scale` | `exclude_modules` (names, globs) |
//! | AutoFP8 / vLLM | `quant_method: "fp8"` | scalar `weight_scale`, or `weight_scale_inv` blocks with `weight_block_size` | `activation_scheme` static / dynamic | `ignored_layers` |
//! | fbgemm | `quant_method: "fbgemm_fp8"` | `weight_scale` `[out, 1]` | dynamic per row | `modules_to_not_convert` |
//!
//! Every scale multiplies: `w = e4m3(code) * scale` (DeepSeek's `weight_scale_inv` too).
//! KV-cache scales (`k_scale`/`v_scale`, compressed-tensors `k_proj.output_scale`) are read
//! with each layer (`weights::KvScales`) for an FP8 KV cache; the CPU engine does not use them.

use std::path::Path;

use serde_json::Value;

use crate::loader::safetensors::read_json;
use crate::loader::{SourceDType, TensorSource};
use crate::model::ModelError;
use crate::model::arch::{ArchInfo, GlobalTensor, LayerTensor};

/// ModelOpt's quantization file, next to config.json.
pub const MODELOPT_FILE: &str = "hf_quant_config.json";

/// How a checkpoint's linear weights are stored.
#[derive(Debug, Clone, Default)]
pub enum Quantization {
    /// Plain floating-point weights (or GGUF's own block types, which the loader handles).
    #[default]
    None,
    /// Pre-quantized FP8 E4M3 weights with scales.
    Fp8(Fp8Scheme),
    /// Float weights quantized to FP8 E4M3 as they are read (`quantization: fp8`): one scale per
    /// output channel (amax / 448), dynamic per-token activations; embeddings and the LM head
    /// keep the checkpoint's dtype.
    Fp8Online,
}

/// What the `quantization` setting asks for at load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QuantizationOption {
    /// The checkpoint's own: FP8 when it is a pre-quantized FP8 checkpoint, else none.
    #[default]
    Auto,
    /// FP8 E4M3: a float (or GGUF) checkpoint is quantized at load (`Quantization::Fp8Online`);
    /// an FP8 checkpoint loads as it is.
    Fp8,
}

impl std::str::FromStr for QuantizationOption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "none" => Ok(QuantizationOption::Auto),
            "fp8" => Ok(QuantizationOption::Fp8),
            _ => Err(format!("'{s}': expected auto or fp8")),
        }
    }
}

impl Quantization {
    /// Applies `option` to a checkpoint whose stored quantization is `self`; returns the load
    /// note for a quantization done at load.
    pub fn apply(&mut self, option: QuantizationOption) -> Option<String> {
        match (option, &*self) {
            (QuantizationOption::Fp8, Quantization::None) => {
                *self = Quantization::Fp8Online;
                Some(
                    "fp8 weights: quantized at load (quantization: fp8): per-channel weight scales \
                     (amax / 448), dynamic per-token activations; embeddings and lm_head unquantized"
                        .into(),
                )
            }
            _ => None,
        }
    }
}

/// The tool that wrote an FP8 checkpoint (it decides the config keys and tensor names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Producer {
    /// llm-compressor's `compressed-tensors`, `float-quantized` format.
    CompressedTensors,
    /// NVIDIA TensorRT Model Optimizer (`hf_quant_config.json`).
    ModelOpt,
    /// AutoFP8 / vLLM / DeepSeek `quant_method: "fp8"`.
    Fp8,
    /// transformers' `fbgemm_fp8`.
    FbgemmFp8,
}

impl Fp8Producer {
    /// The name used in load notes.
    pub fn name(self) -> &'static str {
        match self {
            Fp8Producer::CompressedTensors => "compressed-tensors",
            Fp8Producer::ModelOpt => "modelopt",
            Fp8Producer::Fp8 => "fp8",
            Fp8Producer::FbgemmFp8 => "fbgemm_fp8",
        }
    }
}

/// The granularity of the weight scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightScales {
    /// One scale per linear (a scalar or `[1]` tensor).
    Tensor,
    /// One scale per output row (`[out, 1]` or `[out]`).
    Channel,
    /// One scale per `rows x cols` tile: `[ceil(out / rows), ceil(in / cols)]`.
    Block {
        /// Tile height (output rows).
        rows: usize,
        /// Tile width (input columns).
        cols: usize,
    },
}

/// How activations are quantized for an FP8 GEMM (the CPU engine keeps them in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Weight-only FP8: activations stay in the model dtype.
    WeightOnly,
    /// One calibrated scale per linear (`input_scale`).
    Static,
    /// A scale computed per batch for the whole tensor.
    DynamicPerTensor,
    /// A scale computed per token (row).
    DynamicPerToken,
    /// A scale per group of `group` input features of each token.
    DynamicPerGroup {
        /// Features per group.
        group: usize,
    },
}

/// An FP8 checkpoint's scheme: what `WeightReader` needs to find and apply each scale.
#[derive(Debug, Clone)]
pub struct Fp8Scheme {
    /// Who wrote it.
    pub producer: Fp8Producer,
    /// Granularity of the weight scales.
    pub weights: WeightScales,
    /// How activations are quantized (static ones need `input_scale` tensors).
    pub activations: Activations,
    /// Modules kept unquantized.
    pub ignore: ModuleFilter,
    /// The config declares an FP8 KV cache: every layer must have k and v scales.
    pub kv_cache_scales: bool,
}

impl Fp8Scheme {
    /// Whether the config says module `module` (a weight name without `.weight`) is FP8.
    pub fn quantizes(&self, module: &str) -> bool {
        !self.ignore.matches(module)
    }

    /// The tensor holding the weight scales of `module`.
    pub fn weight_scale_name(&self, module: &str) -> String {
        match (self.producer, self.weights) {
            (Fp8Producer::Fp8, WeightScales::Block { .. }) => format!("{module}.weight_scale_inv"),
            _ => format!("{module}.weight_scale"),
        }
    }

    /// The tensor holding the static activation scale of `module`.
    pub fn input_scale_name(&self, module: &str) -> String {
        format!("{module}.input_scale")
    }

    /// One line: producer, weight and activation scales, KV scales.
    pub fn describe(&self) -> String {
        let weights = match self.weights {
            WeightScales::Tensor => "per-tensor weight scales".to_string(),
            WeightScales::Channel => "per-channel weight scales".to_string(),
            WeightScales::Block { rows, cols } => format!("{rows}x{cols} block weight scales"),
        };
        let acts = match self.activations {
            Activations::WeightOnly => "weight-only".to_string(),
            Activations::Static => "static per-tensor activations".to_string(),
            Activations::DynamicPerTensor => "dynamic per-tensor activations".to_string(),
            Activations::DynamicPerToken => "dynamic per-token activations".to_string(),
            Activations::DynamicPerGroup { group } => {
                format!("dynamic per-token activations in groups of {group}")
            }
        };
        let kv = match self.kv_cache_scales {
            true => ", fp8 kv-cache scales",
            false => "",
        };
        format!("{}, {weights}, {acts}{kv}", self.producer.name())
    }
}

/// One entry of an ignore list.
#[derive(Debug, Clone)]
enum ModulePattern {
    /// Matches the module itself, a module whose dotted name ends with it (`lm_head`,
    /// `mlp.down_proj`), and the modules under it (`model.layers.0`).
    Name(String),
    /// compressed-tensors `re:` entries: a regex matched at the start of the name (Python's
    /// `re.match`).
    Regex(regex::Regex),
    /// ModelOpt wildcards (`*`, `?`) over the whole name.
    Glob(String),
}

/// The modules an FP8 config keeps unquantized (`ignore`, `exclude_modules`, `ignored_layers`,
/// `modules_to_not_convert`).
#[derive(Debug, Clone)]
pub struct ModuleFilter {
    /// The config key the list came from (for messages), e.g. `quantization_config.ignore`.
    pub key: String,
    patterns: Vec<ModulePattern>,
}

impl ModuleFilter {
    /// Whether `module` (a dotted module name) is in the list.
    pub fn matches(&self, module: &str) -> bool {
        self.patterns.iter().any(|p| match p {
            ModulePattern::Name(n) => {
                module == n
                    || module
                        .strip_suffix(n.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
                    || module
                        .strip_prefix(n.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            }
            ModulePattern::Regex(re) => re.is_match(module),
            ModulePattern::Glob(g) => glob_match(g.as_bytes(), module.as_bytes()),
        })
    }

    fn parse(file: &str, key: &str, value: Option<&Value>) -> Result<ModuleFilter, ModelError> {
        let mut patterns = vec![];
        let items = match value {
            None | Some(Value::Null) => &vec![],
            Some(Value::Array(a)) => a,
            Some(other) => return Err(bad(file, key, other, "a list of module names")),
        };
        for item in items {
            let s = item
                .as_str()
                .ok_or_else(|| bad(file, key, item, "a list of module names"))?;
            patterns.push(if let Some(re) = s.strip_prefix("re:") {
                let re = regex::Regex::new(&format!("^(?:{re})")).map_err(|e| {
                    ModelError::Config(format!("{file}: {key}: entry \"{s}\" is not a regex: {e}"))
                })?;
                ModulePattern::Regex(re)
            } else if s.contains(['*', '?']) {
                ModulePattern::Glob(s.to_string())
            } else {
                ModulePattern::Name(s.to_string())
            });
        }
        Ok(ModuleFilter {
            key: key.to_string(),
            patterns,
        })
    }
}

/// `*` matches any run of bytes, `?` one byte; everything else itself.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_match(rest, &name[i..])),
        Some((&p, rest)) => name
            .split_first()
            .is_some_and(|(&c, tail)| (p == b'?' || p == c) && glob_match(rest, tail)),
    }
}

fn bad(file: &str, key: &str, value: &Value, supported: &str) -> ModelError {
    ModelError::Config(format!("{file}: {key} = {value}: {supported}"))
}

const SUPPORTED: &str = "ferrum loads FP8 checkpoints (compressed-tensors float-quantized, \
                         ModelOpt FP8, quant_method fp8 and fbgemm_fp8) and GGUF files";

/// Detects the quantization of the Hugging Face checkpoint in `dir` from its `config.json`
/// (already parsed) and ModelOpt's `hf_quant_config.json`, if present.
pub fn detect(dir: &Path, config: &Value) -> crate::Result<Quantization> {
    let modelopt = dir.join(MODELOPT_FILE);
    let modelopt = match modelopt.is_file() {
        true => Some(read_json(&modelopt)?),
        false => None,
    };
    Ok(from_configs(config, modelopt.as_ref())?)
}

/// `detect` on parsed files: `config` is config.json, `modelopt` is `hf_quant_config.json`.
pub fn from_configs(config: &Value, modelopt: Option<&Value>) -> Result<Quantization, ModelError> {
    if let Some(m) = modelopt {
        let q = m.get("quantization").ok_or_else(|| {
            ModelError::Config(format!(
                "{MODELOPT_FILE}: no \"quantization\" object (ModelOpt writes quantization.quant_algo)"
            ))
        })?;
        return modelopt_scheme(MODELOPT_FILE, "quantization", q);
    }
    let Some(qc) = config.get("quantization_config") else {
        return Ok(Quantization::None);
    };
    let file = "config.json";
    let method = qc.get("quant_method").and_then(Value::as_str);
    match method {
        Some("compressed-tensors") => compressed_tensors(file, qc),
        Some("fp8") => fp8(file, qc),
        Some("fbgemm_fp8") => Ok(Quantization::Fp8(Fp8Scheme {
            producer: Fp8Producer::FbgemmFp8,
            weights: WeightScales::Channel,
            activations: Activations::DynamicPerToken,
            ignore: ModuleFilter::parse(
                file,
                "quantization_config.modules_to_not_convert",
                qc.get("modules_to_not_convert"),
            )?,
            kv_cache_scales: false,
        })),
        Some("modelopt") => {
            // Newer ModelOpt exports repeat hf_quant_config.json's `quantization` object in
            // config.json, flat or nested.
            let q = qc.get("quantization").unwrap_or(qc);
            modelopt_scheme(file, "quantization_config", q)
        }
        _ => Err(bad(
            file,
            "quantization_config.quant_method",
            qc.get("quant_method").unwrap_or(&Value::Null),
            SUPPORTED,
        )),
    }
}

fn modelopt_scheme(file: &str, prefix: &str, q: &Value) -> Result<Quantization, ModelError> {
    let key = format!("{prefix}.quant_algo");
    match q.get("quant_algo") {
        Some(Value::String(s)) if s == "FP8" => {}
        other => {
            return Err(bad(
                file,
                &key,
                other.unwrap_or(&Value::Null),
                "ferrum loads ModelOpt checkpoints with quant_algo \"FP8\" (per-tensor E4M3)",
            ));
        }
    }
    let kv_key = format!("{prefix}.kv_cache_quant_algo");
    let kv_cache_scales = match q.get("kv_cache_quant_algo") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "FP8" => true,
        Some(other) => {
            return Err(bad(
                file,
                &kv_key,
                other,
                "ferrum reads FP8 (or null) ModelOpt KV-cache scales",
            ));
        }
    };
    let (ignore_key, ignore) = match q.get("exclude_modules") {
        Some(v) => (format!("{prefix}.exclude_modules"), Some(v)),
        None => (format!("{prefix}.ignore"), q.get("ignore")),
    };
    Ok(Quantization::Fp8(Fp8Scheme {
        producer: Fp8Producer::ModelOpt,
        weights: WeightScales::Tensor,
        activations: Activations::Static,
        ignore: ModuleFilter::parse(file, &ignore_key, ignore)?,
        kv_cache_scales,
    }))
}

fn fp8(file: &str, qc: &Value) -> Result<Quantization, ModelError> {
    if let Some(fmt) = qc.get("fmt")
        && fmt.as_str() != Some("e4m3")
    {
        return Err(bad(
            file,
            "quantization_config.fmt",
            fmt,
            "ferrum loads E4M3 FP8 weights (fmt \"e4m3\")",
        ));
    }
    let weights = match qc.get("weight_block_size") {
        None | Some(Value::Null) => WeightScales::Tensor,
        Some(v) => match block_size(v) {
            Some((rows, cols)) => WeightScales::Block { rows, cols },
            None => {
                return Err(bad(
                    file,
                    "quantization_config.weight_block_size",
                    v,
                    "expected [rows, cols] of positive integers, e.g. [128, 128]",
                ));
            }
        },
    };
    let activations = match qc.get("activation_scheme").and_then(Value::as_str) {
        Some("static") => Activations::Static,
        Some("dynamic") => match weights {
            WeightScales::Block { cols, .. } => Activations::DynamicPerGroup { group: cols },
            _ => Activations::DynamicPerTensor,
        },
        _ => {
            return Err(bad(
                file,
                "quantization_config.activation_scheme",
                qc.get("activation_scheme").unwrap_or(&Value::Null),
                "expected \"static\" or \"dynamic\"",
            ));
        }
    };
    Ok(Quantization::Fp8(Fp8Scheme {
        producer: Fp8Producer::Fp8,
        weights,
        activations,
        ignore: ModuleFilter::parse(
            file,
            "quantization_config.ignored_layers",
            qc.get("ignored_layers"),
        )?,
        kv_cache_scales: false,
    }))
}

fn block_size(v: &Value) -> Option<(usize, usize)> {
    let a = v.as_array()?;
    let dim = |i: usize| {
        a.get(i)
            .and_then(Value::as_u64)
            .filter(|&d| d > 0)
            .map(|d| d as usize)
    };
    match a.len() {
        2 => Some((dim(0)?, dim(1)?)),
        _ => None,
    }
}

fn compressed_tensors(file: &str, qc: &Value) -> Result<Quantization, ModelError> {
    let check_format = |key: &str, v: Option<&Value>| match v {
        Some(Value::String(s)) if s == "float-quantized" => Ok(()),
        other => Err(bad(
            file,
            key,
            other.unwrap_or(&Value::Null),
            "ferrum loads float-quantized (FP8) compressed-tensors checkpoints",
        )),
    };
    check_format("quantization_config.format", qc.get("format"))?;
    let groups = match qc.get("config_groups") {
        Some(Value::Object(g)) if !g.is_empty() => g,
        other => {
            return Err(bad(
                file,
                "quantization_config.config_groups",
                other.unwrap_or(&Value::Null),
                "expected an object of one or more quantization groups",
            ));
        }
    };
    let mut scheme: Option<(WeightScales, Activations)> = None;
    for (name, g) in groups {
        let key = |k: &str| format!("quantization_config.config_groups.{name}.{k}");
        if let Some(f) = g.get("format") {
            check_format(&key("format"), Some(f))?;
        }
        let targets = g.get("targets").and_then(Value::as_array);
        if !targets.is_some_and(|t| t.iter().any(|t| t.as_str() == Some("Linear"))) {
            return Err(bad(
                file,
                &key("targets"),
                g.get("targets").unwrap_or(&Value::Null),
                "ferrum loads groups that target every Linear ([\"Linear\"])",
            ));
        }
        let w = g.get("weights").unwrap_or(&Value::Null);
        let (ty, bits) = (w.get("type"), w.get("num_bits"));
        if ty.and_then(Value::as_str) != Some("float") || bits.and_then(Value::as_u64) != Some(8) {
            return Err(ModelError::Config(format!(
                "{file}: {} = {}, {} = {}: ferrum loads FP8 weights (type \"float\", num_bits 8)",
                key("weights.type"),
                ty.unwrap_or(&Value::Null),
                key("weights.num_bits"),
                bits.unwrap_or(&Value::Null)
            )));
        }
        let weights = match w.get("strategy").and_then(Value::as_str) {
            Some("tensor") => WeightScales::Tensor,
            Some("channel") => WeightScales::Channel,
            Some("block") => match w.get("block_structure").and_then(block_size) {
                Some((rows, cols)) => WeightScales::Block { rows, cols },
                None => {
                    return Err(bad(
                        file,
                        &key("weights.block_structure"),
                        w.get("block_structure").unwrap_or(&Value::Null),
                        "expected [rows, cols] of positive integers",
                    ));
                }
            },
            _ => {
                return Err(bad(
                    file,
                    &key("weights.strategy"),
                    w.get("strategy").unwrap_or(&Value::Null),
                    "ferrum loads FP8 weight strategies \"tensor\", \"channel\" and \"block\"",
                ));
            }
        };
        let activations = match g.get("input_activations") {
            None | Some(Value::Null) => Activations::WeightOnly,
            Some(a) => {
                let dynamic = a.get("dynamic").and_then(Value::as_bool).unwrap_or(false);
                match (dynamic, a.get("strategy").and_then(Value::as_str)) {
                    (false, Some("tensor")) => Activations::Static,
                    (true, Some("tensor")) => Activations::DynamicPerTensor,
                    (true, Some("token")) => Activations::DynamicPerToken,
                    (true, Some("group")) => Activations::DynamicPerGroup {
                        group: a.get("group_size").and_then(Value::as_u64).unwrap_or(0) as usize,
                    },
                    _ => {
                        return Err(bad(
                            file,
                            &key("input_activations"),
                            a,
                            "ferrum loads static per-tensor or dynamic (tensor, token, group) \
                             FP8 activations",
                        ));
                    }
                }
            }
        };
        match scheme {
            Some(s) if s != (weights, activations) => {
                return Err(ModelError::Config(format!(
                    "{file}: quantization_config.config_groups: groups with different schemes \
                     ({s:?} and {:?} in {name}): ferrum loads one FP8 scheme for every Linear",
                    (weights, activations)
                )));
            }
            _ => scheme = Some((weights, activations)),
        }
    }
    let Some((weights, activations)) = scheme else {
        return Err(ModelError::Config(format!(
            "{file}: quantization_config.config_groups is empty"
        )));
    };
    let kv_cache_scales = !matches!(qc.get("kv_cache_scheme"), None | Some(Value::Null));
    Ok(Quantization::Fp8(Fp8Scheme {
        producer: Fp8Producer::CompressedTensors,
        weights,
        activations,
        ignore: ModuleFilter::parse(file, "quantization_config.ignore", qc.get("ignore"))?,
        kv_cache_scales,
    }))
}

/// The load note of an FP8 checkpoint: the scheme and how many linears are stored in FP8,
/// naming the unquantized ones (those the config leaves out, or stores in a float type).
pub fn describe_linears(scheme: &Fp8Scheme, arch: &ArchInfo, src: &dyn TensorSource) -> String {
    use LayerTensor::*;
    let names = arch.names;
    let mut linears: Vec<String> = names.global(GlobalTensor::LmHead).into_iter().collect();
    for i in 0..arch.spec.num_layers {
        for t in [Q, K, V, Qkv, AttnOut, Gate, Up, Down] {
            linears.extend(names.layer(i, t));
        }
    }
    let (mut num_fp8, mut plain) = (0, vec![]);
    for name in linears {
        match src.info(&name).map(|i| i.dtype) {
            None => {}
            Some(SourceDType::F8E4M3) => num_fp8 += 1,
            Some(_) => plain.push(name.trim_end_matches(".weight").to_string()),
        }
    }
    let shown = plain.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    let unquantized = match plain.len() {
        0 => "none unquantized".to_string(),
        n if n <= 4 => format!("{n} unquantized ({shown})"),
        n => format!("{n} unquantized ({shown}, ...)"),
    };
    format!(
        "fp8 weights: {}; {num_fp8} linears in FP8, {unquantized}",
        scheme.describe()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scheme(config: Value) -> Fp8Scheme {
        match from_configs(&config, None).unwrap() {
            Quantization::Fp8(s) => s,
            Quantization::None | Quantization::Fp8Online => panic!("no scheme detected"),
        }
    }

    fn err(config: Value) -> String {
        from_configs(&config, None).unwrap_err().to_string()
    }

    fn ct(weights: Value, acts: Value, ignore: Value) -> Value {
        json!({"quantization_config": {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts}},
            "ignore": ignore}})
    }

    #[test]
    fn no_quantization_config_is_plain() {
        let q = from_configs(&json!({"model_type": "llama"}), None).unwrap();
        assert!(matches!(q, Quantization::None));
    }

    #[test]
    fn compressed_tensors_schemes() {
        let w = |strategy| json!({"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": true, "dynamic": false});
        let s = scheme(ct(
            w("tensor"),
            json!({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": false}),
            json!(["lm_head"]),
        ));
        assert_eq!(s.producer, Fp8Producer::CompressedTensors);
        assert_eq!(
            (s.weights, s.activations),
            (WeightScales::Tensor, Activations::Static)
        );
        assert!(!s.kv_cache_scales);
        let s = scheme(ct(
            w("channel"),
            json!({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true}),
            json!(["lm_head", "re:.*layers\\.0\\.mlp\\.down_proj$"]),
        ));
        assert_eq!(
            (s.weights, s.activations),
            (WeightScales::Channel, Activations::DynamicPerToken)
        );
        assert!(!s.quantizes("lm_head"));
        assert!(!s.quantizes("model.layers.0.mlp.down_proj"));
        assert!(s.quantizes("model.layers.10.mlp.down_proj"));
        assert!(s.quantizes("model.layers.0.mlp.up_proj"));
        assert_eq!(
            s.weight_scale_name("model.layers.0.mlp.up_proj"),
            "model.layers.0.mlp.up_proj.weight_scale"
        );
        let mut b = w("block");
        b["block_structure"] = json!([128, 128]);
        let mut c = ct(b, Value::Null, json!([]));
        c["quantization_config"]["kv_cache_scheme"] =
            json!({"num_bits": 8, "type": "float", "strategy": "tensor"});
        let s = scheme(c);
        assert_eq!(
            (s.weights, s.activations),
            (
                WeightScales::Block {
                    rows: 128,
                    cols: 128
                },
                Activations::WeightOnly
            )
        );
        assert!(s.kv_cache_scales);
        assert!(s.describe().contains("128x128 block weight scales"));
    }

    #[test]
    fn compressed_tensors_refusals_name_key_and_value() {
        let mut c = ct(
            json!({"num_bits": 8, "type": "float", "strategy": "tensor"}),
            Value::Null,
            json!([]),
        );
        c["quantization_config"]["format"] = json!("pack-quantized");
        assert_eq!(
            err(c),
            "config.json: quantization_config.format = \"pack-quantized\": ferrum loads \
             float-quantized (FP8) compressed-tensors checkpoints"
        );
        let e = err(ct(
            json!({"num_bits": 4, "type": "int", "strategy": "group"}),
            Value::Null,
            json!([]),
        ));
        assert!(
            e.contains("config_groups.group_0.weights.type = \"int\""),
            "{e}"
        );
        assert!(e.contains("num_bits = 4"), "{e}");
        let e = err(ct(
            json!({"num_bits": 8, "type": "float", "strategy": "group"}),
            Value::Null,
            json!([]),
        ));
        assert!(e.contains("weights.strategy = \"group\""), "{e}");
        let e = err(ct(
            json!({"num_bits": 8, "type": "float", "strategy": "tensor"}),
            Value::Null,
            json!(["re:("]),
        ));
        assert!(
            e.contains("quantization_config.ignore") && e.contains("re:("),
            "{e}"
        );
    }

    #[test]
    fn modelopt_from_hf_quant_config() {
        let m = json!({"producer": {"name": "modelopt", "version": "0.19"},
                       "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                        "exclude_modules": ["lm_head", "model.layers.0.mlp.*"]}});
        let Quantization::Fp8(s) = from_configs(&json!({}), Some(&m)).unwrap() else {
            panic!()
        };
        assert_eq!(s.producer, Fp8Producer::ModelOpt);
        assert_eq!(
            (s.weights, s.activations, s.kv_cache_scales),
            (WeightScales::Tensor, Activations::Static, true)
        );
        assert!(!s.quantizes("lm_head"));
        assert!(!s.quantizes("model.layers.0.mlp.down_proj"));
        assert!(s.quantizes("model.layers.1.mlp.down_proj"));
        assert!(s.quantizes("model.layers.0.self_attn.q_proj"));
        let m = json!({"quantization": {"quant_algo": "NVFP4"}});
        let e = from_configs(&json!({}), Some(&m)).unwrap_err().to_string();
        assert!(
            e.starts_with("hf_quant_config.json: quantization.quant_algo = \"NVFP4\""),
            "{e}"
        );
        // config.json's own modelopt entry.
        let s = scheme(json!({"quantization_config": {"quant_method": "modelopt",
            "quant_algo": "FP8", "kv_cache_quant_algo": null, "ignore": ["lm_head"]}}));
        assert_eq!(
            (s.producer, s.kv_cache_scales),
            (Fp8Producer::ModelOpt, false)
        );
        assert!(!s.quantizes("lm_head"));
    }

    #[test]
    fn fp8_and_fbgemm_schemes() {
        let s = scheme(json!({"quantization_config": {"quant_method": "fp8",
            "activation_scheme": "dynamic", "ignored_layers": ["model.layers.0.mlp.down_proj"]}}));
        assert_eq!(
            (s.producer, s.weights, s.activations),
            (
                Fp8Producer::Fp8,
                WeightScales::Tensor,
                Activations::DynamicPerTensor
            )
        );
        assert!(!s.quantizes("model.layers.0.mlp.down_proj"));
        assert!(s.quantizes("lm_head"));
        let s = scheme(
            json!({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
            "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}),
        );
        assert_eq!(
            s.weights,
            WeightScales::Block {
                rows: 128,
                cols: 128
            }
        );
        assert_eq!(s.activations, Activations::DynamicPerGroup { group: 128 });
        assert_eq!(s.weight_scale_name("m.q_proj"), "m.q_proj.weight_scale_inv");
        let e = err(
            json!({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e5m2"}}),
        );
        assert!(e.contains("quantization_config.fmt = \"e5m2\""), "{e}");
        let e = err(json!({"quantization_config": {"quant_method": "fp8"}}));
        assert!(e.contains("activation_scheme = null"), "{e}");
        let s = scheme(json!({"quantization_config": {"quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}}));
        assert_eq!(
            (s.producer, s.weights, s.activations),
            (
                Fp8Producer::FbgemmFp8,
                WeightScales::Channel,
                Activations::DynamicPerToken
            )
        );
        assert!(!s.quantizes("lm_head") && s.quantizes("model.layers.0.mlp.up_proj"));
        let e = err(json!({"quantization_config": {"quant_method": "gptq", "bits": 4}}));
        assert!(
            e.starts_with(
                "config.json: quantization_config.quant_method = \"gptq\": ferrum loads FP8"
            ),
            "{e}"
        );
    }

    #[test]
    fn module_filter_entries() {
        let f = ModuleFilter::parse(
            "config.json",
            "k",
            Some(&json!([
                "lm_head",
                "mlp.gate_proj",
                "model.layers.2",
                "re:.*\\.v_proj$",
                "*.layers.1.*.o_proj"
            ])),
        )
        .unwrap();
        for (name, ignored) in [
            ("lm_head", true),
            ("model.lm_head", true),
            ("model.not_lm_head", false),
            ("model.layers.0.mlp.gate_proj", true),
            ("model.layers.0.mlp.up_proj", false),
            ("model.layers.2.mlp.up_proj", true),
            ("model.layers.20.mlp.up_proj", false),
            ("model.layers.0.self_attn.v_proj", true),
            ("model.layers.0.self_attn.v_proj_x", false),
            ("model.layers.1.self_attn.o_proj", true),
            ("model.layers.11.self_attn.o_proj", false),
        ] {
            assert_eq!(f.matches(name), ignored, "{name}");
        }
    }
}
