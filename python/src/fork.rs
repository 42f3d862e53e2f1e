//! Which process this is, for objects that a `fork()` copied into a child without their
//! threads: each fork bumps a generation in the child (`pthread_atfork`), and an object made
//! in another generation neither waits for its workers (they are the parent's) nor touches a
//! lock that one of them may have held at the fork.
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers the child handler, once per process (at import).
pub fn watch() {
    static ONCE: Once = Once::new();
    // SAFETY: `in_child` only bumps an atomic, which is async-signal-safe, as a handler run in
    // a freshly forked child must be; the other two handlers are none.
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(in_child));
    });
}

/// This process's generation: 0 in the process that imported the package, one more in each
/// fork below it.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}
