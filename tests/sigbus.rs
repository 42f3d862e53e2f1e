//! The tensor files' SIGBUS handler (a clear error when a mapped file is truncated) leaves every
//! other SIGBUS to the handler the program had installed before it.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use cifar_fast::TensorFile;
use cifar_fast::prep::StoreDtype;
use common::*;

static CALLED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn programs_own(_: libc::c_int) {
    CALLED.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn a_sigbus_outside_a_tensor_file_reaches_the_handler_installed_before() {
    let dir = scratch("sigbus_chain");
    let path = tensor_file(&dir, 4, StoreDtype::F32);
    // SAFETY: installing a handler that only touches an atomic is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, programs_own as *const () as libc::sighandler_t) };
    // Opening a tensor file installs the file handler over the program's.
    let file = TensorFile::open(&path).unwrap();
    // A SIGBUS that is no fault in a mapping (raised, as a runtime or a test might).
    // SAFETY: `raise` delivers the signal to this thread; the handlers above are safe.
    unsafe { libc::raise(libc::SIGBUS) };
    assert_eq!(CALLED.load(Ordering::SeqCst), 1, "the program's own handler was not called");
    assert_eq!(file.len(), 5 * 4, "five training batches of 4");
}
