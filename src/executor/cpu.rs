//! The CPU executor: owns the decoder and a host paged KV cache, flattens a `SchedulePlan` into
//! one batch and runs the generic decoder over it (attention reads the blocks in place).

use super::{Executor, Logits};
use crate::model::decoder::{BatchInput, Decoder};
use crate::ops::attention::{AttnSeq, KvLayerCache};
use crate::scheduler::SchedulePlan;

pub struct CpuExecutor {
    decoder: Decoder,
    /// Every step runs inside this pool: kernels called from a thread outside a rayon pool pay a
    /// cross-thread injection (~20 µs) per parallel call, hundreds of times per step.
    pool: rayon::ThreadPool,
    /// One cache per layer.
    kv: Vec<KvLayerCache>,
    num_blocks: usize,
    block_size: usize,
}

impl CpuExecutor {
    /// `num_threads`: 0 means one per available core.
    pub fn new(
        decoder: Decoder,
        num_blocks: usize,
        block_size: usize,
        num_threads: usize,
    ) -> crate::Result<Self> {
        let kv_dim = decoder.spec.kv_dim();
        let kv = (0..decoder.spec.num_layers)
            .map(|_| KvLayerCache::new(num_blocks, block_size, kv_dim))
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .thread_name(|i| format!("ferrum-cpu-{i}"))
            .build()
            .map_err(|e| crate::Error::Device(format!("cannot start the CPU thread pool: {e}")))?;
        Ok(CpuExecutor {
            decoder,
            pool,
            kv,
            num_blocks,
            block_size,
        })
    }

    /// Bytes of KV cache per token position (all layers, K and V, f32).
    pub fn kv_bytes_per_token(spec: &crate::model::DecoderSpec) -> usize {
        spec.num_layers * 2 * spec.kv_dim() * 4
    }
}

impl Executor for CpuExecutor {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.pool.current_num_threads())
    }

    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn vocab_size(&self) -> usize {
        self.decoder.spec.vocab_size
    }

    fn execute(&mut self, plan: &SchedulePlan) -> crate::Result<Logits> {
        let bs = self.block_size;
        let num_tokens = plan.num_batched_tokens;
        let mut token_ids = Vec::with_capacity(num_tokens);
        let mut positions = Vec::with_capacity(num_tokens);
        let mut slots = Vec::with_capacity(num_tokens);
        let mut logits_rows = Vec::new();
        let tables: Vec<Vec<u32>> = plan
            .seqs
            .iter()
            .map(|s| s.block_table.iter().map(|b| b.0).collect())
            .collect();
        let mut seqs = Vec::with_capacity(plan.seqs.len());
        for (s, table) in plan.seqs.iter().zip(&tables) {
            let q_start = token_ids.len();
            for (i, &id) in s.token_ids.iter().enumerate() {
                let pos = s.start_pos + i;
                token_ids.push(id);
                positions.push(pos);
                slots.push(table[pos / bs] as usize * bs + pos % bs);
            }
            if s.sample {
                logits_rows.push(token_ids.len() - 1);
            }
            seqs.push(AttnSeq {
                q_start,
                q_len: s.token_ids.len(),
                context_len: s.start_pos + s.token_ids.len(),
                block_table: table,
            });
        }
        let input = BatchInput {
            token_ids: &token_ids,
            positions: &positions,
            slots: &slots,
            seqs: &seqs,
            logits_rows: &logits_rows,
        };
        let (decoder, kv) = (&self.decoder, &mut self.kv);
        let data = self.pool.install(|| decoder.forward(kv, bs, &input));
        Ok(Logits {
            vocab_size: self.decoder.spec.vocab_size,
            data,
        })
    }
}
