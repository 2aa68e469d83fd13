//! Read-only file mapping for the checkpoint loaders, and the byte container they parse.
//!
//! This module holds one of the two documented `unsafe` exceptions outside the device and Triton
//! FFI layers (docs/architecture.md): the call to `memmap2::Mmap::map`. It must never hand out mutable access to mapped memory, and nothing else
//! in the loaders may map files on its own.

use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::LoadError;

/// Maps `path` read-only into memory.
pub fn map_file(path: &Path) -> Result<Mmap, LoadError> {
    let io_err = |source: std::io::Error| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    // SAFETY: `Mmap::map` is unsafe because the mapped bytes change (or the process gets SIGBUS)
    // if another process truncates or rewrites the file while it is mapped. Checkpoint files are
    // written once and only read while a model is loaded; we assume nobody modifies or truncates
    // them during that time. The mapping is read-only and every access goes through bounds-checked
    // slices of the length the file had when mapped.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
    Ok(mmap)
}

/// The bytes of a checkpoint: a memory-mapped file, or an owned buffer (files built in memory,
/// e.g. by tests).
#[derive(Debug)]
pub enum FileBytes {
    /// A read-only mapping of the whole file (`map_file`).
    Mapped(Mmap),
    /// Bytes held in memory (files built by tests or tools).
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps `path` (see `map_file`).
    pub fn map(path: &Path) -> Result<Self, LoadError> {
        map_file(path).map(FileBytes::Mapped)
    }
}

impl Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// Label used in errors for a buffer that did not come from a file.
pub fn memory_label(name: &str) -> PathBuf {
    PathBuf::from(format!("<memory:{name}>"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn maps_file_contents_and_reports_missing_file() {
        let dir = std::env::temp_dir().join(format!("ferrum-mmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.bin");
        std::fs::write(&path, b"hello").unwrap();
        let bytes = FileBytes::map(&path).unwrap();
        assert_eq!(&bytes[..], b"hello");
        std::fs::write(dir.join("empty.bin"), b"").unwrap();
        assert_eq!(FileBytes::map(&dir.join("empty.bin")).unwrap().len(), 0);
        let err = map_file(&dir.join("missing.bin")).unwrap_err();
        assert!(err.to_string().contains("missing.bin"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
