//! `BackendConfig` parsing: every key's default, range and error naming the key and value.
#![allow(clippy::unwrap_used)]

use super::*;
use serde_json::json;

fn loc(dir: &Path) -> ModelLocation {
    ModelLocation {
        model_dir: dir.to_path_buf(),
        version_dir: dir.join("1"),
    }
}

fn tmp_model_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrum-config-{name}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(dir.join("1/model.gguf"), b"x").unwrap();
    std::fs::write(dir.join("top.gguf"), b"x").unwrap();
    dir
}

fn params(pairs: &[(&str, &str)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in pairs {
        m.insert(k.to_string(), json!({ "string_value": v }));
    }
    json!({ "parameters": m })
}

#[test]
fn defaults_and_relative_paths() {
    let dir = tmp_model_dir("defaults");
    let c = BackendConfig::from_model_config(&params(&[("model_path", "model.gguf")]), &loc(&dir))
        .unwrap();
    let o = &c.engine;
    assert_eq!(o.model, dir.join("1/model.gguf"));
    assert_eq!(o.device, Device::Auto);
    assert_eq!(o.batching.max_num_seqs, 64);
    assert_eq!(o.batching.max_queue_size, Some(DEFAULT_QUEUE_PER_SEQ * 64));
    assert_eq!(o.batching.queue_timeout, None);
    assert_eq!(o.batching.max_num_batched_tokens, 2048);
    assert_eq!(o.kv.block_size, 16);
    assert_eq!(o.kv.free_gpu_mem_fraction, 0.9);
    assert!(o.batching.enable_chunked_prefill);
    assert_eq!(o.batching.policy, SchedulerPolicy::MaxUtilization);
    assert!(o.cuda.cuda_graphs && o.cuda.warm_up && !o.cuda.profile);
    assert!(
        !o.batching.enable_prefix_caching,
        "off by default, as in tensorrtllm_backend"
    );
    assert!(!o.progress);
    assert_eq!(c.defaults.max_tokens, DEFAULT_MAX_TOKENS);
    // The OpenAI frontend's chat requests never send the flag: the prompt stays out.
    assert!(c.defaults.exclude_input_in_output);
    assert_eq!(
        c.metrics,
        MetricSets {
            trtllm: true,
            vllm: true
        }
    );
    assert!(!o.report_timings, "set by the backend, not parsed");
    // Relative to the model folder when not in the version folder.
    let c = BackendConfig::from_model_config(&params(&[("model_path", "top.gguf")]), &loc(&dir))
        .unwrap();
    assert_eq!(c.engine.model, dir.join("top.gguf"));
    // No model_path: the version folder itself.
    let c = BackendConfig::from_model_config(&json!({}), &loc(&dir)).unwrap();
    assert_eq!(c.engine.model, dir.join("1"));
}

#[test]
fn every_key_parses_into_engine_options() {
    let dir = tmp_model_dir("all");
    let abs = dir.join("top.gguf");
    let c = BackendConfig::from_model_config(
        &params(&[
            ("model_path", abs.to_str().unwrap()),
            ("tokenizer_path", "."),
            ("device", "cuda"),
            ("gpu_device_ids", "2, 3"),
            ("tensor_parallel_size", "2"),
            ("weight_format", "f32"),
            ("dtype", "float16"),
            ("quantization", "fp8"),
            ("kv_cache_dtype", "fp8"),
            ("max_num_seqs", "8"),
            ("max_queue_size", "16"),
            ("queue_timeout_microseconds", "250000"),
            ("max_num_batched_tokens", "512"),
            ("max_tokens_in_paged_kv_cache", "4096"),
            ("kv_cache_free_gpu_mem_fraction", "0.5"),
            ("block_size", "32"),
            ("max_model_len", "1024"),
            ("enable_chunked_context", "false"),
            ("batch_scheduler_policy", "GUARANTEED_NO_EVICT"),
            ("enable_kv_cache_reuse", "true"),
            ("cuda_graph_mode", "false"),
            ("cuda_warmup", "0"),
            ("exclude_input_in_output", "FALSE"),
            ("apply_chat_template", "1"),
            ("enable_trtllm_metrics", "false"),
            ("enable_vllm_metrics", "no"),
            ("default_max_tokens", "7"),
            ("default_temperature", "0.5"),
            ("default_top_k", "40"),
            ("default_top_p", "0.9"),
            ("default_min_p", "0.05"),
            ("default_repetition_penalty", "1.1"),
        ]),
        &loc(&dir),
    )
    .unwrap();
    assert_eq!(c.engine.model, abs);
    assert_eq!(c.engine.tokenizer, Some(dir.join("1/.")));
    assert_eq!(c.engine.parallel.gpu_device_ids, vec![2, 3]);
    assert_eq!(c.engine.parallel.tensor_parallel_size, 2);
    assert!(!c.defaults.exclude_input_in_output && c.defaults.apply_chat_template);
    assert_eq!(c.defaults.max_tokens, 7);
    assert_eq!(
        c.metrics,
        MetricSets {
            trtllm: false,
            vllm: false
        }
    );
    assert_eq!(c.defaults.sampling.top_k, 40);
    assert_eq!(c.defaults.sampling.repetition_penalty, 1.1);
    let o = &c.engine;
    assert_eq!(o.device, Device::Cuda { ordinal: 2 });
    assert_eq!(o.weight_format, Some(WeightFormat::F32));
    assert_eq!(o.dtype, Some(DType::F16));
    assert_eq!(o.quantization, QuantizationOption::Fp8);
    assert_eq!(o.kv.dtype, KvCacheDtype::Fp8);
    assert_eq!(o.kv.free_gpu_mem_fraction, 0.5);
    assert_eq!(
        (
            o.batching.max_num_seqs,
            o.batching.max_num_batched_tokens,
            o.kv.block_size
        ),
        (8, 512, 32)
    );
    assert_eq!(o.kv.max_tokens, Some(4096));
    assert_eq!(o.max_model_len, Some(1024));
    assert_eq!(o.batching.max_queue_size, Some(16));
    assert_eq!(
        o.batching.queue_timeout,
        Some(std::time::Duration::from_millis(250))
    );
    assert!(!o.batching.enable_chunked_prefill);
    assert_eq!(o.batching.policy, SchedulerPolicy::GuaranteedNoEvict);
    assert!(o.batching.enable_prefix_caching);
    assert!(!o.cuda.cuda_graphs && !o.cuda.warm_up);
}

#[test]
fn bad_keys_and_values_name_key_and_value() {
    let dir = tmp_model_dir("bad");
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (&[("max_num_seq", "8")], &["max_num_seq"]),
        (
            &[("enable_kv_cache_reuse", "sometimes")],
            &["enable_kv_cache_reuse", "sometimes"],
        ),
        (&[("device", "tpu")], &["device", "tpu"]),
        (
            &[("batch_scheduler_policy", "fcfs")],
            &["batch_scheduler_policy", "fcfs", "guaranteed_no_evict"],
        ),
        (&[("max_num_seqs", "0")], &["max_num_seqs", "'0'"]),
        (&[("max_num_seqs", "lots")], &["max_num_seqs", "lots"]),
        (&[("max_queue_size", "-1")], &["max_queue_size", "-1"]),
        (
            &[("queue_timeout_microseconds", "3600000001")],
            &[
                "queue_timeout_microseconds",
                "3600000001",
                "[0, 3600000000]",
            ],
        ),
        (
            &[("block_size", "24")],
            &["block_size", "24", "power of two"],
        ),
        (
            &[("kv_cache_free_gpu_mem_fraction", "1.5")],
            &["kv_cache_free_gpu_mem_fraction", "1.5"],
        ),
        (
            &[("enable_chunked_context", "maybe")],
            &["enable_chunked_context", "maybe"],
        ),
        (&[("cuda_graph_mode", "on")], &["cuda_graph_mode", "on"]),
        (&[("cuda_warmup", "2")], &["cuda_warmup", "2"]),
        (
            &[("enable_vllm_metrics", "all")],
            &["enable_vllm_metrics", "all", "true or false"],
        ),
        (
            &[("enable_trtllm_metrics", "off")],
            &["enable_trtllm_metrics", "off"],
        ),
        (&[("weight_format", "int4")], &["weight_format", "int4"]),
        (&[("dtype", "int8")], &["dtype", "int8", "bfloat16"]),
        (
            &[("quantization", "int4")],
            &["quantization", "int4", "auto or fp8"],
        ),
        (
            &[("kv_cache_dtype", "fp8_e5m2")],
            &["kv_cache_dtype", "fp8_e5m2", "auto, fp8 or fp8_e4m3"],
        ),
        (
            &[("device", "cpu"), ("dtype", "bfloat16")],
            &["dtype", "bfloat16", "CPU engine computes in float32"],
        ),
        (&[("default_top_p", "0")], &["default_top_p", "(0, 1]"]),
        (
            &[("default_temperature", "-1")],
            &["default_temperature", "-1"],
        ),
        (
            &[("model_path", "missing.gguf")],
            &["model_path", "missing.gguf", "1/missing.gguf"],
        ),
        (&[("gpu_device_ids", "a,b")], &["gpu_device_ids", "a,b"]),
        (
            &[("tensor_parallel_size", "0")],
            &["tensor_parallel_size", "'0'", "1", "64"],
        ),
        (
            &[("tensor_parallel_size", "two")],
            &["tensor_parallel_size", "two"],
        ),
        (
            &[("device", "cpu"), ("gpu_device_ids", "0")],
            &["gpu_device_ids", "cpu"],
        ),
    ];
    for (pairs, needles) in cases {
        let err = BackendConfig::from_model_config(&params(pairs), &loc(&dir))
            .unwrap_err()
            .to_string();
        for n in *needles {
            assert!(err.contains(n), "{pairs:?}: '{err}' lacks '{n}'");
        }
    }
    let not_string = json!({ "parameters": { "device": { "int_value": 3 } } });
    let err = BackendConfig::from_model_config(&not_string, &loc(&dir)).unwrap_err();
    assert_eq!(
        err,
        ConfigError::NotAString {
            key: "device".into()
        }
    );
}

#[test]
fn parameter_keys_list_matches_the_parser() {
    // Every listed key is accepted (an unknown one would fail), and the count matches the
    // struct, so the list used by docs cannot drift.
    let dir = tmp_model_dir("keys");
    for key in PARAMETER_KEYS {
        let err = BackendConfig::from_model_config(&params(&[(key, "@@")]), &loc(&dir))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("unknown field"), "{key}: {err}");
    }
    let err = BackendConfig::from_model_config(&params(&[("nope", "1")]), &loc(&dir))
        .unwrap_err()
        .to_string();
    for key in PARAMETER_KEYS {
        assert!(
            err.contains(key),
            "serde's list of expected keys lacks {key}: {err}"
        );
    }
}

#[test]
fn model_config_info_reads_batch_size_and_policy() {
    let i = ModelConfigInfo::from_model_config(
        &json!({"max_batch_size": 8, "model_transaction_policy": {"decoupled": true},
                "output": [{"name": "text_output"}, {"name": "finish_reason"}]}),
    );
    assert_eq!(
        i,
        ModelConfigInfo {
            max_batch_size: 8,
            decoupled: true,
            outputs: vec!["text_output".into(), "finish_reason".into()],
        }
    );
    assert_eq!(
        ModelConfigInfo::from_model_config(&json!({})),
        ModelConfigInfo {
            max_batch_size: 0,
            decoupled: false,
            outputs: vec![],
        }
    );
}
