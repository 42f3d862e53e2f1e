//! A clear error, not a bare "Bus error", when a mapped tensor file is truncated under a run.
//!
//! Reading a page of a memory map past the end of a file that another program truncated raises
//! SIGBUS, which by default kills the process with no word of which file or why. The mapped
//! ranges of open [`super::TensorFile`]s are registered here; a SIGBUS inside one prints the
//! file's name and the cause to stderr and exits with status 1, unless the map was watched to
//! *survive* a truncation ([`survive`]): then the faulting page is replaced by a page of zeros,
//! the map is marked truncated ([`truncated`]), and the read goes on, for its reader to check the
//! mark after its copy and report the error. A SIGBUS anywhere else goes to
//! the handler that was installed before this one (the program's own, or a runtime's), or gets
//! the default action where there was none.
//!
//! The handler may only use async-signal-safe calls: it reads and sets atomics, `mmap`s a page
//! (a bare system call), `write`s a message made when the file was opened, and `_exit`s.
//! Written with `libc`: no crate turns a fault in a mapping into an error (`memmap2` leaves it
//! to the caller).
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// Maps watched at once; a file opened beyond that is simply not watched.
const SLOTS: usize = 256;

struct Watched {
    start: AtomicUsize,
    /// 0: free; `usize::MAX`: being filled in; else the mapped length.
    len: AtomicUsize,
    /// The message for this map: leaked bytes, `msg_len` of them.
    msg: AtomicPtr<u8>,
    msg_len: AtomicUsize,
    /// A fault in this map is survived (see [`survive`]), not fatal.
    survive: AtomicBool,
    /// A read of this map found the file truncated.
    truncated: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only to initialise the array below
const EMPTY: Watched = Watched {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    msg: AtomicPtr::new(std::ptr::null_mut()),
    msg_len: AtomicUsize::new(0),
    survive: AtomicBool::new(false),
    truncated: AtomicBool::new(false),
};
static WATCHED: [Watched; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
/// The page size, read when the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The SIGBUS action in place before ours, for faults that are not a tensor file's. Written
/// once, by `install`, before our handler can run; only read after.
#[cfg(target_os = "linux")]
static PREVIOUS: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();

/// Watches `len` mapped bytes at `start`, saying `message` if they fault. Returns the slot to
/// give to [`unwatch`], or `None` when every slot is taken.
pub(super) fn watch(start: *const u8, len: usize, message: String) -> Option<usize> {
    if len == 0 {
        return None;
    }
    INSTALL.call_once(install);
    for (i, w) in WATCHED.iter().enumerate() {
        if w.len.compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // Leaked on purpose: the handler may read it at any moment, even after `unwatch`.
            let msg: &'static mut [u8] = Box::leak(message.into_bytes().into_boxed_slice());
            w.msg_len.store(msg.len(), Ordering::Release);
            w.msg.store(msg.as_mut_ptr(), Ordering::Release);
            w.survive.store(false, Ordering::Release);
            w.truncated.store(false, Ordering::Release);
            w.start.store(start as usize, Ordering::Release);
            w.len.store(len, Ordering::Release);
            return Some(i);
        }
    }
    None
}

/// From now on a fault in slot `i`'s map is survived: the page that faulted reads as zeros and
/// [`truncated`] says so. The map's reader must check [`truncated`] after each copy out of it.
pub(super) fn survive(i: usize) {
    WATCHED[i].survive.store(true, Ordering::Release);
}

/// Whether a read of slot `i`'s (surviving) map found the file truncated: the bytes read from
/// the map before this call are the file's only if it says no.
pub(super) fn truncated(i: usize) -> bool {
    WATCHED[i].truncated.load(Ordering::SeqCst)
}

/// Stops watching slot `i` (the map is about to be unmapped).
pub(super) fn unwatch(i: usize) {
    WATCHED[i].len.store(0, Ordering::Release);
}

fn install() {
    #[cfg(target_os = "linux")]
    // SAFETY: `sigaction` with a zeroed struct, a handler of the SA_SIGINFO signature and an
    // empty mask is the documented way to install a handler. The action it replaces is read
    // first (a null new action only reads) and kept before ours is installed, so the handler
    // always finds it.
    unsafe {
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
            return;
        }
        let _ = PREVIOUS.set(previous);
        PAGE.store(libc::sysconf(libc::_SC_PAGESIZE).max(1) as usize, Ordering::Release);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

#[cfg(target_os = "linux")]
extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO handler; only atomics are
    // used, the message bytes were leaked (never freed), and `mmap`, `write`, `sigaction`,
    // `raise` and `_exit` are async-signal-safe system calls. The `mmap` only replaces a page
    // inside a watched map, which stays mapped until its `TensorFile` is dropped (after
    // `unwatch`), so no other memory is touched. The previous action was written before this
    // handler was installed; calling its handler with the arguments the kernel gave us is what
    // it would have received had it been the one installed.
    unsafe {
        let addr = (*info).si_addr() as usize;
        for w in &WATCHED {
            let (start, len) = (w.start.load(Ordering::Acquire), w.len.load(Ordering::Acquire));
            if len != 0 && len != usize::MAX && addr >= start && addr - start < len {
                if w.survive.load(Ordering::Acquire) {
                    // Marked before the page is replaced: a thread that reads the zeros
                    // without faulting itself (after the replacement) then sees the mark.
                    w.truncated.store(true, Ordering::SeqCst);
                    let page = PAGE.load(Ordering::Acquire);
                    let zeros = libc::mmap(
                        (addr & !(page - 1)) as *mut libc::c_void,
                        page,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                    if zeros != libc::MAP_FAILED {
                        return; // the faulting read runs again, on the zeros
                    }
                }
                let msg = w.msg.load(Ordering::Acquire);
                libc::write(2, msg as *const libc::c_void, w.msg_len.load(Ordering::Acquire));
                libc::_exit(1);
            }
        }
        // Not a tensor file's fault: what would have happened without this handler.
        match PREVIOUS.get() {
            Some(p) if p.sa_sigaction == libc::SIG_IGN => {}
            Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_flags & libc::SA_SIGINFO != 0 => {
                let chained: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(p.sa_sigaction);
                chained(signal, info, context);
            }
            Some(p) if p.sa_sigaction != libc::SIG_DFL => {
                let chained: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
                chained(signal);
            }
            _ => {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
                libc::raise(signal);
            }
        }
    }
}
