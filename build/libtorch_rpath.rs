/// Bakes libtorch's library folder into the rpath of this crate's binaries and tests.
///
/// torch-sys (`links = "tch"`) tells its direct dependents where libtorch's shared
/// libraries are (`DEP_TCH_LIBTORCH_LIB`), so nothing has to be exported at run time.
/// `-ltorch` is kept with `--no-as-needed` so that `libtorch_cuda` stays linked and CUDA is
/// detected on GPU machines.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
