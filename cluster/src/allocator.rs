//! glibc malloc settings for tensor work: by default glibc serves every allocation above
//! a (dynamic, at most 32 MiB) threshold with its own `mmap` and returns it to the kernel
//! when freed, so each training step or decoding batch faults in and zeroes the pages of
//! its activations and gradients afresh (`perf` showed 12 % of a learner step's time in
//! the kernel's page-fault path). Serving them from the heap, and keeping up to 1 GiB of
//! freed heap for the next step, removes that work.

/// Allocations below this come from the heap.
const MMAP_THRESHOLD: i32 = 256 << 20;
/// Freed heap memory kept before any is returned to the kernel.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Applies the settings; call before anything allocates tensors.
pub fn tune() {
    // SAFETY: mallopt only changes glibc's allocation parameters; it is called once, at
    // start-up, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
