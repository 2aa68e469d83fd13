//! Regenerates the Rust bindings of `triton.h` (ferrum's own declarations of the Triton C API it
//! uses), only when the `regenerate-bindings` feature is on. A normal build uses the committed
//! `src/bindings.rs` and needs no libclang; `ci/bindings.sh` turns the feature on (with a pinned
//! libclang from PyPI) to check that the committed file still matches the header, or to rewrite
//! it after `triton.h` changed.
//!
//! Functions are emitted as a `TritonApi` struct of function pointers resolved at run time
//! (`--dynamic-loading`), so nothing links against libtritonserver.so.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "regenerate-bindings")]
    regenerate::run();
}

#[cfg(feature = "regenerate-bindings")]
mod regenerate {
    use std::path::PathBuf;

    pub fn run() {
        println!("cargo:rerun-if-changed=triton.h");
        println!("cargo:rerun-if-env-changed=LIBCLANG_PATH");
        let out = match std::env::var("OUT_DIR") {
            Ok(dir) => PathBuf::from(dir),
            Err(_) => fail("OUT_DIR is not set (run through cargo)"),
        };
        let bindings = bindgen::Builder::default()
            .header("triton.h")
            .allowlist_function("TRITON(SERVER|BACKEND)_.*")
            .allowlist_type("TRITON(SERVER|BACKEND)_.*")
            .allowlist_var("TRITON(SERVER|BACKEND)_.*")
            .prepend_enum_name(false)
            .dynamic_library_name("TritonApi")
            .dynamic_link_require_all(true)
            .layout_tests(false)
            .generate()
            .unwrap_or_else(|e| {
                fail(&format!(
                    "bindgen failed on triton_api/triton.h: {e} (libclang: ci/bindings.sh installs a pinned one)"
                ))
            });
        if let Err(e) = bindings.write_to_file(out.join("triton_bindings.rs")) {
            fail(&format!("cannot write the Triton bindings: {e}"));
        }
    }

    fn fail(msg: &str) -> ! {
        eprintln!("{msg}");
        std::process::exit(1);
    }
}
