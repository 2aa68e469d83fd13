//! Checkpoint layouts: the row order of fused q/k/v tensors and the tensors a checkpoint of an
//! architecture must hold.

use crate::model::arch::{ArchInfo, GlobalTensor, LayerTensor};
use crate::model::spec::{FusedQkv, Mlp, Norm, PosEmbedding, QkvLayout, Residual};

/// For each row of the decoder's q | k | v layout, the row of a fused checkpoint tensor it comes
/// from; None when the fused layout already is q | k | v.
///
/// ```text
///   PerHead  [num_heads, 3, head_dim]:             q of head h = rows (3h + 0) * d ..
///                                                  k of head h = rows (3h + 1) * d ..
///   KvGroups [num_kv, group + 2, head_dim], group = num_heads / num_kv:
///            q head h (group j = h / group, i = h % group) = rows (j (group + 2) + i) * d ..
///            k head j = rows (j (group + 2) + group) * d ..,  v head j = the next d rows
/// ```
pub fn fused_qkv_source_rows(
    layout: FusedQkv,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Option<Vec<usize>> {
    let d = head_dim;
    let mut heads: Vec<usize> = Vec::with_capacity(num_heads + 2 * num_kv_heads);
    match layout {
        FusedQkv::Concat => return None,
        FusedQkv::PerHead => {
            // Source head-slot (in units of head_dim rows) of each destination head.
            heads.extend((0..num_heads).map(|h| 3 * h));
            heads.extend((0..num_kv_heads).map(|h| 3 * h + 1));
            heads.extend((0..num_kv_heads).map(|h| 3 * h + 2));
        }
        FusedQkv::KvGroups => {
            let group = num_heads / num_kv_heads.max(1);
            heads.extend((0..num_heads).map(|h| (h / group) * (group + 2) + h % group));
            heads.extend((0..num_kv_heads).map(|j| j * (group + 2) + group));
            heads.extend((0..num_kv_heads).map(|j| j * (group + 2) + group + 1));
        }
    }
    Some(
        heads
            .into_iter()
            .flat_map(|slot| slot * d..(slot + 1) * d)
            .collect(),
    )
}

/// out row r = src row `rows[r]`; `src: [_, row_len]`.
pub(super) fn gather_rows(src: &[f32], row_len: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * row_len);
    for &r in rows {
        out.extend_from_slice(&src[r * row_len..(r + 1) * row_len]);
    }
    out
}

/// Every tensor (name, shape) that `DecoderWeights::load` reads for `arch`: used to build random
/// checkpoints for benchmarks, and kept honest by a test that loads from exactly this list.
pub fn expected_tensors(arch: &ArchInfo) -> Vec<(String, Vec<usize>)> {
    use LayerTensor::*;
    let spec = &arch.spec;
    let names = arch.names;
    let (h, q, kv, inter, vocab) = (
        spec.hidden_size,
        spec.q_dim(),
        spec.kv_dim(),
        spec.intermediate_size,
        spec.vocab_size,
    );
    // Shape of a linear weight with `rows` outputs and `cols` inputs, as the checkpoint stores it.
    let transposed = names.transposed_linears();
    let linear = |rows: usize, cols: usize| {
        if transposed {
            vec![cols, rows]
        } else {
            vec![rows, cols]
        }
    };
    let mut out = vec![];
    let mut global = |t: GlobalTensor, shape: Vec<usize>| {
        if let Some(n) = names.global(t) {
            out.push((n, shape));
        }
    };
    global(GlobalTensor::TokenEmbedding, vec![vocab, h]);
    if let PosEmbedding::Learned { num_positions } = spec.pos {
        global(GlobalTensor::PositionEmbedding, vec![num_positions, h]);
    }
    let norm_bias = matches!(spec.norm, Norm::Layer { bias: true, .. });
    if spec.embedding_norm {
        global(GlobalTensor::EmbeddingNorm, vec![h]);
        if norm_bias {
            global(GlobalTensor::EmbeddingNormBias, vec![h]);
        }
    }
    global(GlobalTensor::FinalNorm, vec![h]);
    if norm_bias {
        global(GlobalTensor::FinalNormBias, vec![h]);
    }
    if !spec.tie_embeddings {
        global(GlobalTensor::LmHead, vec![vocab, h]);
    }
    if spec.biases.lm_head {
        global(GlobalTensor::LmHeadBias, vec![vocab]);
    }
    for i in 0..spec.num_layers {
        let mut layer = |t: LayerTensor, shape: Vec<usize>| {
            if let Some(n) = names.layer(i, t) {
                out.push((n, shape));
            }
        };
        layer(AttnNorm, vec![h]);
        if norm_bias {
            layer(AttnNormBias, vec![h]);
        }
        if !matches!(spec.residual, Residual::Parallel { shared_norm: true }) {
            layer(MlpNorm, vec![h]);
            if norm_bias {
                layer(MlpNormBias, vec![h]);
            }
        }
        match spec.qkv {
            QkvLayout::Separate => {
                layer(Q, linear(q, h));
                layer(K, linear(kv, h));
                layer(V, linear(kv, h));
                if spec.biases.qkv {
                    layer(QBias, vec![q]);
                    layer(KBias, vec![kv]);
                    layer(VBias, vec![kv]);
                }
            }
            QkvLayout::Fused { .. } => {
                layer(Qkv, linear(q + 2 * kv, h));
                if spec.biases.qkv {
                    layer(QkvBias, vec![q + 2 * kv]);
                }
            }
        }
        layer(AttnOut, linear(h, q));
        if spec.biases.attn_out {
            layer(AttnOutBias, vec![h]);
        }
        if spec.mlp == Mlp::Gated {
            layer(Gate, linear(inter, h));
            if spec.biases.mlp {
                layer(GateBias, vec![inter]);
            }
        }
        layer(Up, linear(inter, h));
        layer(Down, linear(h, inter));
        if spec.biases.mlp {
            layer(UpBias, vec![inter]);
            layer(DownBias, vec![h]);
        }
    }
    out
}
