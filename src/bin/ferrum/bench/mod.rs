//! `ferrum bench`: offline speed of the engine on real or random weights, as text and JSON.
//!
//! Owns the flags (`BenchArgs`), opening the model both workloads run on (a checkpoint, or a
//! preset's random weights) and the choice of workload:
//! - `fixed`: N requests of fixed prompt/output length at once, per batch size;
//! - `mixed`: in-flight vs static batching on a seeded mixed-length workload.
//!
//! Both build on `common` (engine options, prompt ids, and `submit_and_time`, the one place that
//! submits bench requests and timestamps their tokens); neither imports the other. No workload
//! may report a rate that is not computed from those token arrival times.

use clap::{Args, ValueEnum};
use triton_ferrum::model::Checkpoint;

use crate::{CliResult, EngineArgs};
use common::BenchModel;
use mixed::MixedArgs;

mod common;
mod fixed;
mod mixed;

/// Which requests a bench submits, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// N requests of --prompt-len/--gen-len at once, for each --batch-size N.
    Fixed,
    /// A seeded mixed-length workload run with in-flight and with static batching at equal KV
    /// cache capacity (see the "Mixed workload" flags).
    Mixed,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Random weights at the shapes of a named model instead of --model (see `model::presets`).
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    /// Prompt tokens of every request (--workload fixed).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Output tokens of every request (--workload fixed).
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// The first N prompt tokens are the same in every request and every run, like a system
    /// prompt (--workload fixed; at most --prompt-len). With --enable-kv-cache-reuse true the
    /// warm-up pass leaves them cached, so measured runs start from the cached prefix.
    #[arg(long, default_value_t = 0)]
    shared_prefix_len: usize,
    /// Requests submitted at once; comma-separated for several runs, e.g. 1,4,16 (default 1).
    /// With --workload mixed: one value B, the most sequences running at once in both modes
    /// (it sets max_num_seqs; default 64).
    #[arg(long, value_delimiter = ',')]
    batch_size: Option<Vec<usize>>,
    /// fixed: prompt/gen lengths of --prompt-len/--gen-len; mixed: in-flight vs static batching
    /// on a seeded mixed-length workload.
    #[arg(long, value_enum, default_value_t = Workload::Fixed)]
    workload: Workload,
    #[command(flatten)]
    mixed: MixedArgs,
    /// Print one JSON object per batch size (mixed: per mode and round, plus a summary)
    /// instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> CliResult {
    let (ckpt, source) = match (&a.preset, &a.engine.model) {
        (Some(p), _) => (
            Checkpoint::random(p, 0)?,
            format!("preset {p} (random weights)"),
        ),
        (None, Some(m)) => (
            Checkpoint::open(m, a.engine.tokenizer.as_deref())?,
            m.display().to_string(),
        ),
        (None, None) => return Err("one of --model or --preset is required".into()),
    };
    let model = BenchModel { ckpt, source };
    match a.workload {
        Workload::Fixed => fixed::run(&a, model),
        Workload::Mixed => {
            let batch_size = match a.batch_size.as_deref() {
                None => mixed::DEFAULT_BATCH_SIZE,
                Some(&[b]) => b,
                Some(bs) => {
                    return Err(
                        format!("--workload mixed takes one --batch-size, got {bs:?}").into(),
                    );
                }
            };
            mixed::run(model, &a.engine, batch_size, &a.mixed, a.json)
        }
    }
}
