//! The one forward pass: a mixed batch of prefill chunks and decode tokens through every layer,
//! driven only by the `DecoderSpec`, over a `DecoderBackend` of device ops. The CPU and CUDA
//! executors implement the ops (and choose fusions inside them); neither interprets the spec's
//! structure itself, so an architecture's quirk (parallel residuals, a shared norm, learned
//! positions, ALiBi, clipped qkv) is written here once for every device.
//!
//! One step, in backend ops (`Act` names the step buffers the backend owns):
//! ```text
//!   X = embed(ids) (+ learned positions)            or Normed = embed(..); X = norm_emb(Normed)
//!   per layer:
//!     Normed = norm1(X)                (a Sequential layer before it left MlpOut pending:
//!                                       X += MlpOut first, inside the same op)
//!     Qkv = linear_qkv(Normed);  clamp(Qkv)?;  rotary(q, k) + write k, v at the step's slots
//!     Attn = attention(Qkv, cache);  AttnProj = linear_out(Attn);  all_reduce(AttnProj)
//!     Sequential:          Normed = norm2(X += AttnProj);  MlpOut = mlp(Normed)  (pending)
//!     Parallel{shared}:    MlpOut = mlp(Normed);          X += AttnProj + MlpOut
//!     Parallel{!shared}:   Normed = norm2(X);  MlpOut = mlp(Normed);  X += AttnProj + MlpOut
//!   X += MlpOut (if pending);  Last = X[sampling rows];  LastNormed = final_norm(Last)
//!   Logits = lm_head(LastNormed)
//! ```
//! After each named intermediate the pass calls `DecoderBackend::tap`, the one hook through
//! which a backend profiles its ops or dumps tensors for a layer-by-layer comparison.
//!
//! The step's inputs (token ids, positions, KV slots, block tables, which rows sample) are the
//! backend's: it packed them from the plan before calling `forward`.

use crate::model::spec::{Activation, DecoderSpec, Mlp, PosEmbedding, Residual};

/// The activation buffers of one step, owned by the backend and named by the forward pass.
/// Shapes use `tokens` = the step's batch rows and `rows` = its sampling rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// [tokens, hidden] the residual stream
    X,
    /// [tokens, hidden] the input of a projection (a norm's output)
    Normed,
    /// [tokens, q_dim + 2 kv_dim] q | k | v
    Qkv,
    /// [tokens, q_dim]
    Attn,
    /// [tokens, hidden]
    AttnProj,
    /// [tokens, hidden]
    MlpOut,
    /// [rows, hidden] X at the sampling rows
    Last,
    /// [rows, hidden]
    LastNormed,
    /// [rows, vocab]
    Logits,
}

impl Act {
    /// Number of activation buffers (variants of `Act`).
    pub const COUNT: usize = 9;
    /// Every buffer, in `idx` order.
    pub const ALL: [Act; Act::COUNT] = [
        Act::X,
        Act::Normed,
        Act::Qkv,
        Act::Attn,
        Act::AttnProj,
        Act::MlpOut,
        Act::Last,
        Act::LastNormed,
        Act::Logits,
    ];

    /// Index into a backend's `[_; Act::COUNT]` buffer array.
    pub fn idx(self) -> usize {
        self as usize
    }

    /// Elements per row of this buffer for `spec`.
    pub fn row_len(self, spec: &DecoderSpec) -> usize {
        match self {
            Act::Qkv => spec.q_dim() + 2 * spec.kv_dim(),
            Act::Attn => spec.q_dim(),
            Act::Logits => spec.vocab_size,
            Act::X | Act::Normed | Act::AttnProj | Act::MlpOut | Act::Last | Act::LastNormed => {
                spec.hidden_size
            }
        }
    }

    /// Whether the buffer has one row per batch token (else one per sampling row).
    pub fn per_token(self) -> bool {
        !matches!(self, Act::Last | Act::LastNormed | Act::Logits)
    }

    /// Short name of the buffer, used in intermediate dumps and profiles (e.g. `attn_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Act::X => "x",
            Act::Normed => "normed",
            Act::Qkv => "qkv",
            Act::Attn => "attn",
            Act::AttnProj => "attn_proj",
            Act::MlpOut => "mlp_out",
            Act::Last => "last",
            Act::LastNormed => "last_normed",
            Act::Logits => "logits",
        }
    }
}

/// Which norm's weights an op uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSel {
    /// Applied to the token embeddings (BLOOM).
    Embedding,
    /// Layer `l`'s first norm (before attention; shared with the MLP when the spec says so).
    Attn(usize),
    /// Layer `l`'s second norm (before the MLP).
    Mlp(usize),
    /// The norm after the last layer, before the LM head.
    Final,
}

/// Which of a layer's attention projections a `linear` op uses. The MLP's projections are inside
/// the `mlp` op, where a backend may fuse them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearSel {
    /// [q_dim + 2 kv_dim, hidden] (+ bias)
    Qkv,
    /// [hidden, q_dim] (+ bias)
    AttnOut,
}

/// The MLP's shape as an op sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnAct {
    /// down(act(gate(x)) * up(x)), gate and up in one `[2 inter, hidden]` weight
    Gated(Activation),
    /// down(act(up(x)))
    Plain(Activation),
}

/// What the hook sees after each op of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tap {
    /// The layer, or None for the embedding and the head.
    pub layer: Option<usize>,
    /// What was computed (e.g. "attn_norm", "qkv", "attention", "mlp"), stable for dumps.
    pub name: &'static str,
    /// The buffer holding it.
    pub buf: Act,
}

/// The device ops the forward pass is written in. Every op reads and writes the backend's step
/// buffers; the step's inputs are the backend's too. Buffers passed in one call are distinct
/// (a backend returns an error, never panics, if they are not).
pub trait DecoderBackend {
    /// out = token embeddings of the step's ids (+ the learned position table's rows).
    fn embed(&mut self, out: Act) -> crate::Result<()>;
    /// out = norm(x); with `residual`: residual += x first, and out = norm(residual).
    fn norm(&mut self, sel: NormSel, out: Act, x: Act, residual: Option<Act>) -> crate::Result<()>;
    /// out = x · Wᵀ (+ bias) with layer `layer`'s weight `sel`.
    fn linear(&mut self, layer: usize, sel: LinearSel, out: Act, x: Act) -> crate::Result<()>;
    /// buf = clamp(buf, -limit, limit).
    fn clamp(&mut self, buf: Act, limit: f32) -> crate::Result<()>;
    /// Rotary embedding of q and k in `qkv` (rope models; else nothing), then k and v of every
    /// token written into layer `layer`'s cache at the token's slot.
    fn rotary_kv_write(&mut self, layer: usize, qkv: Act) -> crate::Result<()>;
    /// out = causal attention of each token's q (in `qkv`) over its sequence's cached k, v.
    fn attention(&mut self, layer: usize, out: Act, qkv: Act) -> crate::Result<()>;
    /// out = the MLP of layer `layer` applied to x.
    fn mlp(&mut self, layer: usize, ffn: FfnAct, out: Act, x: Act) -> crate::Result<()>;
    /// x += a (+ b).
    fn add(&mut self, x: Act, a: Act, b: Option<Act>) -> crate::Result<()>;
    /// out = x at the step's sampling rows.
    fn gather_rows(&mut self, out: Act, x: Act) -> crate::Result<()>;
    /// out = x · lm_headᵀ (+ bias): the step's logits.
    fn lm_head(&mut self, out: Act, x: Act) -> crate::Result<()>;
    /// Sums `buf` over tensor-parallel ranks; the identity on one device.
    fn all_reduce(&mut self, buf: Act) -> crate::Result<()>;
    /// Called after each intermediate: a backend may record a profile mark or dump the buffer.
    fn tap(&mut self, tap: Tap) -> crate::Result<()>;
}

/// The forward pass of one model: the spec, read once into the choices the pass makes.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The model the pass runs. `new` derives the MLP shape and the rotary flag from it, so build a
    /// new `Decoder` rather than editing it.
    pub spec: DecoderSpec,
    ffn: FfnAct,
    rope: bool,
}

impl Decoder {
    /// Reads `spec` once into the pass's choices (gated or plain MLP, rotary or not); the spec is
    /// assumed validated.
    pub fn new(spec: DecoderSpec) -> Self {
        let ffn = match spec.mlp {
            Mlp::Gated => FfnAct::Gated(spec.act),
            Mlp::Plain => FfnAct::Plain(spec.act),
        };
        let rope = matches!(spec.pos, PosEmbedding::Rope(_));
        Decoder { spec, ffn, rope }
    }

    /// Runs the step through every layer and the LM head (when `num_rows` > 0 rows sample).
    pub fn forward<B: DecoderBackend + ?Sized>(
        &self,
        be: &mut B,
        num_rows: usize,
    ) -> crate::Result<()> {
        let spec = &self.spec;
        let head = |name, buf| Tap {
            layer: None,
            name,
            buf,
        };
        if spec.embedding_norm {
            be.embed(Act::Normed)?;
            be.norm(NormSel::Embedding, Act::X, Act::Normed, None)?;
        } else {
            be.embed(Act::X)?;
        }
        be.tap(head("embedding", Act::X))?;

        // A Sequential layer leaves its MLP output to be added to X by the next norm (one fused
        // op instead of an add and a norm); after the last layer, by an add.
        let mut mlp_out_pending = false;
        for l in 0..spec.num_layers {
            let tap = |name, buf| Tap {
                layer: Some(l),
                name,
                buf,
            };
            let pending = mlp_out_pending.then_some(Act::X);
            let src = if mlp_out_pending { Act::MlpOut } else { Act::X };
            be.norm(NormSel::Attn(l), Act::Normed, src, pending)?;
            mlp_out_pending = false;
            be.tap(tap("attn_norm", Act::Normed))?;
            be.linear(l, LinearSel::Qkv, Act::Qkv, Act::Normed)?;
            if let Some(c) = spec.clip_qkv {
                be.clamp(Act::Qkv, c)?;
            }
            be.tap(tap("qkv", Act::Qkv))?;
            be.rotary_kv_write(l, Act::Qkv)?;
            be.tap(tap(
                if self.rope {
                    "rotary_kv_write"
                } else {
                    "kv_write"
                },
                Act::Qkv,
            ))?;
            be.attention(l, Act::Attn, Act::Qkv)?;
            be.tap(tap("attention", Act::Attn))?;
            be.linear(l, LinearSel::AttnOut, Act::AttnProj, Act::Attn)?;
            be.all_reduce(Act::AttnProj)?;
            be.tap(tap("attn_out", Act::AttnProj))?;
            match spec.residual {
                Residual::Sequential => {
                    be.norm(NormSel::Mlp(l), Act::Normed, Act::AttnProj, Some(Act::X))?;
                    be.tap(tap("mlp_norm", Act::Normed))?;
                    be.mlp(l, self.ffn, Act::MlpOut, Act::Normed)?;
                    be.all_reduce(Act::MlpOut)?;
                    be.tap(tap("mlp", Act::MlpOut))?;
                    mlp_out_pending = true;
                }
                Residual::Parallel { shared_norm } => {
                    if !shared_norm {
                        be.norm(NormSel::Mlp(l), Act::Normed, Act::X, None)?;
                        be.tap(tap("mlp_norm", Act::Normed))?;
                    }
                    be.mlp(l, self.ffn, Act::MlpOut, Act::Normed)?;
                    be.all_reduce(Act::MlpOut)?;
                    be.tap(tap("mlp", Act::MlpOut))?;
                    be.add(Act::X, Act::AttnProj, Some(Act::MlpOut))?;
                    be.tap(tap("residual", Act::X))?;
                }
            }
        }
        if mlp_out_pending {
            be.add(Act::X, Act::MlpOut, None)?;
            be.tap(head("residual", Act::X))?;
        }
        if num_rows == 0 {
            return Ok(());
        }
        // Final norm and LM head only for the rows that sample.
        be.gather_rows(Act::Last, Act::X)?;
        be.norm(NormSel::Final, Act::LastNormed, Act::Last, None)?;
        be.tap(head("final_norm", Act::LastNormed))?;
        be.lm_head(Act::Logits, Act::LastNormed)?;
        be.tap(head("lm_head", Act::Logits))?;
        Ok(())
    }
}
