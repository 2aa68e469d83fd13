//! Build script of the ferrum crate: limits what `libtriton_ferrum.so` exports to Triton's
//! `TRITONBACKEND_*` entry points (a linker version script), so no Rust or dependency symbol
//! can clash with another backend loaded into the same tritonserver process.

fn main() {
    let map = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/exports.map");
    println!("cargo:rerun-if-changed={}", map.display());
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
}
