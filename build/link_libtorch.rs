//! Build script shared by every crate that links libtorch (see `libtorch_rpath.rs`).
include!("libtorch_rpath.rs");

fn main() {
    link_libtorch();
}
