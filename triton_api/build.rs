//! Generates Rust bindings from `triton.h` (ferrum's own declarations of the Triton C API it
//! uses). Functions are emitted as a `TritonApi` struct of function pointers resolved at run time
//! (`--dynamic-loading`), so nothing here links against libtritonserver.so. Needs libclang
//! (Debian: `apt-get install libclang-dev`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=triton.h");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    let bindings = bindgen::Builder::default()
        .header("triton.h")
        .allowlist_function("TRITON(SERVER|BACKEND)_.*")
        .allowlist_type("TRITON(SERVER|BACKEND)_.*")
        .allowlist_var("TRITON(SERVER|BACKEND)_.*")
        .prepend_enum_name(false)
        .dynamic_library_name("TritonApi")
        .dynamic_link_require_all(true)
        .layout_tests(false)
        .generate();
    let bindings = match bindings {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bindgen failed on triton_api/triton.h: {e} (is libclang-dev installed?)");
            std::process::exit(1);
        }
    };
    if let Err(e) = bindings.write_to_file(out.join("triton_bindings.rs")) {
        eprintln!("cannot write the Triton bindings: {e}");
        std::process::exit(1);
    }
}
