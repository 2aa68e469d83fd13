//! The Triton backend: `libtriton_ferrum.so`'s entry points (exported by
//! `triton_api::declare_backend!`), model and instance state, and the glue from Triton
//! requests to the engine. Data flow: Execute (Triton's thread) copies and validates each
//! request (`parse`), creates its response factory and hands it to the model's response thread
//! (`respond::Responder`), which submits it to the engine, streams events back as responses,
//! polls for cancellation and reports statistics. Execute never blocks on generation.
//!
//! One engine per model, started in ModelInitialize; instances (KIND_CPU, count 1 by default)
//! only feed it. This module is the only user of `triton_api`; it must never touch device code
//! directly (the engine owns the device).

pub mod autocomplete;
pub mod metrics;
pub mod parse;
pub mod respond;

use triton_api::{
    ErrorCode, InstanceGroupKind, InstanceHandle, Model, Request, ResponseFactory, TritonError,
    triton_log,
};

use crate::config::{BackendConfig, ModelConfigInfo, ModelLocation};
use crate::engine::{Engine, EngineHandle};
use parse::{ParseContext, RawRequest};
use respond::{Job, NewJob, Responder, ResponderSetup, ResponseSender};

/// The `Backend` implementation Triton talks to.
pub struct FerrumBackend;

triton_api::declare_backend!(FerrumBackend);

/// Everything a loaded model owns. Dropped in ModelFinalize: the responder first (in-flight
/// requests get a final error response), then the engine (its thread is joined and its memory
/// freed).
pub struct ModelState {
    name: String,
    info: ModelConfigInfo,
    config: BackendConfig,
    responder: Option<Responder>,
    handle: EngineHandle,
    engine: Option<Engine>,
}

impl Drop for ModelState {
    fn drop(&mut self) {
        drop(self.responder.take());
        if let Some(mut engine) = self.engine.take() {
            engine.shutdown();
        }
        triton_log!(
            triton_api::log::Level::Info,
            "ferrum: model '{}' unloaded",
            self.name
        );
    }
}

/// One model instance: only its handle, whose id `instance_finalize` drains the instance's
/// requests by. Instances own no engine; they feed their model's.
pub struct InstanceState {
    handle: InstanceHandle,
}

fn model_error(name: &str, e: impl std::fmt::Display) -> TritonError {
    TritonError::invalid_arg(format!("ferrum model '{name}': {e}"))
}

impl triton_api::entry::Backend for FerrumBackend {
    type Model = ModelState;
    type Instance = InstanceState;

    fn initialize() -> Result<(), TritonError> {
        triton_log!(
            triton_api::log::Level::Info,
            "ferrum backend {} initialized (Triton backend API {}.{}+)",
            env!("CARGO_PKG_VERSION"),
            triton_api::BACKEND_API_VERSION.0,
            triton_api::BACKEND_API_VERSION.1
        );
        Ok(())
    }

    fn preferred_instance_group() -> Option<(InstanceGroupKind, u64)> {
        // The engine drives its device(s) itself (like tensorrtllm_backend): one CPU instance.
        Some((InstanceGroupKind::Cpu, 1))
    }

    fn model_initialize(model: &Model<'_>) -> Result<ModelState, TritonError> {
        let name = model.name()?;
        let version = model.version()?;
        let model_dir = model.repository_path()?;
        let mut config = read_config(model, &name)?;
        if model.auto_complete_config()?
            && let Some(completed) = autocomplete::complete(&config)
        {
            model
                .set_config_json(&completed.to_string())
                .map_err(|e| e.context("setting the auto-completed config"))?;
            config = read_config(model, &name)?;
        }
        let loc = ModelLocation {
            version_dir: model_dir.join(version.to_string()),
            model_dir,
        };
        let backend_config =
            BackendConfig::from_model_config(&config, &loc).map_err(|e| model_error(&name, e))?;
        let info = ModelConfigInfo::from_model_config(&config);
        triton_log!(
            triton_api::log::Level::Info,
            "ferrum: loading model '{name}' from {} (device {:?})",
            backend_config.engine.model.display(),
            backend_config.engine.device
        );
        // The engine times every request when the vLLM metrics (which observe the timings) are on.
        let engine_options = crate::engine::EngineOptions {
            report_timings: backend_config.metrics.vllm,
            ..backend_config.engine.clone()
        };
        let loaded =
            crate::engine::options::start(&engine_options).map_err(|e| model_error(&name, e))?;
        triton_log!(
            triton_api::log::Level::Info,
            "ferrum: model '{name}' ready on {}: {} weights ({:.1} MiB), {} KV blocks of {} tokens, context {} tokens, max_batch_size {}, decoupled {}",
            loaded.device,
            // The GPU keeps weights in its dtype; the CPU in its weight format (f32 or q8).
            if loaded.device.starts_with("cuda") {
                crate::engine::options::dtype_name(loaded.dtype).to_owned()
            } else {
                format!("{:?}", loaded.weight_format).to_lowercase()
            },
            loaded.weight_bytes as f64 / (1 << 20) as f64,
            loaded.num_kv_blocks,
            loaded.block_size,
            loaded.max_model_len,
            info.max_batch_size,
            info.decoupled
        );
        let handle = loaded.engine.handle();
        // Metrics are optional: a server started with --allow-metrics=false still serves.
        let model_metrics = metrics::ModelMetrics::new(
            &name,
            version,
            backend_config.metrics,
            loaded.max_model_len,
        );
        let responder = Responder::start(ResponderSetup {
            model_name: name.clone(),
            engine: handle.clone(),
            incidents: loaded.engine.incidents(),
            timings: loaded.engine.request_timings(),
            batched: info.max_batch_size > 0,
            declared_outputs: info.outputs.clone(),
            tokenizer: handle.info().tokenizer.clone(),
            metrics: model_metrics,
        })?;
        Ok(ModelState {
            name,
            info,
            config: backend_config,
            responder: Some(responder),
            handle,
            engine: Some(loaded.engine),
        })
    }

    fn model_finalize(state: ModelState) {
        drop(state);
    }

    fn instance_initialize(
        model: &ModelState,
        instance: InstanceHandle,
    ) -> Result<InstanceState, TritonError> {
        let kind = instance.kind()?;
        triton_log!(
            triton_api::log::Level::Info,
            "ferrum: instance '{}' ({kind:?}) of model '{}' feeds the model's engine",
            instance.name().unwrap_or_default(),
            model.name
        );
        Ok(InstanceState { handle: instance })
    }

    fn instance_finalize(model: &ModelState, state: InstanceState) {
        // The instance handle must not be used after this returns: answer its requests now.
        if let Some(r) = &model.responder {
            r.drain(state.handle.id());
        }
    }

    fn execute(
        model: &ModelState,
        _instance: &InstanceState,
        handle: InstanceHandle,
        requests: Vec<Request>,
    ) {
        let exec_start = triton_api::now_ns();
        let num_requests = requests.len() as u64;
        for request in requests {
            model.accept(request, handle, exec_start);
        }
        let exec_end = triton_api::now_ns();
        if let Err(e) =
            handle.report_batch_statistics(num_requests, exec_start, exec_start, exec_end, exec_end)
        {
            triton_api::log::warn(&format!("cannot report batch statistics: {e}"));
        }
    }
}

fn read_config(model: &Model<'_>, name: &str) -> Result<serde_json::Value, TritonError> {
    let json = model.config_json()?;
    serde_json::from_str(&json)
        .map_err(|e| model_error(name, crate::config::ConfigError::Json(e.to_string())))
}

/// Copies a request's inputs and parameters out of Triton.
fn read_request(request: &Request) -> Result<RawRequest, TritonError> {
    let mut raw = RawRequest::default();
    for name in request.input_names()? {
        if let Some(t) = request.input(&name)? {
            raw.inputs.push(t);
        }
    }
    raw.params = request.parameters()?;
    Ok(raw)
}

impl ModelState {
    /// Validates one request and hands it to the responder; a bad request gets its error
    /// response here and is released.
    fn accept(&self, request: Request, instance: InstanceHandle, exec_start: u64) {
        let factory = match ResponseFactory::new(&request) {
            Ok(f) => f,
            Err(e) => {
                request.respond_error(&e);
                return;
            }
        };
        let job = Job::new(request, ResponseSender::new(factory), instance, exec_start);
        let parsed = job.read(read_request).and_then(|raw| {
            let ctx = ParseContext {
                max_batch_size: self.info.max_batch_size,
                decoupled: self.info.decoupled,
                model: self.handle.info(),
                defaults: &self.config.defaults,
                ignored_parameters: &self.config.ignored_request_parameters,
            };
            parse::parse(&raw, &ctx).map_err(|e| TritonError::invalid_arg(e.to_string()))
        });
        match parsed {
            Ok(parsed) => match &self.responder {
                Some(r) => r.submit(NewJob { job, parsed }),
                None => job.fail(&TritonError::new(
                    ErrorCode::Unavailable,
                    "the model is shutting down",
                )),
            },
            Err(e) => {
                triton_log!(
                    triton_api::log::Level::Verbose,
                    "ferrum: rejected a request of '{}': {e}",
                    self.name
                );
                job.fail(&e);
            }
        }
    }
}
