//! The step buffers of the CUDA executor, allocated once for the largest step and reused at
//! fixed addresses (so decode steps can be replayed as graphs).

use super::CudaExecutor;
use super::forward::{attention_params, use_splitk};
use super::kv::{KvCacheConfig, max_blocks_per_seq};
use super::pack::StepLayout;
use crate::cuda::attention::{SplitKPlan, SplitKWorkspace};
use crate::cuda::gemm::fp8::Fp8Activations;
use crate::cuda::{CudaDevice, DeviceBuffer, FloatElem};
use crate::dtype::DType;
use crate::model::DecoderSpec;
use crate::model::decoder::Act;

/// Partials the split-K workspace must hold so that every batch of 1..=max_num_seqs decode rows
/// can split as `SplitKPlan::choose` says for contexts up to max_model_len.
pub(super) fn splitk_capacity(
    spec: &DecoderSpec,
    cfg: &KvCacheConfig,
    num_sms: usize,
    dtype: DType,
) -> usize {
    let p = attention_params(spec);
    (1..=cfg.batching.max_num_seqs.max(1))
        .map(|n| {
            let plan = SplitKPlan::choose(num_sms, dtype, n, &p, cfg.max_model_len);
            if plan.num_splits > 1 {
                n * spec.num_heads * plan.num_splits
            } else {
                0
            }
        })
        .max()
        .unwrap_or(0)
}

/// Device buffers of one step, allocated once at executor creation for the largest step and
/// reused (`DeviceBuffer::set_len` picks the prefix in use): no allocation per step, and fixed
/// addresses for graph replays.
pub(super) struct Workspace<T> {
    /// The forward pass's buffers (`model::decoder::Act`), per token or per sampling row.
    pub(super) acts: [DeviceBuffer<T>; Act::COUNT],
    /// [tokens, gate_up_dim] the MLP's gate|up product (inside the `mlp` op)
    pub(super) gate_up: DeviceBuffer<T>,
    /// [tokens, inter] the gated MLP's activation (gated only)
    pub(super) ffn_act: DeviceBuffer<T>,
    /// the packed step inputs (StepLayout), one upload per step
    pub(super) packed: DeviceBuffer<u32>,
    /// [tokens]
    pub(super) token_ids: DeviceBuffer<u32>,
    /// [tokens]
    pub(super) positions: DeviceBuffer<u32>,
    /// [tokens] cache slot of each token (-1: padding, not written)
    pub(super) slots: DeviceBuffer<i64>,
    /// [rows] batch row of each logits row
    pub(super) logits_rows: DeviceBuffer<u32>,
    /// [decode seqs]
    pub(super) dec_context_lens: DeviceBuffer<i32>,
    /// [decode seqs, mb]
    pub(super) dec_tables: DeviceBuffer<i32>,
    /// [prefill seqs]
    pub(super) pre_q_starts: DeviceBuffer<i32>,
    /// [prefill seqs]
    pub(super) pre_q_lens: DeviceBuffer<i32>,
    /// [prefill seqs]
    pub(super) pre_context_lens: DeviceBuffer<i32>,
    /// [prefill seqs, mb]
    pub(super) pre_tables: DeviceBuffer<i32>,
    pub(super) splitk: Option<SplitKWorkspace>,
    /// Quantized activations of the FP8 products (models with FP8 linears only).
    pub(super) fp8: Option<Fp8Activations>,
}

impl<T: FloatElem> Workspace<T> {
    pub(super) fn new(
        dev: &CudaDevice,
        spec: &DecoderSpec,
        cfg: &KvCacheConfig,
        tokens: usize,
        seqs: usize,
        fp8: Option<Fp8Activations>,
    ) -> crate::Result<Self> {
        let mb = max_blocks_per_seq(cfg);
        let gated = spec.gate_up_dim() != spec.intermediate_size;
        let splitk_partials = splitk_capacity(spec, cfg, dev.info().num_multiprocessors, T::DTYPE);
        // Split-K serves every decode (one split writes out directly, with no partials), so
        // the workspace exists whenever the head size allows it, empty for short contexts.
        let splitk = if use_splitk::<T>(spec.head_dim, spec.q_dim() + 2 * spec.kv_dim()) {
            Some(SplitKWorkspace::new(
                dev,
                splitk_partials,
                1,
                spec.head_dim,
                1,
            )?)
        } else {
            None
        };
        let mut acts = Vec::with_capacity(Act::COUNT);
        for a in Act::ALL {
            let rows = if a.per_token() { tokens } else { seqs };
            acts.push(dev.alloc_zeros(rows * a.row_len(spec))?);
        }
        let Ok(acts) = <[DeviceBuffer<T>; Act::COUNT]>::try_from(acts) else {
            return Err(super::device_err("step buffers: one per Act".into()));
        };
        Ok(Workspace {
            acts,
            gate_up: dev.alloc_zeros(tokens * spec.gate_up_dim())?,
            ffn_act: dev.alloc_zeros(if gated {
                tokens * spec.intermediate_size
            } else {
                0
            })?,
            packed: dev.alloc_zeros(packed_words(tokens, seqs, mb))?,
            token_ids: dev.alloc_zeros(tokens)?,
            positions: dev.alloc_zeros(tokens)?,
            slots: dev.alloc_zeros(tokens)?,
            logits_rows: dev.alloc_zeros(seqs)?,
            dec_context_lens: dev.alloc_zeros(seqs)?,
            dec_tables: dev.alloc_zeros(seqs * mb)?,
            pre_q_starts: dev.alloc_zeros(seqs)?,
            pre_q_lens: dev.alloc_zeros(seqs)?,
            pre_context_lens: dev.alloc_zeros(seqs)?,
            pre_tables: dev.alloc_zeros(seqs * mb)?,
            splitk,
            fp8,
        })
    }
}

/// Words of the largest packed upload (StepLayout).
pub(super) fn packed_words(tokens: usize, seqs: usize, mb: usize) -> usize {
    4 * tokens + seqs + 2 * seqs * (mb + 1) + 2 * seqs
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Sets every step buffer's length for `layout` and copies the packed inputs (already on
    /// the device) into the typed buffers. No host data is read: this runs inside graph
    /// captures too.
    pub(super) fn scatter_inputs(
        &self,
        ws: &mut Workspace<T>,
        layout: &StepLayout,
    ) -> crate::Result<()> {
        let spec = &self.decoder.spec;
        let dev = &self.dev;
        let (m, d, p, r) = (
            layout.num_tokens,
            layout.num_decode,
            layout.num_prefill,
            layout.num_rows,
        );
        let mb = self.max_blocks;
        for a in Act::ALL {
            let rows = if a.per_token() { m } else { r };
            ws.acts[a.idx()].set_len(rows * a.row_len(spec))?;
        }
        ws.gate_up.set_len(m * spec.gate_up_dim())?;
        if spec.gate_up_dim() != spec.intermediate_size {
            ws.ffn_act.set_len(m * spec.intermediate_size)?;
        }
        ws.token_ids.set_len(m)?;
        ws.positions.set_len(m)?;
        ws.slots.set_len(m)?;
        ws.logits_rows.set_len(r)?;
        ws.dec_context_lens.set_len(d)?;
        ws.dec_tables.set_len(d * mb)?;
        ws.pre_q_starts.set_len(p)?;
        ws.pre_q_lens.set_len(p)?;
        ws.pre_context_lens.set_len(p)?;
        ws.pre_tables.set_len(p * mb)?;
        let o = layout.offsets(mb);
        dev.copy_packed(&ws.packed, o[0], &mut ws.token_ids)?;
        dev.copy_packed(&ws.packed, o[1], &mut ws.positions)?;
        dev.copy_packed(&ws.packed, o[2], &mut ws.slots)?;
        dev.copy_packed(&ws.packed, o[3], &mut ws.logits_rows)?;
        dev.copy_packed(&ws.packed, o[4], &mut ws.dec_context_lens)?;
        dev.copy_packed(&ws.packed, o[5], &mut ws.dec_tables)?;
        dev.copy_packed(&ws.packed, o[6], &mut ws.pre_q_starts)?;
        dev.copy_packed(&ws.packed, o[7], &mut ws.pre_q_lens)?;
        dev.copy_packed(&ws.packed, o[8], &mut ws.pre_context_lens)?;
        dev.copy_packed(&ws.packed, o[9], &mut ws.pre_tables)?;
        Ok(())
    }
}
