//! How the CUDA executor runs steps, beside the KV cache sizing: graphs, profiling, warm-up
//! (`EngineOptions::cuda`). Plain settings, no CUDA types: the engine and the config name them
//! without reaching into `executor::cuda`. The `FERRUM_CUDA_*` environment overrides are applied once, when an
//! engine starts (`engine::options::start`), never inside the executor.

/// How the executor runs steps (beside the KV cache sizing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaExecOptions {
    /// Capture pure decode steps as CUDA graphs per batch-size bucket and replay them
    /// (`cuda_graph_mode`; dumping intermediates turns them off).
    pub cuda_graphs: bool,
    /// Time every op of eager decode steps with CUDA events; the table is printed to stderr
    /// when the executor is dropped. Turns graphs off.
    pub profile: bool,
    /// Run `CudaExecutor::warm_up` at load (compile, plan and capture before the first request;
    /// `cuda_warmup`).
    pub warm_up: bool,
}

impl Default for CudaExecOptions {
    fn default() -> Self {
        CudaExecOptions {
            cuda_graphs: true,
            profile: false,
            warm_up: true,
        }
    }
}

impl CudaExecOptions {
    /// The defaults, overridden by the environment (`overridden_by_env`).
    pub fn from_env() -> Self {
        CudaExecOptions::default().overridden_by_env()
    }

    /// These options, each overridden by its environment variable when set:
    /// `FERRUM_CUDA_GRAPHS`, `FERRUM_CUDA_WARMUP`, `FERRUM_CUDA_PROFILE` (`0`, `false`, `off` or
    /// empty: off; anything else: on). For measurements and debugging; models set the first two
    /// with `cuda_graph_mode` and `cuda_warmup`.
    pub fn overridden_by_env(self) -> Self {
        self.overridden_by(|name| std::env::var(name).ok())
    }

    /// `overridden_by_env` with the variables read from `var`.
    pub fn overridden_by(self, var: impl Fn(&str) -> Option<String>) -> Self {
        let flag =
            |name: &str| var(name).map(|v| !matches!(v.as_str(), "" | "0" | "false" | "off"));
        CudaExecOptions {
            cuda_graphs: flag("FERRUM_CUDA_GRAPHS").unwrap_or(self.cuda_graphs),
            profile: flag("FERRUM_CUDA_PROFILE").unwrap_or(self.profile),
            warm_up: flag("FERRUM_CUDA_WARMUP").unwrap_or(self.warm_up),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_only_the_options_it_sets() {
        let base = CudaExecOptions {
            cuda_graphs: false,
            profile: false,
            warm_up: true,
        };
        assert_eq!(base.clone().overridden_by(|_| None), base);
        let env = |name: &str| match name {
            "FERRUM_CUDA_GRAPHS" => Some("1".to_owned()),
            "FERRUM_CUDA_WARMUP" => Some("off".to_owned()),
            _ => None,
        };
        assert_eq!(
            base.clone().overridden_by(env),
            CudaExecOptions {
                cuda_graphs: true,
                profile: false,
                warm_up: false,
            }
        );
        let empty = |name: &str| (name == "FERRUM_CUDA_WARMUP").then(String::new);
        assert!(!base.overridden_by(empty).warm_up);
    }
}
