//! The request to stop, handed to whatever must heed it: the training loop finishes its step,
//! checkpoints and returns [`crate::Error::Interrupted`]-free with `stopped_early`; the local
//! launcher passes it on to its ranks. A value, not a global: each run has its own, and a
//! signal handler, a GUI or a test sets it alike.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A shared flag: clones see the same request.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Not requested yet.
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Asks to stop. Returns whether this was the first request (so that a handler says so
    /// once). Safe from a signal handler's thread (`ctrlc` runs handlers on a thread of their own).
    pub fn request(&self) -> bool {
        !self.0.swap(true, Ordering::SeqCst)
    }

    /// Whether stopping was asked for.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
