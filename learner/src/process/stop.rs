//! SIGTERM and SIGINT as a request to stop rather than a sudden death: the learner's rank
//! 0 ends the step in progress, writes a final checkpoint and exits, and `quill launch`
//! stops its children. Every quill process that catches them shares this one flag.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the flag that [`requested`] reads.
pub fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether SIGINT or SIGTERM arrived since [`catch_signals`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
