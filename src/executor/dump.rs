//! Named intermediates of the forward pass, written to disk for a layer-by-layer comparison with
//! a reference (Hugging Face transformers' hidden states, or the other device): `ferrum generate
//! --dump-intermediates DIR`. Each tap of each step becomes one `.npy` file (little-endian f32,
//! `[rows, cols]`, readable with `numpy.load`):
//!
//! ```text
//!   DIR/step000/embedding.npy             X after the embedding (and its norm)
//!   DIR/step000/layer00.attn_norm.npy     ... one file per tap of the layer (see model::decoder)
//!   DIR/step000/final_norm.npy, lm_head.npy
//! ```
//! Step 0 is the prompt's prefill (all its tokens, one row each); later steps are decode steps.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::model::decoder::Tap;

/// Writes taps under one folder, one subfolder per step.
#[derive(Debug)]
pub struct Dumper {
    dir: PathBuf,
    step: usize,
}

impl Dumper {
    /// Dumps into `dir` (created if missing).
    pub fn new(dir: &Path) -> crate::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        Ok(Dumper {
            dir: dir.to_path_buf(),
            step: 0,
        })
    }

    /// Writes one tap's buffer, `[data.len() / row_len, row_len]`.
    pub fn write(&mut self, tap: Tap, data: &[f32], row_len: usize) -> crate::Result<()> {
        let dir = self.dir.join(format!("step{:03}", self.step));
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let file = match tap.layer {
            Some(l) => format!("layer{l:02}.{}.npy", tap.name),
            None => format!("{}.npy", tap.name),
        };
        let path = dir.join(file);
        let rows = data.len().checked_div(row_len).unwrap_or(0);
        std::fs::write(&path, npy_f32(data, rows, row_len)).map_err(|e| io_err(&path, e))
    }

    /// Later taps go to the next step's folder.
    pub fn next_step(&mut self) {
        self.step += 1;
    }
}

fn io_err(path: &Path, e: std::io::Error) -> crate::Error {
    super::batch::ExecutorError::Device(format!("dumping intermediates to {}: {e}", path.display()))
        .into()
}

/// The bytes of a version-1.0 `.npy` file of a `[rows, cols]` little-endian f32 array.
pub fn npy_f32(data: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of
    // 64 bytes and ended by a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        // Vec<u8> writes cannot fail.
        let _ = out.write_all(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let bytes = npy_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(
            header.contains("'shape': (2, 3)") && header.ends_with('\n'),
            "{header}"
        );
        let data: Vec<f32> = bytes[10 + hlen..]
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
