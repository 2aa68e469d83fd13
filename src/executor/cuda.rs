//! The CUDA executor: the generic decoder's forward pass on one GPU, over a paged KV cache in
//! device memory, behind the same `Executor` trait as the CPU executor.
//!
//! It owns the device, the GEMM engine, the weights (uploaded once from the host
//! `DecoderWeights`, converted to the executor's dtype: bf16, f16 or f32) and one K and one V
//! cache per layer, `[num_blocks, block_size, num_kv_heads, head_dim]` in the same dtype. The
//! forward pass mirrors `model::decoder::Decoder::forward` one step at a time:
//!
//! ```text
//!   x = embedding(ids) (+ learned positions);  x = embedding_norm(x)?
//!   per layer:  n = norm1(x);  qkv = n·Wqkvᵀ (+b);  clip?;  rotary(q, k);  cache[slot] = k, v
//!               a = attention(q, cache);  p = a·Woᵀ (+b)
//!     Sequential:          x += p;  n = norm2(x)  (one fused kernel);  x += mlp(n)
//!     Parallel{shared}:    x += p + mlp(n)
//!     Parallel{!shared}:   n = norm2(x);  x += p + mlp(n)
//!   logits = lm_head(final_norm(x[sampling rows])) -> host f32
//! ```
//!
//! Attention goes through one function, `attention`: today every scheduled token is its own
//! decode query (context = its position + 1, over its sequence's block table), which is exact
//! for prefill, chunked prefill against cached blocks and decode alike, at O(n²) cost for long
//! prompts; the flash prefill kernel replaces that one function. Sampling stays on the host: the
//! logits of the sampling rows come back as f32.
//!
//! The KV cache is sized once, at construction (`plan_kv_blocks`). This module never panics on
//! plan data (a short block table is an error) and holds no `unsafe`: every device call goes
//! through the checked launchers of `crate::cuda`.

use half::{bf16, f16};

use super::{Executor, Logits};
use crate::cuda::elementwise;
use crate::cuda::ops::{
    self, BlockTables, DecodeAttention, KvCacheShape, KvSource, LearnedPositions, PagedKv,
    RotaryLayout,
};
use crate::cuda::{CudaDevice, DeviceBuffer, FloatElem, Gemm, GemmShape, KernelId};
use crate::dtype::DType;
use crate::model::spec::{DecoderSpec, Mlp, PosEmbedding, Residual};
use crate::model::weights::{DecoderWeights, LayerWeights, NormWeights};
use crate::ops::linear::Weight;
use crate::scheduler::SchedulePlan;

/// Default fraction of free GPU memory given to the KV cache (tensorrtllm_backend's default).
pub const DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION: f32 = 0.9;

/// Device memory kept free beside the activation estimate: CUDA context growth, cuBLAS(Lt)
/// internals, the stream-ordered allocator's rounding.
pub const RESERVED_GPU_BYTES: usize = 256 << 20;

/// How to size the paged KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheConfig {
    pub block_size: usize,
    /// Capacity in tokens (rounded up to whole blocks); None: from the memory fraction alone.
    pub max_tokens: Option<usize>,
    /// Fraction of the free memory (after weights and the activation workspace) for the cache.
    pub free_gpu_mem_fraction: f32,
    /// Step token budget: the activation workspace is estimated for this many tokens.
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
}

/// What the KV cache sizing decided, and from which numbers (for the load log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCachePlan {
    pub num_blocks: usize,
    /// K and V of every layer for one block.
    pub bytes_per_block: usize,
    pub free_bytes: usize,
    pub workspace_bytes: usize,
    /// Which bound decided `num_blocks`: "memory fraction", "max_tokens_in_paged_kv_cache" or
    /// "max_num_seqs x max_model_len".
    pub limited_by: &'static str,
}

impl KvCachePlan {
    pub fn describe(&self, cfg: &KvCacheConfig) -> String {
        format!(
            "KV cache: {} blocks of {} tokens ({:.1} MiB, {} bytes/block; limited by {}; free after weights {:.1} MiB, activation workspace {:.1} MiB, fraction {})",
            self.num_blocks,
            cfg.block_size,
            (self.num_blocks * self.bytes_per_block) as f64 / 1048576.0,
            self.bytes_per_block,
            self.limited_by,
            self.free_bytes as f64 / 1048576.0,
            self.workspace_bytes as f64 / 1048576.0,
            cfg.free_gpu_mem_fraction
        )
    }
}

/// Bytes of K and V, all layers, for one block of `block_size` tokens in `dtype`.
pub fn kv_bytes_per_block(spec: &DecoderSpec, block_size: usize, dtype: DType) -> usize {
    spec.num_layers * 2 * block_size * spec.kv_dim() * dtype.size_in_bytes()
}

/// Device memory one step of `cfg.max_num_batched_tokens` tokens needs beside weights and cache:
/// activations of one layer (reused across layers), step inputs, the sampling rows' logits,
/// plus `RESERVED_GPU_BYTES`.
pub fn activation_workspace_bytes(spec: &DecoderSpec, cfg: &KvCacheConfig, dtype: DType) -> usize {
    let (h, q, kv, inter) = (
        spec.hidden_size,
        spec.q_dim(),
        spec.kv_dim(),
        spec.intermediate_size,
    );
    let gate_up = match spec.mlp {
        Mlp::Gated => 2 * inter,
        Mlp::Plain => inter,
    };
    // x, normed, qkv, attn, attn_proj, gate_up, act, mlp_out
    let per_token_elems = h + h + (q + 2 * kv) + q + h + gate_up + inter + h;
    let max_blocks = cfg.max_model_len.div_ceil(cfg.block_size.max(1));
    // ids, positions, slots, context lens, logits rows + the per-token block table
    let per_token_inputs = 4 + 4 + 8 + 4 + 4 + 4 * max_blocks;
    let m = cfg.max_num_batched_tokens;
    let rows = cfg.max_num_seqs.min(m);
    let logits =
        rows * (spec.vocab_size * (dtype.size_in_bytes() + 4) + 2 * h * dtype.size_in_bytes());
    m * (per_token_elems * dtype.size_in_bytes() + per_token_inputs) + logits + RESERVED_GPU_BYTES
}

/// The number of KV blocks: the smallest of what `free_gpu_mem_fraction` of the memory left
/// after the activation workspace holds, what `max_tokens` asks for, and what `max_num_seqs`
/// sequences of `max_model_len` tokens can ever use. Fails, naming the numbers, when not one
/// block fits.
pub fn plan_kv_blocks(
    spec: &DecoderSpec,
    cfg: &KvCacheConfig,
    dtype: DType,
    free_bytes: usize,
) -> Result<KvCachePlan, String> {
    let f = cfg.free_gpu_mem_fraction;
    if !(f > 0.0 && f <= 1.0) {
        return Err(format!(
            "kv_cache_free_gpu_mem_fraction = {f} must be in (0, 1]"
        ));
    }
    if cfg.block_size == 0 {
        return Err("block_size must be > 0".into());
    }
    let bytes_per_block = kv_bytes_per_block(spec, cfg.block_size, dtype);
    let workspace_bytes = activation_workspace_bytes(spec, cfg, dtype);
    let budget = (free_bytes.saturating_sub(workspace_bytes) as f64 * f as f64) as usize;
    let by_memory = budget / bytes_per_block.max(1);
    let mut limits = vec![(by_memory, "memory fraction")];
    if let Some(t) = cfg.max_tokens {
        limits.push((t.div_ceil(cfg.block_size), "max_tokens_in_paged_kv_cache"));
    }
    limits.push((
        cfg.max_num_seqs * cfg.max_model_len.div_ceil(cfg.block_size),
        "max_num_seqs x max_model_len",
    ));
    let (num_blocks, limited_by) = limits
        .into_iter()
        .min_by_key(|&(n, _)| n)
        .unwrap_or((by_memory, "memory fraction"));
    if num_blocks == 0 {
        return Err(format!(
            "no KV cache block fits: {free_bytes} bytes free after the weights, {workspace_bytes} \
             bytes of activation workspace for max_num_batched_tokens {}, fraction {f}, \
             {bytes_per_block} bytes per block of {} tokens; lower max_num_batched_tokens or \
             use a smaller dtype",
            cfg.max_num_batched_tokens, cfg.block_size
        ));
    }
    Ok(KvCachePlan {
        num_blocks,
        bytes_per_block,
        free_bytes,
        workspace_bytes,
        limited_by,
    })
}

/// Opens a CUDA executor on `dev` for `dtype`: uploads `weights`, sizes and allocates the KV
/// cache. Returns the executor and the cache plan (the caller logs it).
pub fn open(
    dev: CudaDevice,
    spec: DecoderSpec,
    weights: DecoderWeights,
    dtype: DType,
    kv: &KvCacheConfig,
) -> crate::Result<(Box<dyn Executor>, KvCachePlan)> {
    Ok(match dtype {
        DType::F32 => {
            let (e, p) = CudaExecutor::<f32>::new(dev, spec, weights, kv)?;
            (Box::new(e), p)
        }
        DType::BF16 => {
            let (e, p) = CudaExecutor::<bf16>::new(dev, spec, weights, kv)?;
            (Box::new(e), p)
        }
        DType::F16 => {
            let (e, p) = CudaExecutor::<f16>::new(dev, spec, weights, kv)?;
            (Box::new(e), p)
        }
    })
}

struct DeviceNorm<T> {
    /// [dim]
    weight: DeviceBuffer<T>,
    /// [dim]
    bias: Option<DeviceBuffer<T>>,
}

struct DeviceLinear<T> {
    /// [n = out_features, k = in_features]
    w: DeviceBuffer<T>,
    /// [n]
    bias: Option<DeviceBuffer<T>>,
    n: usize,
    k: usize,
}

struct DeviceLayer<T> {
    attn_norm: DeviceNorm<T>,
    mlp_norm: Option<DeviceNorm<T>>,
    /// [q_dim + 2 kv_dim, hidden]
    qkv: DeviceLinear<T>,
    /// [hidden, q_dim]
    attn_out: DeviceLinear<T>,
    /// [2 inter, hidden] (gated) or [inter, hidden]
    gate_up: DeviceLinear<T>,
    /// [hidden, inter]
    down: DeviceLinear<T>,
}

struct DeviceWeights<T> {
    /// [vocab, hidden]; also the LM head when tied.
    embedding: DeviceBuffer<T>,
    /// [num_positions, hidden]
    position_embedding: Option<DeviceBuffer<T>>,
    embedding_norm: Option<DeviceNorm<T>>,
    final_norm: DeviceNorm<T>,
    /// [vocab, hidden]; None when tied to `embedding`.
    lm_head: Option<DeviceBuffer<T>>,
    /// [vocab]
    lm_head_bias: Option<DeviceBuffer<T>>,
    layers: Vec<DeviceLayer<T>>,
}

/// One layer's paged cache.
struct LayerKv<T> {
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    k: DeviceBuffer<T>,
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    v: DeviceBuffer<T>,
}

/// One step's inputs on the device.
struct StepInputs {
    num_tokens: usize,
    /// [num_tokens]
    token_ids: DeviceBuffer<u32>,
    /// [num_tokens]
    positions: DeviceBuffer<u32>,
    /// [num_tokens] cache slot of each token
    slots: DeviceBuffer<i64>,
    /// [num_tokens, max_blocks]: each token's sequence's block table (-1 past its end), so that
    /// every token can be a decode query of its own (see `attention`).
    token_block_tables: DeviceBuffer<i32>,
    /// [num_tokens]: position + 1 of each token.
    token_context_lens: DeviceBuffer<i32>,
    max_blocks: usize,
    /// [num_logits_rows] token index of each sampling row
    logits_rows: DeviceBuffer<u32>,
}

fn device_err(what: String) -> crate::Error {
    crate::Error::Device(what)
}

fn upload_f32<T: FloatElem>(dev: &CudaDevice, v: &[f32]) -> crate::Result<DeviceBuffer<T>> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    Ok(dev.upload(&host)?)
}

fn upload_weight<T: FloatElem>(
    dev: &CudaDevice,
    w: &Weight,
    name: &str,
) -> crate::Result<DeviceBuffer<T>> {
    match w {
        Weight::F32 { data, .. } => upload_f32(dev, data),
        Weight::Q8(_) => {
            // Compact CPU weights: dequantize row by row (exact for the block formats).
            let (rows, cols) = (w.rows(), w.cols());
            let mut row = vec![0.0f32; cols];
            let mut host = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                w.try_row_to_f32(r, &mut row)
                    .map_err(|e| device_err(format!("dequantizing {name} for the GPU: {e}")))?;
                host.extend(row.iter().map(|&x| T::from_f32(x)));
            }
            Ok(dev.upload(&host)?)
        }
    }
}

fn upload_linear<T: FloatElem>(
    dev: &CudaDevice,
    w: &Weight,
    bias: Option<&Vec<f32>>,
    name: &str,
) -> crate::Result<DeviceLinear<T>> {
    Ok(DeviceLinear {
        w: upload_weight(dev, w, name)?,
        bias: bias.map(|b| upload_f32(dev, b)).transpose()?,
        n: w.rows(),
        k: w.cols(),
    })
}

fn upload_norm<T: FloatElem>(dev: &CudaDevice, n: &NormWeights) -> crate::Result<DeviceNorm<T>> {
    Ok(DeviceNorm {
        weight: upload_f32(dev, &n.weight)?,
        bias: n.bias.as_deref().map(|b| upload_f32(dev, b)).transpose()?,
    })
}

fn upload_layer<T: FloatElem>(
    dev: &CudaDevice,
    l: &LayerWeights,
    idx: usize,
) -> crate::Result<DeviceLayer<T>> {
    Ok(DeviceLayer {
        attn_norm: upload_norm(dev, &l.attn_norm)?,
        mlp_norm: l
            .mlp_norm
            .as_ref()
            .map(|n| upload_norm(dev, n))
            .transpose()?,
        qkv: upload_linear(
            dev,
            &l.qkv,
            l.qkv_bias.as_ref(),
            &format!("layer {idx} qkv"),
        )?,
        attn_out: upload_linear(
            dev,
            &l.attn_out,
            l.attn_out_bias.as_ref(),
            &format!("layer {idx} attn_out"),
        )?,
        gate_up: upload_linear(
            dev,
            &l.gate_up,
            l.gate_up_bias.as_ref(),
            &format!("layer {idx} gate_up"),
        )?,
        down: upload_linear(
            dev,
            &l.down,
            l.down_bias.as_ref(),
            &format!("layer {idx} down"),
        )?,
    })
}

/// The CUDA executor for activations, weights and KV cache in `T` (f32, bf16 or f16).
pub struct CudaExecutor<T: FloatElem> {
    dev: CudaDevice,
    gemm: Gemm,
    spec: DecoderSpec,
    w: DeviceWeights<T>,
    /// [rotary_dim / 2], scaling folded in (rope models)
    inv_freq: Option<DeviceBuffer<f32>>,
    /// [num_heads] (ALiBi models)
    alibi_slopes: Option<DeviceBuffer<f32>>,
    kv: Vec<LayerKv<T>>,
    kv_shape: KvCacheShape,
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Uploads the weights, compiles the kernels, sizes and allocates the KV cache.
    pub fn new(
        dev: CudaDevice,
        spec: DecoderSpec,
        weights: DecoderWeights,
        kv_cfg: &KvCacheConfig,
    ) -> crate::Result<(Self, KvCachePlan)> {
        if spec.head_dim > ops::MAX_DECODE_HEAD_DIM {
            return Err(device_err(format!(
                "{}: head_dim {} is above the CUDA attention kernel's maximum {}",
                spec.arch,
                spec.head_dim,
                ops::MAX_DECODE_HEAD_DIM
            )));
        }
        dev.stream().context().bind_to_thread().map_err(|e| {
            crate::cuda::CudaError::driver("binding the device to the loading thread", e)
        })?;
        dev.warm_up(&[
            KernelId::Embedding,
            KernelId::Norm,
            KernelId::Rotary,
            KernelId::Activation,
            KernelId::KvCache,
            KernelId::Attention,
            KernelId::Elementwise,
        ])?;
        let gemm = Gemm::new(&dev)?;
        let w = DeviceWeights {
            embedding: upload_weight(&dev, &weights.embedding, "embedding")?,
            position_embedding: weights
                .position_embedding
                .as_deref()
                .map(|p| upload_f32(&dev, p))
                .transpose()?,
            embedding_norm: weights
                .embedding_norm
                .as_ref()
                .map(|n| upload_norm(&dev, n))
                .transpose()?,
            final_norm: upload_norm(&dev, &weights.final_norm)?,
            lm_head: weights
                .lm_head
                .as_ref()
                .map(|l| upload_weight(&dev, l, "lm_head"))
                .transpose()?,
            lm_head_bias: weights
                .lm_head_bias
                .as_deref()
                .map(|b| upload_f32(&dev, b))
                .transpose()?,
            layers: weights
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| upload_layer(&dev, l, i))
                .collect::<crate::Result<_>>()?,
        };
        drop(weights);
        let inv_freq = match &spec.pos {
            PosEmbedding::Rope(rope) => Some(dev.upload(&rope.inv_freqs())?),
            _ => None,
        };
        let alibi_slopes = match spec.alibi_slopes() {
            Some(slopes) => Some(dev.upload(&slopes)?),
            None => None,
        };
        dev.synchronize()?;
        let (free_bytes, _) = dev.memory_info()?;
        let plan = plan_kv_blocks(&spec, kv_cfg, T::DTYPE, free_bytes).map_err(device_err)?;
        let kv_shape = KvCacheShape {
            num_blocks: plan.num_blocks,
            block_size: kv_cfg.block_size,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
        };
        let kv = (0..spec.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: dev.alloc_zeros(kv_shape.num_elements())?,
                    v: dev.alloc_zeros(kv_shape.num_elements())?,
                })
            })
            .collect::<Result<Vec<_>, crate::cuda::CudaError>>()?;
        dev.synchronize()?;
        Ok((
            CudaExecutor {
                dev,
                gemm,
                spec,
                w,
                inv_freq,
                alibi_slopes,
                kv,
                kv_shape,
            },
            plan,
        ))
    }

    /// Flattens the plan into device inputs; checks every block table covers its chunk.
    fn inputs(&self, plan: &SchedulePlan) -> crate::Result<(StepInputs, usize)> {
        let bs = self.kv_shape.block_size;
        let num_tokens = plan.num_batched_tokens;
        let max_blocks = plan
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut token_ids = Vec::with_capacity(num_tokens);
        let mut positions = Vec::with_capacity(num_tokens);
        let mut slots = Vec::with_capacity(num_tokens);
        let mut tables = Vec::with_capacity(num_tokens * max_blocks);
        let mut context_lens = Vec::with_capacity(num_tokens);
        let mut logits_rows = Vec::new();
        for s in &plan.seqs {
            let end = s.start_pos + s.token_ids.len();
            if s.block_table.len() * bs < end {
                return Err(device_err(format!(
                    "sequence {:?}: block table of {} blocks of {bs} does not cover positions up to {end}",
                    s.seq_id,
                    s.block_table.len()
                )));
            }
            let mut table: Vec<i32> = Vec::with_capacity(max_blocks);
            for b in &s.block_table {
                let id = i32::try_from(b.0)
                    .ok()
                    .filter(|&id| (id as usize) < self.kv_shape.num_blocks)
                    .ok_or_else(|| {
                        device_err(format!(
                            "sequence {:?}: block id {} outside the cache's {} blocks",
                            s.seq_id, b.0, self.kv_shape.num_blocks
                        ))
                    })?;
                table.push(id);
            }
            table.resize(max_blocks, -1);
            for (i, &id) in s.token_ids.iter().enumerate() {
                let pos = s.start_pos + i;
                token_ids.push(id);
                positions.push(
                    u32::try_from(pos)
                        .map_err(|_| device_err(format!("position {pos} does not fit in u32")))?,
                );
                slots.push((table[pos / bs] as usize * bs + pos % bs) as i64);
                tables.extend_from_slice(&table);
                context_lens.push((pos + 1) as i32);
            }
            if s.sample {
                logits_rows.push((token_ids.len() - 1) as u32);
            }
        }
        if token_ids.len() != num_tokens {
            return Err(device_err(format!(
                "plan counts {num_tokens} batched tokens but its sequences hold {}",
                token_ids.len()
            )));
        }
        let num_rows = logits_rows.len();
        let dev = &self.dev;
        Ok((
            StepInputs {
                num_tokens,
                token_ids: dev.upload(&token_ids)?,
                positions: dev.upload(&positions)?,
                slots: dev.upload(&slots)?,
                token_block_tables: dev.upload(&tables)?,
                token_context_lens: dev.upload(&context_lens)?,
                max_blocks,
                logits_rows: dev.upload(&logits_rows)?,
            },
            num_rows,
        ))
    }

    fn norm(
        &self,
        out: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        residual: Option<&mut DeviceBuffer<T>>,
        n: &DeviceNorm<T>,
    ) -> crate::Result<()> {
        ops::norm(
            &self.dev,
            self.spec.norm,
            out,
            x,
            residual,
            &n.weight,
            n.bias.as_ref(),
        )?;
        Ok(())
    }

    fn linear(
        &self,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        l: &DeviceLinear<T>,
        m: usize,
    ) -> crate::Result<()> {
        self.gemm.linear(
            &self.dev,
            y,
            x,
            &l.w,
            l.bias.as_ref(),
            GemmShape { m, n: l.n, k: l.k },
        )?;
        Ok(())
    }

    /// Attention of every scheduled token over its sequence's cache (its own k/v already
    /// written). out: [num_tokens, q_dim]; qkv: [num_tokens, q_dim + 2 kv_dim].
    ///
    /// Each token is a decode query with context_len = position + 1 over its sequence's block
    /// table: causal by construction, and a chunk attends to its sequence's earlier cached
    /// blocks. The flash prefill kernel (`cuda::attention::paged_attention_prefill`) replaces
    /// this body; nothing else changes.
    fn attention(
        &self,
        out: &mut DeviceBuffer<T>,
        qkv: &DeviceBuffer<T>,
        cache: &LayerKv<T>,
        inp: &StepInputs,
    ) -> crate::Result<()> {
        let spec = &self.spec;
        ops::paged_attention_decode(
            &self.dev,
            out,
            qkv,
            spec.q_dim() + 2 * spec.kv_dim(),
            &PagedKv {
                k: &cache.k,
                v: &cache.v,
                shape: self.kv_shape,
            },
            &BlockTables {
                block_tables: &inp.token_block_tables,
                max_blocks_per_seq: inp.max_blocks,
                context_lens: &inp.token_context_lens,
            },
            self.alibi_slopes.as_ref(),
            &DecodeAttention {
                num_heads: spec.num_heads,
                num_kv_heads: spec.num_kv_heads,
                head_dim: spec.head_dim,
                scale: spec.attn_scale,
                sliding_window: spec.sliding_window,
            },
        )?;
        Ok(())
    }

    /// Runs the batch through every layer; returns logits [num_rows, vocab] as f32.
    fn forward(&mut self, inp: &StepInputs, num_rows: usize) -> crate::Result<Vec<f32>> {
        let spec = self.spec.clone();
        let dev = &self.dev;
        let m = inp.num_tokens;
        let h = spec.hidden_size;
        let (q_dim, kv_dim, inter) = (spec.q_dim(), spec.kv_dim(), spec.intermediate_size);
        let qkv_dim = q_dim + 2 * kv_dim;
        let gate_up_cols = match spec.mlp {
            Mlp::Gated => 2 * inter,
            Mlp::Plain => inter,
        };

        // x: [m, hidden], the residual stream
        let mut x: DeviceBuffer<T> = dev.alloc_zeros(m * h)?;
        let learned = self
            .w
            .position_embedding
            .as_ref()
            .map(|table| LearnedPositions {
                table,
                positions: &inp.positions,
            });
        ops::embedding(dev, &mut x, &self.w.embedding, &inp.token_ids, learned, h)?;
        if let Some(n) = &self.w.embedding_norm {
            let src = x;
            x = dev.alloc_zeros(m * h)?;
            self.norm(&mut x, &src, None, n)?;
        }
        let mut normed: DeviceBuffer<T> = dev.alloc_zeros(m * h)?;
        let mut qkv: DeviceBuffer<T> = dev.alloc_zeros(m * qkv_dim)?;
        let mut attn: DeviceBuffer<T> = dev.alloc_zeros(m * q_dim)?;
        let mut attn_proj: DeviceBuffer<T> = dev.alloc_zeros(m * h)?;
        let mut gate_up: DeviceBuffer<T> = dev.alloc_zeros(m * gate_up_cols)?;
        let mut act: DeviceBuffer<T> = dev.alloc_zeros(match spec.mlp {
            Mlp::Gated => m * inter,
            Mlp::Plain => 0,
        })?;
        let mut mlp_out: DeviceBuffer<T> = dev.alloc_zeros(m * h)?;
        let rotary = match &spec.pos {
            PosEmbedding::Rope(r) => Some(RotaryLayout {
                row_stride: qkv_dim,
                num_q_heads: spec.num_heads,
                num_kv_heads: spec.num_kv_heads,
                k_offset: q_dim,
                head_dim: spec.head_dim,
                rotary_dim: r.rotary_dim,
                style: r.style,
            }),
            _ => None,
        };
        let kv_src = KvSource {
            row_stride: qkv_dim,
            k_offset: q_dim,
            v_offset: q_dim + kv_dim,
        };

        let mut kv = std::mem::take(&mut self.kv);
        let result = (|| -> crate::Result<()> {
            for (lw, cache) in self.w.layers.iter().zip(kv.iter_mut()) {
                self.norm(&mut normed, &x, None, &lw.attn_norm)?;
                self.linear(&mut qkv, &normed, &lw.qkv, m)?;
                if let Some(c) = spec.clip_qkv {
                    elementwise::clamp(dev, &mut qkv, c)?;
                }
                if let (Some(layout), Some(inv_freq)) = (&rotary, &self.inv_freq) {
                    ops::rotary(dev, &mut qkv, &inp.positions, inv_freq, layout)?;
                }
                ops::kv_cache_write(
                    dev,
                    &mut cache.k,
                    &mut cache.v,
                    &self.kv_shape,
                    &qkv,
                    &kv_src,
                    &inp.slots,
                )?;
                self.attention(&mut attn, &qkv, cache, inp)?;
                self.linear(&mut attn_proj, &attn, &lw.attn_out, m)?;
                let mlp_norm = lw.mlp_norm.as_ref().unwrap_or(&lw.attn_norm);
                match spec.residual {
                    Residual::Sequential => {
                        // x += attn_proj; normed = mlp_norm(x), one kernel.
                        self.norm(&mut normed, &attn_proj, Some(&mut x), mlp_norm)?;
                        self.mlp(lw, &normed, &mut gate_up, &mut act, &mut mlp_out, m)?;
                        elementwise::add(dev, &mut x, &mlp_out, None)?;
                    }
                    Residual::Parallel { shared_norm } => {
                        if !shared_norm {
                            self.norm(&mut normed, &x, None, mlp_norm)?;
                        }
                        self.mlp(lw, &normed, &mut gate_up, &mut act, &mut mlp_out, m)?;
                        elementwise::add(dev, &mut x, &attn_proj, Some(&mlp_out))?;
                    }
                }
            }
            Ok(())
        })();
        self.kv = kv;
        result?;

        if num_rows == 0 {
            return Ok(vec![]);
        }
        // Final norm and LM head only for the rows that sample.
        let mut last: DeviceBuffer<T> = dev.alloc_zeros(num_rows * h)?;
        elementwise::gather_rows(dev, &mut last, &x, &inp.logits_rows, h)?;
        let mut last_normed: DeviceBuffer<T> = dev.alloc_zeros(num_rows * h)?;
        self.norm(&mut last_normed, &last, None, &self.w.final_norm)?;
        let vocab = spec.vocab_size;
        let mut logits: DeviceBuffer<T> = dev.alloc_zeros(num_rows * vocab)?;
        let lm_head = self.w.lm_head.as_ref().unwrap_or(&self.w.embedding);
        self.gemm.linear(
            dev,
            &mut logits,
            &last_normed,
            lm_head,
            self.w.lm_head_bias.as_ref(),
            GemmShape {
                m: num_rows,
                n: vocab,
                k: h,
            },
        )?;
        Ok(dev.download(&logits)?.into_iter().map(T::to_f32).collect())
    }

    /// mlp_out = down(act(gate(n)) * up(n)) or down(act(up(n))).
    fn mlp(
        &self,
        lw: &DeviceLayer<T>,
        normed: &DeviceBuffer<T>,
        gate_up: &mut DeviceBuffer<T>,
        act: &mut DeviceBuffer<T>,
        mlp_out: &mut DeviceBuffer<T>,
        m: usize,
    ) -> crate::Result<()> {
        let dev = &self.dev;
        self.linear(gate_up, normed, &lw.gate_up, m)?;
        match self.spec.mlp {
            Mlp::Gated => {
                ops::gated_activation(
                    dev,
                    self.spec.act,
                    act,
                    gate_up,
                    self.spec.intermediate_size,
                )?;
                self.linear(mlp_out, act, &lw.down, m)
            }
            Mlp::Plain => {
                ops::activation_in_place(dev, self.spec.act, gate_up)?;
                self.linear(mlp_out, gate_up, &lw.down, m)
            }
        }
    }
}

impl<T: FloatElem> Executor for CudaExecutor<T> {
    fn describe(&self) -> String {
        let info = self.dev.info();
        format!(
            "cuda:{} ({}, {}, {})",
            info.ordinal,
            info.name,
            info.arch,
            T::DTYPE
        )
    }

    fn num_kv_blocks(&self) -> usize {
        self.kv_shape.num_blocks
    }

    fn block_size(&self) -> usize {
        self.kv_shape.block_size
    }

    fn vocab_size(&self) -> usize {
        self.spec.vocab_size
    }

    fn execute(&mut self, plan: &SchedulePlan) -> crate::Result<Logits> {
        // The engine thread is not the loading thread: make the context current here.
        self.dev.stream().context().bind_to_thread().map_err(|e| {
            crate::cuda::CudaError::driver("binding the device to the engine thread", e)
        })?;
        let vocab_size = self.spec.vocab_size;
        if plan.seqs.is_empty() {
            return Ok(Logits {
                vocab_size,
                data: vec![],
            });
        }
        let (inputs, num_rows) = self.inputs(plan)?;
        let data = self.forward(&inputs, num_rows)?;
        Ok(Logits { vocab_size, data })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec() -> DecoderSpec {
        crate::model::presets::preset("llama2-7b").unwrap().spec
    }

    fn cfg() -> KvCacheConfig {
        KvCacheConfig {
            block_size: 16,
            max_tokens: None,
            free_gpu_mem_fraction: 0.9,
            max_num_batched_tokens: 2048,
            max_num_seqs: 64,
            max_model_len: 4096,
        }
    }

    #[test]
    fn kv_blocks_from_the_memory_fraction() {
        let s = spec();
        // Llama-2-7B: 32 layers x 2 x 16 tokens x 4096 x 2 bytes = 8 MiB per bf16 block.
        assert_eq!(kv_bytes_per_block(&s, 16, DType::BF16), 8 << 20);
        let free = 60usize << 30;
        let p = plan_kv_blocks(&s, &cfg(), DType::BF16, free).unwrap();
        let ws = activation_workspace_bytes(&s, &cfg(), DType::BF16);
        assert!(ws > RESERVED_GPU_BYTES && ws < (2 << 30), "{ws}");
        assert_eq!(
            p.num_blocks,
            ((free - ws) as f64 * 0.9) as usize / (8 << 20)
        );
        assert_eq!(p.limited_by, "memory fraction");
        // f32 halves the blocks.
        let p32 = plan_kv_blocks(&s, &cfg(), DType::F32, free).unwrap();
        assert!(p32.num_blocks * 2 <= p.num_blocks + 1);
    }

    #[test]
    fn smallest_bound_wins_and_is_named() {
        let s = spec();
        let free = 60usize << 30;
        let c = KvCacheConfig {
            max_tokens: Some(1000),
            ..cfg()
        };
        let p = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        assert_eq!(
            (p.num_blocks, p.limited_by),
            (63, "max_tokens_in_paged_kv_cache")
        );
        let c = KvCacheConfig {
            max_num_seqs: 2,
            max_model_len: 100,
            ..cfg()
        };
        let p = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        assert_eq!(
            (p.num_blocks, p.limited_by),
            (14, "max_num_seqs x max_model_len")
        );
        let c = KvCacheConfig {
            free_gpu_mem_fraction: 0.5,
            ..cfg()
        };
        let half = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        let full = plan_kv_blocks(&s, &cfg(), DType::BF16, free).unwrap();
        assert!((half.num_blocks as f64 / full.num_blocks as f64 - 0.5 / 0.9).abs() < 0.01);
    }

    #[test]
    fn no_block_fits_is_an_error_naming_the_numbers() {
        let s = spec();
        let err = plan_kv_blocks(&s, &cfg(), DType::BF16, 300 << 20).unwrap_err();
        assert!(
            err.contains("no KV cache block fits") && err.contains("max_num_batched_tokens 2048"),
            "{err}"
        );
        let err = plan_kv_blocks(
            &s,
            &KvCacheConfig {
                free_gpu_mem_fraction: 1.5,
                ..cfg()
            },
            DType::BF16,
            1 << 40,
        )
        .unwrap_err();
        assert!(err.contains("1.5"), "{err}");
    }
}
