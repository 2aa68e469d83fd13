//! The load-time warm-up: what would otherwise land in the first requests' latency (kernel
//! compilation, GEMM planning, graph capture) runs on scratch steps before the engine starts.

use super::workspace::Workspace;
use super::{CudaExecutor, device_err};
use crate::cuda::FloatElem;
use crate::cuda::gemm::tuned_m;
use crate::cuda::sampling::{RowSampling, SampleBatch};
use crate::model::decoder::Act;
use crate::sampling::Penalties;
use crate::scheduler::SchedulePlan;

/// The scratch steps of `CudaExecutor::warm_up`: one prefill of as many tokens as a step and a
/// sequence's blocks allow (none under 2 tokens: a 1-token chunk is a decode), and one decode
/// step per graph bucket, largest first (batch 1 without graphs), every sequence a single token
/// at position 0 of block 0. All of them write only the first blocks of the cache.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct WarmUpPlans {
    pub(super) prefill: Option<SchedulePlan>,
    pub(super) decode: Vec<SchedulePlan>,
}

impl WarmUpPlans {
    /// `max_tokens`: the step's token capacity; `num_blocks`: blocks one sequence may use (the
    /// cache's, capped by max_model_len); `buckets`: the decode graph buckets (empty: no graphs).
    pub(super) fn new(
        max_tokens: usize,
        num_blocks: usize,
        block_size: usize,
        buckets: &[usize],
    ) -> Self {
        let scratch = |i: usize, tokens: usize| crate::scheduler::ScheduledSeq {
            seq_id: crate::request::SeqId(i as u64),
            token_ids: vec![0; tokens],
            start_pos: 0,
            block_table: (0..tokens.div_ceil(block_size.max(1)))
                .map(|b| crate::kv_cache::BlockId(b as u32))
                .collect(),
            sample: true,
        };
        let plan = |seqs: Vec<crate::scheduler::ScheduledSeq>| SchedulePlan {
            num_batched_tokens: seqs.iter().map(|s| s.token_ids.len()).sum(),
            seqs,
            preempted: vec![],
        };
        let prefill_tokens = max_tokens.min(num_blocks * block_size);
        WarmUpPlans {
            prefill: (prefill_tokens >= 2).then(|| plan(vec![scratch(0, prefill_tokens)])),
            decode: match buckets {
                [] => vec![1],
                _ => buckets.iter().rev().copied().collect(),
            }
            .into_iter()
            .map(|b| plan((0..b).map(|i| scratch(i, 1)).collect()))
            .collect(),
        }
    }
}

/// What `CudaExecutor::warm_up` did, for the load log.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmUpReport {
    /// Tokens of the scratch prefill (0: none fit, e.g. max_num_batched_tokens 1).
    pub prefill_tokens: usize,
    /// Decode batch sizes stepped (the graph buckets, or batch 1 without graphs).
    pub decode_batches: Vec<usize>,
    /// Kernel modules compiled, GEMM shapes planned and graphs captured by the warm-up.
    pub modules_compiled: usize,
    /// GEMM shapes the warm-up planned (cuBLASLt algorithm chosen and cached).
    pub gemm_plans: usize,
    /// Decode graphs the warm-up captured (one per bucket that captured).
    pub graphs_captured: usize,
    /// Wall time of the whole warm-up, in seconds.
    pub seconds: f64,
}

impl WarmUpReport {
    /// One line for the load log: what was compiled, planned and captured, and how long it took.
    pub fn describe(&self) -> String {
        format!(
            "CUDA warm-up: prefill of {} tokens, decode batches {:?}: compiled {} kernel modules, planned {} GEMM shapes, captured {} graphs in {:.2} s",
            self.prefill_tokens,
            self.decode_batches,
            self.modules_compiled,
            self.gemm_plans,
            self.graphs_captured,
            self.seconds
        )
    }
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Runs, once before any request, what would otherwise land in the first requests' latency:
    /// the timed GEMM plans (`warm_up_gemms`), then the scratch steps of `WarmUpPlans`: a
    /// prefill (prefill kernels) and every decode graph bucket twice (decode and split-K
    /// kernels, the capture and a first replay), each step sampled on the device with a greedy
    /// row and a row with every filter, penalty and logprobs on (the sampler's kernels).
    ///
    /// The scratch tokens write the KV slots of the first blocks only; the cache holds no
    /// sequence yet, a sequence reads only slots it wrote or cached blocks some sequence
    /// computed (prefix caching registers blocks from real steps only, and the warm-up runs
    /// before the engine starts), so nothing of the warm-up is ever attended to. Errors here
    /// are load errors (the same steps would fail on the first request).
    pub fn warm_up(&mut self) -> crate::Result<WarmUpReport> {
        let start = std::time::Instant::now();
        let (modules, gemm_plans) = self.setup_counts();
        let vocab = self.decoder.spec.vocab_size;
        let mut history = crate::cuda::sampling::TokenHistory::new(&[1, 2, 3], vocab);
        history.accept(1);
        // One suppressed id (as min_tokens suppresses eos), unless that would leave nothing.
        let suppressed: &[u32] = if vocab > 1 { &[0] } else { &[] };
        let filtered = RowSampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            penalties: Penalties {
                repetition: 1.1,
                presence: 0.1,
                frequency: 0.1,
            },
            num_logprobs: Some(crate::request::MAX_LOGPROBS),
            uniform: 0.5,
        };
        let step = |exec: &mut Self, plan: &SchedulePlan| {
            let mut rows = SampleBatch::new();
            for i in 0..plan.seqs.len() {
                match i {
                    1 => rows.push(&RowSampling::greedy(), None, &[]),
                    _ => rows.push(&filtered, Some(&history), suppressed),
                }?;
            }
            exec.execute_and_sample(plan, &rows).map(|_| ())
        };
        let Some(mut ws) = self.ws.take() else {
            return Err(device_err("the step workspace is gone".into()));
        };
        let gemms = self.warm_up_gemms(&mut ws);
        self.ws = Some(ws);
        gemms?;
        let plans = WarmUpPlans::new(
            self.max_tokens,
            self.kv_shape.num_blocks.min(self.max_blocks),
            self.kv_shape.block_size,
            if self.graphs_enabled {
                &self.buckets
            } else {
                &[]
            },
        );
        // The profile (FERRUM_CUDA_PROFILE) times requests' steps, not these.
        let profile = self.profile.take();
        let ran = (|| -> crate::Result<()> {
            if let Some(prefill) = &plans.prefill {
                step(self, prefill)?;
            }
            for decode in &plans.decode {
                // The first run captures the bucket's graph, the second replays it.
                step(self, decode)?;
                step(self, decode)?;
            }
            Ok(())
        })();
        self.profile = profile;
        ran?;
        self.dev.synchronize()?;
        let prefill_tokens = plans.prefill.map_or(0, |p| p.num_batched_tokens);
        let decode_batches = plans.decode.iter().map(|p| p.seqs.len()).collect();
        let (modules_now, plans_now) = self.setup_counts();
        Ok(WarmUpReport {
            prefill_tokens,
            decode_batches,
            modules_compiled: modules_now - modules,
            gemm_plans: plans_now - gemm_plans,
            graphs_captured: self.graphs.values().filter(|g| g.is_some()).count(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Plans every GEMM a step may run at a timed size (`tuned_m`: candidates are timed on a
    /// shape's first use, tens of ms for a large one): the four layer products for every such
    /// m up to max_num_batched_tokens, the LM head for every such row count up to
    /// max_num_seqs. They run on layer 0's weights and whatever the step buffers hold: only
    /// their timings matter. Other m take the heuristic's plan on first use (no timing).
    pub(super) fn warm_up_gemms(&self, ws: &mut Workspace<T>) -> crate::Result<()> {
        let Some(lw) = self.w.layers.first() else {
            return Ok(());
        };
        let spec = &self.decoder.spec;
        let h = spec.hidden_size;
        let gated = spec.gate_up_dim() != spec.intermediate_size;
        for m in (1..=self.max_tokens).filter(|&m| tuned_m(m)) {
            let [normed, qkv, attn, attn_proj, mlp_out] = ws
                .acts
                .get_disjoint_mut(
                    [Act::Normed, Act::Qkv, Act::Attn, Act::AttnProj, Act::MlpOut].map(Act::idx),
                )
                .map_err(|_| device_err("warm-up: step buffers overlap".into()))?;
            normed.set_len(m * h)?;
            qkv.set_len(m * lw.qkv.n)?;
            self.linear(qkv, normed, &lw.qkv, m, &mut ws.fp8)?;
            attn.set_len(m * lw.attn_out.k)?;
            attn_proj.set_len(m * lw.attn_out.n)?;
            self.linear(attn_proj, attn, &lw.attn_out, m, &mut ws.fp8)?;
            ws.gate_up.set_len(m * lw.gate_up.n)?;
            self.linear(&mut ws.gate_up, normed, &lw.gate_up, m, &mut ws.fp8)?;
            let down_in = if gated {
                &mut ws.ffn_act
            } else {
                &mut ws.gate_up
            };
            down_in.set_len(m * lw.down.k)?;
            mlp_out.set_len(m * lw.down.n)?;
            self.linear(mlp_out, down_in, &lw.down, m, &mut ws.fp8)?;
        }
        for rows in (1..=self.max_seqs).filter(|&r| tuned_m(r)) {
            let [last_normed, logits] = ws
                .acts
                .get_disjoint_mut([Act::LastNormed.idx(), Act::Logits.idx()])
                .map_err(|_| device_err("warm-up: step buffers overlap".into()))?;
            last_normed.set_len(rows * h)?;
            logits.set_len(rows * spec.vocab_size)?;
            self.lm_head_into(logits, last_normed, rows)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::kv::{KvCacheConfig, max_blocks_per_seq, step_capacity};
    use super::super::pack::{StepLimits, pack_step};
    use super::super::step::graph_buckets;
    use super::*;
    use crate::kv_cache::KvCacheOptions;
    use crate::scheduler::BatchingOptions;

    fn cfg() -> KvCacheConfig {
        KvCacheConfig {
            kv: KvCacheOptions::default(),
            batching: BatchingOptions::default(),
            max_model_len: 4096,
        }
    }

    #[test]
    fn warm_up_plans_fit_every_step_capacity() {
        // (max_num_batched_tokens, max_num_seqs, block_size, max_model_len, cache blocks)
        let configs = [
            (2048, 64, 16, 4096, 100_000),
            (64, 4, 4, 128, 512),
            (1, 1, 16, 16, 1),
            (8, 256, 16, 2048, 40),
            (8192, 1, 32, 100, 2),
            (3, 2, 64, 64, 1),
        ];
        for (batched, seqs, block_size, max_model_len, cache_blocks) in configs {
            let mut cfg = KvCacheConfig {
                max_model_len,
                ..cfg()
            };
            cfg.kv.block_size = block_size;
            cfg.batching.max_num_batched_tokens = batched;
            cfg.batching.max_num_seqs = seqs;
            let (max_tokens, max_seqs) = step_capacity(&cfg);
            let max_blocks = max_blocks_per_seq(&cfg);
            for graphs in [true, false] {
                let buckets = if graphs {
                    graph_buckets(max_seqs)
                } else {
                    vec![]
                };
                // Largest bucket first; batch 1 without graphs.
                let batches: Vec<usize> = match graphs {
                    true => buckets.iter().rev().copied().collect(),
                    false => vec![1],
                };
                let plans = WarmUpPlans::new(
                    max_tokens,
                    cache_blocks.min(max_blocks),
                    block_size,
                    &buckets,
                );
                let lim = StepLimits {
                    block_size,
                    num_blocks: cache_blocks,
                    max_blocks,
                    max_tokens,
                    max_seqs,
                    buckets: &buckets,
                };
                let (mut host, mut rows) = (vec![], vec![]);
                let what = format!("{batched}/{seqs}/{block_size}/{max_model_len}/{cache_blocks}");
                if let Some(p) = &plans.prefill {
                    let l = pack_step(p, &lim, &mut host, &mut rows).unwrap();
                    assert_eq!((l.num_prefill, l.num_decode), (1, 0), "{what}");
                    assert!(l.num_tokens >= 2 && l.num_tokens <= max_tokens, "{what}");
                }
                assert_eq!(plans.decode.len(), batches.len());
                for (p, &b) in plans.decode.iter().zip(&batches) {
                    let l = pack_step(p, &lim, &mut host, &mut rows).unwrap();
                    assert_eq!(l.num_decode, b, "{what}");
                    // With graphs each batch is its own bucket: the capture the warm-up wants.
                    assert_eq!(l.bucket, graphs.then_some(b), "{what}");
                }
            }
        }
        // A prefill takes as many tokens as the step and one sequence's blocks allow.
        let p = WarmUpPlans::new(2048, 8, 16, &[]);
        assert_eq!(p.prefill.unwrap().num_batched_tokens, 128);
        assert!(WarmUpPlans::new(1, 8, 16, &[]).prefill.is_none());
    }
}
