//! safetensors reader (in progress).
