//! The C++ bridge: what tch lacks, reached in libtorch itself through `bridge.cpp` (compiled by
//! `build.rs`). Today that is c10d, PyTorch's distributed engine: its TCPStore rendezvous and
//! its process groups (Gloo on the CPU, NCCL on CUDA). Safe wrappers only; [`crate::dist`]
//! builds data-parallel training on them.
use std::ffi::{CStr, CString, c_char, c_int};
use std::time::Duration;

use tch::Tensor;

/// The opaque C++ objects.
#[repr(C)]
struct CStore {
    _private: [u8; 0],
}
#[repr(C)]
struct CGroup {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn cf_free(p: *mut c_char);
    fn cf_has_gloo() -> c_int;
    fn cf_has_nccl() -> c_int;
    fn cf_store_connect(
        host: *const c_char,
        port: u16,
        world: c_int,
        is_server: c_int,
        timeout_ms: i64,
        out: *mut *mut CStore,
    ) -> *mut c_char;
    fn cf_store_free(s: *mut CStore);
    fn cf_store_set(s: *mut CStore, key: *const c_char, value: *const u8, len: usize) -> *mut c_char;
    fn cf_store_get(
        s: *mut CStore,
        key: *const c_char,
        timeout_ms: i64,
        value: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
    fn cf_store_check(s: *mut CStore, key: *const c_char, present: *mut c_int) -> *mut c_char;
    fn cf_group_new(
        s: *mut CStore,
        backend: *const c_char,
        rank: c_int,
        world: c_int,
        device: c_int,
        timeout_ms: i64,
        out: *mut *mut CGroup,
    ) -> *mut c_char;
    fn cf_group_free(g: *mut CGroup);
    fn cf_group_allreduce_sum(g: *mut CGroup, tensor: *mut torch_sys::C_tensor) -> *mut c_char;
    fn cf_group_broadcast(g: *mut CGroup, tensor: *mut torch_sys::C_tensor, root: c_int) -> *mut c_char;
    fn cf_group_barrier(g: *mut CGroup) -> *mut c_char;
}

/// Turns the bridge's error convention (NULL, or a malloc'd message) into a `Result`.
fn check(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string the bridge allocated for us; it is
    // copied, then freed once with the bridge's own `free`.
    let message = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: as above; not used after this.
    unsafe { cf_free(err) };
    Err(message)
}

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"))
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Whether this build has the Gloo backend (gloo's headers were found when it was compiled).
pub fn has_gloo() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { cf_has_gloo() != 0 }
}

/// Whether this build has the NCCL backend.
pub fn has_nccl() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { cf_has_nccl() != 0 }
}

/// A connection to c10d's TCPStore, the key-value rendezvous all ranks share.
pub struct Store(*mut CStore);

// SAFETY: c10d's TCPStore is used from several threads by c10d itself (its client guards its
// socket with a mutex); the handle is only an owning pointer.
unsafe impl Send for Store {}
// SAFETY: as above: every method locks inside c10d.
unsafe impl Sync for Store {}

impl Store {
    /// Connects to `host:port`, serving the store there when `serve`. Waits up to `timeout` for
    /// the server (and, serving, for all `world` ranks to connect); `timeout` also bounds every
    /// later [`Store::get`] that gives none.
    pub fn connect(
        host: &str,
        port: u16,
        world: usize,
        serve: bool,
        timeout: Duration,
    ) -> Result<Store, String> {
        let host = c_string(host)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: `host` outlives the call; `out` is written only on success.
        check(unsafe {
            cf_store_connect(host.as_ptr(), port, world as c_int, serve as c_int, millis(timeout), &mut out)
        })?;
        Ok(Store(out))
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        let key = c_string(key)?;
        // SAFETY: `key` and `value` outlive the call, which copies them.
        check(unsafe { cf_store_set(self.0, key.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// Waits up to `timeout` for `key` to be set, then returns its value.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, String> {
        let key = c_string(key)?;
        let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: `key` outlives the call; `ptr`/`len` are written only on success.
        check(unsafe { cf_store_get(self.0, key.as_ptr(), millis(timeout), &mut ptr, &mut len) })?;
        // SAFETY: on success `ptr` holds `len` bytes the bridge malloc'd for us; copied, then freed.
        let value = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
        // SAFETY: as above; not used after this.
        unsafe { cf_free(ptr.cast()) };
        Ok(value)
    }

    /// Whether `key` is set now.
    pub fn check(&self, key: &str) -> Result<bool, String> {
        let key = c_string(key)?;
        let mut present = 0;
        // SAFETY: `key` outlives the call; `present` is a valid out-pointer.
        check(unsafe { cf_store_check(self.0, key.as_ptr(), &mut present) })?;
        Ok(present != 0)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle came from `cf_store_connect` and is freed once. A group made on it
        // holds its own reference to the C++ store, so it may outlive this handle.
        unsafe { cf_store_free(self.0) }
    }
}

/// A c10d process group's backend: collectives over all ranks.
pub struct Group(*mut CGroup);

// SAFETY: c10d backends are made to be called from any thread (Python's DDP calls them from
// autograd's); the handle is only an owning pointer.
unsafe impl Send for Group {}
// SAFETY: c10d backends queue collectives under their own lock (Gloo's work queue, NCCL's
// per-device state); what a caller must keep is the same order of collectives on every rank,
// which is about meaning, not memory.
unsafe impl Sync for Group {}

impl Group {
    /// Joins the group of `world` ranks on `store` as `rank`, with `backend` "gloo" (CPU
    /// tensors) or "nccl" (tensors on CUDA device `device`), under the keys Python's default
    /// group uses. `timeout` bounds the joining and then each collective.
    pub fn new(
        store: &Store,
        backend: &str,
        rank: usize,
        world: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<Group, String> {
        let backend = c_string(backend)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: `store` is a live handle, `backend` outlives the call, `out` is written only
        // on success.
        check(unsafe {
            cf_group_new(
                store.0,
                backend.as_ptr(),
                rank as c_int,
                world as c_int,
                device as c_int,
                millis(timeout),
                &mut out,
            )
        })?;
        Ok(Group(out))
    }

    /// Sums `tensor` over all ranks in place (every rank passes a tensor of the same shape,
    /// kind and device), waiting for the result.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<(), String> {
        // SAFETY: `as_ptr` is tch's `at::Tensor*`, alive for the call; the collective writes
        // into the tensor's storage, which the caller lent us mutably in intent (the sum is the
        // point), and tch tensors share storage by reference count as libtorch's do.
        check(unsafe { cf_group_allreduce_sum(self.0, tensor.as_ptr() as *mut _) })
    }

    /// Replaces `tensor` on every rank by rank `root`'s.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<(), String> {
        // SAFETY: as in `all_reduce_sum`.
        check(unsafe { cf_group_broadcast(self.0, tensor.as_ptr() as *mut _, root as c_int) })
    }

    /// Waits until every rank has called it.
    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: a live handle.
        check(unsafe { cf_group_barrier(self.0) })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: the handle came from `cf_group_new` and is freed once.
        unsafe { cf_group_free(self.0) }
    }
}
