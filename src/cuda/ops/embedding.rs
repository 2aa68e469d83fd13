//! The embedding gather: token rows of the table, plus learned position rows where the
//! architecture has them.

use cudarc::driver::PushKernelArg;

use super::{NULL_PTR, entry, expect_len, grid, launch_error, to_i32, to_u32};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaError;
use crate::cuda::kernels::KernelId;

/// Learned absolute position embeddings added during the gather (GPT-2, OPT, BLOOM-less archs).
#[derive(Debug, Clone, Copy)]
pub struct LearnedPositions<'a, T> {
    /// [max_positions, hidden]
    pub table: &'a DeviceBuffer<T>,
    /// [num_tokens]
    pub positions: &'a DeviceBuffer<u32>,
}

/// out[t] = table[token_ids[t]] (+ pos.table[pos.positions[t]]).
///
/// out: [num_tokens, hidden]; table: [vocab_size, hidden]; token_ids: [num_tokens].
/// A token id (or position) past its table gives a zero row (contribution), not a fault.
pub fn embedding<T: FloatElem>(
    dev: &CudaDevice,
    out: &mut DeviceBuffer<T>,
    table: &DeviceBuffer<T>,
    token_ids: &DeviceBuffer<u32>,
    learned_positions: Option<LearnedPositions<'_, T>>,
    hidden: usize,
) -> Result<(), CudaError> {
    const OP: &str = "embedding";
    dev.check_buffer(OP, "out", out)?;
    dev.check_buffer(OP, "table", table)?;
    dev.check_buffer(OP, "token_ids", token_ids)?;
    if hidden == 0 || !table.len().is_multiple_of(hidden) {
        return Err(CudaError::invalid(
            OP,
            "hidden",
            hidden,
            format!(
                "must be > 0 and divide the table's {} elements",
                table.len()
            ),
        ));
    }
    let num_tokens = token_ids.len();
    expect_len(OP, "out", out, num_tokens * hidden)?;
    let vocab_size = table.len() / hidden;
    let mut max_positions = 0;
    if let Some(pos) = &learned_positions {
        dev.check_buffer(OP, "position table", pos.table)?;
        dev.check_buffer(OP, "positions", pos.positions)?;
        if pos.table.len() % hidden != 0 {
            return Err(CudaError::length(
                OP,
                "position table",
                pos.table.len().next_multiple_of(hidden),
                pos.table.len(),
            ));
        }
        expect_len(OP, "positions", pos.positions, num_tokens)?;
        max_positions = pos.table.len() / hidden;
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Embedding, &[], &entry)?;
    let (hidden_i, vocab_i, max_pos_i) = (
        to_i32(OP, "hidden", hidden)?,
        to_i32(OP, "vocab_size", vocab_size)?,
        to_i32(OP, "max_positions", max_positions)?,
    );
    let cfg = grid((to_u32(OP, "num_tokens", num_tokens)?, 1), 256);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
        .arg(&table.slice)
        .arg(&token_ids.slice);
    match &learned_positions {
        Some(pos) => b.arg(&pos.table.slice).arg(&pos.positions.slice),
        None => b.arg(&NULL_PTR).arg(&NULL_PTR),
    };
    b.arg(&hidden_i).arg(&vocab_i).arg(&max_pos_i);
    // SAFETY: the arguments match embedding.cu's signature (out, table, token_ids, pos_table,
    // positions, hidden, vocab_size, max_positions); out holds num_tokens * hidden elements,
    // table vocab_size * hidden, pos_table max_positions * hidden, positions num_tokens (all
    // checked above, all on this device); ids and positions are bounds-checked in the kernel.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}
