//! The CUDA executor's `DecoderBackend`: `CudaStep` is one step's view of the executor (device,
//! GEMM engine, weights), its step buffers and KV cache, and implements the forward pass's ops
//! with the launchers of `crate::cuda`. Fusions chosen here, inside an op:
//! - `norm` with a residual is one kernel (x += y; out = norm(x));
//! - rotary embedding and the KV cache write are one kernel;
//! - a decode-sized gated MLP computes gate|up and the activation in one gemv kernel;
//! - decode rows go through split-K (flash-decoding) attention, prefill chunks (q_len > 1,
//!   chunked prefill against cached blocks included) through the flash prefill kernel.
//!
//! Every op is device work only (no host copy, no sync, no allocation), so a decode step can be
//! captured as a CUDA graph; `tap` records a profile event per op when profiling.

use super::CudaExecutor;
use super::dump_tap;
use super::pack::StepLayout;
use super::profile::Profile;
use super::weights::{DeviceLinear, DeviceMatrix, DeviceNorm, LayerKv};
use super::workspace::Workspace;
use crate::cuda::attention::{
    PrefillKernel, PrefillSeqs, SplitKPlan, paged_attention_decode_splitk, paged_attention_prefill,
    splitk_supported,
};
use crate::cuda::elementwise;
use crate::cuda::gemm::fp8::{Fp8Activations, fp8_gated_gemv, fp8_gated_gemv_applies};
use crate::cuda::gemm::{gated_gemv, gated_gemv_applies};
use crate::cuda::ops::{self, BlockTables, DecodeAttention, KvSource, LearnedPositions, PagedKv};
use crate::cuda::{DeviceBuffer, FloatElem, GemmBackend, GemmShape};
use crate::executor::batch::ExecutorError;
use crate::executor::dump::Dumper;
use crate::model::DecoderSpec;
use crate::model::decoder::{Act, DecoderBackend, FfnAct, LinearSel, NormSel, Tap};

/// Query heads as the attention kernels see them.
pub(super) fn attention_params(spec: &DecoderSpec) -> DecodeAttention {
    DecodeAttention {
        num_heads: spec.num_heads,
        num_kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        scale: spec.attn_scale,
        sliding_window: spec.sliding_window,
    }
}

/// Whether decode attention goes through split-K for this head size and qkv row: 16-byte rows
/// of q and of the cache in T (attention_splitk.cu is compiled per dtype, so only T's rows
/// matter: f32 takes head_dim 12, bf16/f16 do not). Other head sizes take the
/// one-CTA-per-(sequence, head) decode kernel.
pub(super) fn use_splitk<T: FloatElem>(head_dim: usize, qkv_dim: usize) -> bool {
    splitk_supported(T::DTYPE, head_dim) && (qkv_dim * T::DTYPE.size_in_bytes()).is_multiple_of(16)
}

/// One step on the device: the forward pass's ops over the executor's weights and cache.
pub(super) struct CudaStep<'a, T: FloatElem> {
    pub(super) ex: &'a CudaExecutor<T>,
    pub(super) ws: &'a mut Workspace<T>,
    pub(super) kv: &'a mut [LayerKv<T>],
    pub(super) layout: &'a StepLayout,
    pub(super) profile: &'a mut Option<Profile>,
    pub(super) dumper: Option<&'a mut Dumper>,
}

impl<T: FloatElem> CudaExecutor<T> {
    /// y = x · Wᵀ (+ bias) for m rows; an FP8 weight quantizes x into `fp8` (the workspace's
    /// scratch, present whenever the model has FP8 linears) where its product needs it.
    pub(super) fn linear(
        &self,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        l: &DeviceLinear<T>,
        m: usize,
        fp8: &mut Option<Fp8Activations>,
    ) -> crate::Result<()> {
        match &l.w {
            DeviceMatrix::Dense(w) => {
                self.gemm.linear(
                    &self.dev,
                    y,
                    x,
                    w,
                    l.bias.as_ref(),
                    GemmShape { m, n: l.n, k: l.k },
                )?;
            }
            DeviceMatrix::Fp8(w) => {
                let acts = fp8.as_mut().ok_or_else(|| {
                    super::device_err("an FP8 linear without the FP8 activation scratch".into())
                })?;
                self.gemm.linear_fp8(
                    &self.dev,
                    y,
                    x,
                    w,
                    l.bias.as_ref(),
                    m,
                    acts,
                    GemmBackend::Auto,
                )?;
            }
        }
        Ok(())
    }

    /// logits[..rows] = x[..rows] · lm_headᵀ (+ bias).
    pub(super) fn lm_head_into(
        &self,
        logits: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        rows: usize,
    ) -> crate::Result<()> {
        let spec = &self.decoder.spec;
        let lm_head = self.w.lm_head.as_ref().unwrap_or(&self.w.embedding);
        self.gemm.linear(
            &self.dev,
            logits,
            x,
            lm_head,
            self.w.lm_head_bias.as_ref(),
            GemmShape {
                m: rows,
                n: spec.vocab_size,
                k: spec.hidden_size,
            },
        )?;
        Ok(())
    }

    /// Records a profile event after `op` (profiling only).
    pub(super) fn mark(
        &self,
        profile: &mut Option<Profile>,
        op: &'static str,
    ) -> crate::Result<()> {
        if let Some(p) = profile {
            let e = self.dev.timing_event()?;
            p.marks.push((op, e));
        }
        Ok(())
    }
}

impl<'a, T: FloatElem> CudaStep<'a, T> {
    /// (out, x): two distinct step buffers.
    fn out_in(
        &mut self,
        op: &'static str,
        out: Act,
        x: Act,
    ) -> crate::Result<(&mut DeviceBuffer<T>, &DeviceBuffer<T>)> {
        match self.ws.acts.get_disjoint_mut([out.idx(), x.idx()]) {
            Ok([o, i]) => Ok((o, i)),
            Err(_) => Err(ExecutorError::aliased(op, out, x).into()),
        }
    }

    fn norm_weights(&self, sel: NormSel) -> crate::Result<&'a DeviceNorm<T>> {
        let w = &self.ex.w;
        let missing = |what: String| crate::Error::from(ExecutorError::MissingWeight { what });
        match sel {
            NormSel::Embedding => w
                .embedding_norm
                .as_ref()
                .ok_or_else(|| missing("the embedding norm".into())),
            NormSel::Attn(l) => Ok(&self.ex.layer(l)?.attn_norm),
            NormSel::Mlp(l) => self
                .ex
                .layer(l)?
                .mlp_norm
                .as_ref()
                .ok_or_else(|| missing(format!("layer {l}'s MLP norm"))),
            NormSel::Final => Ok(&w.final_norm),
        }
    }
}

impl<T: FloatElem> DecoderBackend for CudaStep<'_, T> {
    fn embed(&mut self, out: Act) -> crate::Result<()> {
        let ex = self.ex;
        let ws = &mut *self.ws;
        let learned =
            ex.w.position_embedding
                .as_ref()
                .map(|table| LearnedPositions {
                    table,
                    positions: &ws.positions,
                });
        ops::embedding(
            &ex.dev,
            &mut ws.acts[out.idx()],
            &ex.w.embedding,
            &ws.token_ids,
            learned,
            ex.decoder.spec.hidden_size,
        )?;
        Ok(())
    }

    fn norm(&mut self, sel: NormSel, out: Act, x: Act, residual: Option<Act>) -> crate::Result<()> {
        let n = self.norm_weights(sel)?;
        let (dev, kind) = (&self.ex.dev, self.ex.decoder.spec.norm);
        match residual {
            Some(res) => {
                let [o, i, r] = self
                    .ws
                    .acts
                    .get_disjoint_mut([out.idx(), x.idx(), res.idx()])
                    .map_err(|_| crate::Error::from(ExecutorError::aliased("norm", out, res)))?;
                ops::norm(dev, kind, o, i, Some(r), &n.weight, n.bias.as_ref())?;
            }
            None => {
                let (o, i) = self.out_in("norm", out, x)?;
                ops::norm(dev, kind, o, i, None, &n.weight, n.bias.as_ref())?;
            }
        }
        Ok(())
    }

    fn linear(&mut self, layer: usize, sel: LinearSel, out: Act, x: Act) -> crate::Result<()> {
        let ex = self.ex;
        let lw = ex.layer(layer)?;
        let l = match sel {
            LinearSel::Qkv => &lw.qkv,
            LinearSel::AttnOut => &lw.attn_out,
        };
        let m = self.layout.num_tokens;
        let ws = &mut *self.ws;
        let [o, i] = ws
            .acts
            .get_disjoint_mut([out.idx(), x.idx()])
            .map_err(|_| crate::Error::from(ExecutorError::aliased("linear", out, x)))?;
        ex.linear(o, i, l, m, &mut ws.fp8)
    }

    fn clamp(&mut self, buf: Act, limit: f32) -> crate::Result<()> {
        elementwise::clamp(&self.ex.dev, &mut self.ws.acts[buf.idx()], limit)?;
        Ok(())
    }

    fn rotary_kv_write(&mut self, layer: usize, qkv: Act) -> crate::Result<()> {
        let ex = self.ex;
        let spec = &ex.decoder.spec;
        let (q_dim, kv_dim) = (spec.q_dim(), spec.kv_dim());
        let kv_src = KvSource {
            row_stride: q_dim + 2 * kv_dim,
            k_offset: q_dim,
            v_offset: q_dim + kv_dim,
        };
        let cache = self
            .kv
            .get_mut(layer)
            .ok_or_else(|| ExecutorError::MissingWeight {
                what: format!("layer {layer}'s KV cache"),
            })?;
        let ws = &mut *self.ws;
        match (&ex.rotary, &ex.inv_freq) {
            (Some(rotary), Some(inv_freq)) => ops::rotary_kv_cache_write(
                &ex.dev,
                &mut ws.acts[qkv.idx()],
                &ws.positions,
                inv_freq,
                rotary,
                &mut cache.k,
                &mut cache.v,
                &ex.kv_shape,
                &kv_src,
                &ws.slots,
            )?,
            _ => ops::kv_cache_write(
                &ex.dev,
                &mut cache.k,
                &mut cache.v,
                &ex.kv_shape,
                &ws.acts[qkv.idx()],
                &kv_src,
                &ws.slots,
            )?,
        }
        Ok(())
    }

    fn attention(&mut self, layer: usize, out: Act, qkv: Act) -> crate::Result<()> {
        let ex = self.ex;
        let spec = &ex.decoder.spec;
        let dev = &ex.dev;
        let layout = self.layout;
        let p = attention_params(spec);
        let qkv_dim = spec.q_dim() + 2 * spec.kv_dim();
        let cache = self
            .kv
            .get(layer)
            .ok_or_else(|| ExecutorError::MissingWeight {
                what: format!("layer {layer}'s KV cache"),
            })?;
        let paged = PagedKv {
            k: &cache.k,
            v: &cache.v,
            shape: ex.kv_shape,
        };
        let ws = &mut *self.ws;
        let [attn, qkv_buf] = ws
            .acts
            .get_disjoint_mut([out.idx(), qkv.idx()])
            .map_err(|_| crate::Error::from(ExecutorError::aliased("attention", out, qkv)))?;
        let (m, d) = (layout.num_tokens, layout.num_decode);
        if d > 0 {
            // The decode kernels see the decode rows only: a prefix of the batch.
            qkv_buf.set_len(d * qkv_dim)?;
            attn.set_len(d * spec.q_dim())?;
            let tables = BlockTables {
                block_tables: &ws.dec_tables,
                max_blocks_per_seq: ex.max_blocks,
                context_lens: &ws.dec_context_lens,
            };
            let result = match &mut ws.splitk {
                Some(work) if use_splitk::<T>(spec.head_dim, qkv_dim) => {
                    // A graph fixes the plan for the longest context it may see.
                    let max_ctx = match layout.bucket {
                        Some(_) => ex.max_blocks * ex.kv_shape.block_size,
                        None => layout.max_decode_context,
                    };
                    let plan = SplitKPlan::choose(
                        dev.info().num_multiprocessors,
                        T::DTYPE,
                        d,
                        &p,
                        max_ctx,
                    );
                    paged_attention_decode_splitk(
                        dev,
                        attn,
                        qkv_buf,
                        qkv_dim,
                        &paged,
                        &tables,
                        ex.alibi_slopes.as_ref(),
                        &p,
                        plan,
                        work,
                    )
                }
                _ => ops::paged_attention_decode(
                    dev,
                    attn,
                    qkv_buf,
                    qkv_dim,
                    &paged,
                    &tables,
                    ex.alibi_slopes.as_ref(),
                    &p,
                ),
            };
            qkv_buf.set_len(m * qkv_dim)?;
            attn.set_len(m * spec.q_dim())?;
            result?;
        }
        if layout.num_prefill > 0 {
            paged_attention_prefill(
                dev,
                attn,
                qkv_buf,
                qkv_dim,
                &paged,
                &PrefillSeqs {
                    q_starts: &ws.pre_q_starts,
                    q_lens: &ws.pre_q_lens,
                    context_lens: &ws.pre_context_lens,
                    block_tables: &ws.pre_tables,
                    max_blocks_per_seq: ex.max_blocks,
                    max_q_len: layout.max_q_len,
                },
                ex.alibi_slopes.as_ref(),
                &p,
                PrefillKernel::Fast,
            )?;
        }
        Ok(())
    }

    fn mlp(&mut self, layer: usize, ffn: FfnAct, out: Act, x: Act) -> crate::Result<()> {
        let ex = self.ex;
        let dev = &ex.dev;
        let spec = &ex.decoder.spec;
        let lw = ex.layer(layer)?;
        let m = self.layout.num_tokens;
        let (k, inter) = (spec.hidden_size, spec.intermediate_size);
        let ws = &mut *self.ws;
        let [o, i] = ws
            .acts
            .get_disjoint_mut([out.idx(), x.idx()])
            .map_err(|_| crate::Error::from(ExecutorError::aliased("mlp", out, x)))?;
        match (ffn, &lw.gate_up.w) {
            (FfnAct::Gated(act), DeviceMatrix::Dense(w)) if gated_gemv_applies(T::DTYPE, m, k) => {
                // Decode-sized batches: gate_up and the activation in one kernel.
                gated_gemv(
                    dev,
                    act,
                    &mut ws.ffn_act,
                    i,
                    w,
                    lw.gate_up.bias.as_ref(),
                    m,
                    inter,
                    k,
                )?;
                ex.mark(self.profile, "mlp gate_up + activation")?;
                ex.linear(o, &ws.ffn_act, &lw.down, m, &mut ws.fp8)
            }
            (FfnAct::Gated(act), DeviceMatrix::Fp8(w)) if fp8_gated_gemv_applies(m) => {
                fp8_gated_gemv(dev, act, &mut ws.ffn_act, i, w, lw.gate_up.bias.as_ref(), m)?;
                ex.mark(self.profile, "mlp gate_up + activation")?;
                ex.linear(o, &ws.ffn_act, &lw.down, m, &mut ws.fp8)
            }
            (FfnAct::Gated(act), _) => {
                ex.linear(&mut ws.gate_up, i, &lw.gate_up, m, &mut ws.fp8)?;
                ops::gated_activation(dev, act, &mut ws.ffn_act, &ws.gate_up, inter)?;
                ex.mark(self.profile, "mlp gate_up + activation")?;
                ex.linear(o, &ws.ffn_act, &lw.down, m, &mut ws.fp8)
            }
            (FfnAct::Plain(act), _) => {
                ex.linear(&mut ws.gate_up, i, &lw.gate_up, m, &mut ws.fp8)?;
                ops::activation_in_place(dev, act, &mut ws.gate_up)?;
                ex.mark(self.profile, "mlp up + activation")?;
                ex.linear(o, &ws.gate_up, &lw.down, m, &mut ws.fp8)
            }
        }
    }

    fn add(&mut self, x: Act, a: Act, b: Option<Act>) -> crate::Result<()> {
        let dev = &self.ex.dev;
        match b {
            Some(b) => {
                let [xs, av, bv] = self
                    .ws
                    .acts
                    .get_disjoint_mut([x.idx(), a.idx(), b.idx()])
                    .map_err(|_| crate::Error::from(ExecutorError::aliased("add", a, b)))?;
                elementwise::add(dev, xs, av, Some(bv))?;
            }
            None => {
                let (xs, av) = self.out_in("add", x, a)?;
                elementwise::add(dev, xs, av, None)?;
            }
        }
        Ok(())
    }

    fn gather_rows(&mut self, out: Act, x: Act) -> crate::Result<()> {
        let h = x.row_len(&self.ex.decoder.spec);
        let dev = &self.ex.dev;
        let ws = &mut *self.ws;
        let [o, i] = ws
            .acts
            .get_disjoint_mut([out.idx(), x.idx()])
            .map_err(|_| crate::Error::from(ExecutorError::aliased("gather_rows", out, x)))?;
        elementwise::gather_rows(dev, o, i, &ws.logits_rows, h)?;
        Ok(())
    }

    fn lm_head(&mut self, out: Act, x: Act) -> crate::Result<()> {
        let ex = self.ex;
        let rows = self.layout.num_rows;
        let (o, i) = self.out_in("lm_head", out, x)?;
        ex.lm_head_into(o, i, rows)
    }

    fn all_reduce(&mut self, _buf: Act) -> crate::Result<()> {
        Ok(())
    }

    fn tap(&mut self, tap: Tap) -> crate::Result<()> {
        self.ex.mark(self.profile, tap.name)?;
        if let Some(d) = self.dumper.as_deref_mut() {
            let buf = &self.ws.acts[tap.buf.idx()];
            dump_tap(
                &self.ex.dev,
                d,
                tap,
                buf,
                tap.buf.row_len(&self.ex.decoder.spec),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn splitk_only_where_the_dtype_has_16_byte_rows() {
        // Llama shapes: head_dim 128, qkv row 12288.
        assert!(use_splitk::<bf16>(128, 12288));
        assert!(use_splitk::<f32>(128, 12288));
        // head_dim 12 (tests/fixtures llama_gqa_llama3: 6 heads, 2 kv heads, qkv row 120): 48-byte
        // f32 rows take split-K (its own module); 24-byte bf16/f16 rows do not.
        assert!(use_splitk::<f32>(12, 120));
        assert!(!use_splitk::<bf16>(12, 120));
        assert!(!use_splitk::<f16>(12, 120));
        // A qkv row that is not 16-byte aligned (bf16 row of 100 elements, f32 row of 42).
        assert!(!use_splitk::<bf16>(16, 100));
        assert!(!use_splitk::<f32>(12, 42));
    }
}
