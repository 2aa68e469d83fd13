//! Model configuration: any bytes as the JSON Triton hands the backend for a config.pbtxt
//! (`TRITONBACKEND_ModelConfig`), through what model load does with it: auto-completion of the
//! inputs and outputs (`backend::autocomplete::complete`), the Triton-level facts
//! (`ModelConfigInfo`) and the strict `parameters` → `BackendConfig` parse with its range checks.
//! Paths resolve against a scratch model folder holding `1/model.gguf` and `tokenizer/`, so the
//! checks after path resolution are reached. Errors are expected; a panic, abort, hang or
//! out-of-memory is a bug.

use std::path::PathBuf;
use std::sync::OnceLock;

use triton_ferrum::backend::autocomplete;
use triton_ferrum::config::{BackendConfig, ModelConfigInfo, ModelLocation};

/// `<tmp>/ferrum-fuzz-config/m` with `1/model.gguf` (empty: only its existence is checked here)
/// and `tokenizer/`.
fn location() -> &'static ModelLocation {
    static LOC: OnceLock<ModelLocation> = OnceLock::new();
    LOC.get_or_init(|| {
        let model_dir: PathBuf = std::env::temp_dir().join("ferrum-fuzz-config").join("m");
        let version_dir = model_dir.join("1");
        let made = std::fs::create_dir_all(&version_dir)
            .and_then(|()| std::fs::create_dir_all(model_dir.join("tokenizer")))
            .and_then(|()| std::fs::write(version_dir.join("model.gguf"), b""));
        if let Err(e) = made {
            panic!(
                "cannot make the scratch model folder {}: {e}",
                model_dir.display()
            );
        }
        ModelLocation {
            model_dir,
            version_dir,
        }
    })
}

/// Runs one input; true when it parsed into a `BackendConfig` (what the corpus replay test checks
/// of the seeds).
pub fn run(data: &[u8]) -> bool {
    let Ok(config) = serde_json::from_slice::<serde_json::Value>(data) else {
        return false;
    };
    let _ = autocomplete::complete(&config);
    let _ = ModelConfigInfo::from_model_config(&config);
    match BackendConfig::from_model_config(&config, location()) {
        Ok(_) => true,
        Err(e) => {
            // Every error renders (its Display is what the model-load failure says).
            let _ = e.to_string();
            false
        }
    }
}
