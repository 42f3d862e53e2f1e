//! Data-parallel training across processes and machines on c10d, PyTorch's own distributed
//! engine (through [`crate::bridge`]): how a process learns its place ([`Launch`], from
//! torchrun's or Slurm's variables), the [`ProcessGroup`] it joins, and the collectives a
//! training loop needs — the first weights from rank 0, gradients averaged in one flat
//! all-reduce, settings agreed at start — each naming the rank at fault when one fails.
//! [`launch`] starts local ranks itself, as `torchrun --standalone` does.
//!
//! A data-parallel loop of one's own, launched by `torchrun --no-python` or `srun`:
//!
//! ```no_run
//! use cifar_fast::dist::{DEFAULT_TIMEOUT, ProcessGroup};
//! use cifar_fast::{Dataset, Loader};
//! use tch::{Device, nn};
//!
//! // None when not launched by torchrun/srun/--nproc-per-node: one process.
//! let group = ProcessGroup::from_env(Device::Cpu, DEFAULT_TIMEOUT)?.expect("launched with torchrun");
//! let vs = nn::VarStore::new(group.device());
//! // ... build the model on vs.root() ...
//! group.broadcast_weights(&vs)?; // all ranks start from rank 0's weights
//! let mut loader = Loader::builder(Dataset::open("data/cifar10-train.safetensors")?)
//!     .batch_size(16)
//!     .shuffle(true)
//!     .seed(0)
//!     .shard(group.rank(), group.world()) // this rank's share of each epoch
//!     .build()?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     // loss.backward() ...
//!     group.average_gradients(&vs)?; // one all-reduce of all gradients, flat
//!     // optimizer step ...
//! }
//! # Ok::<(), cifar_fast::Error>(())
//! ```
pub mod launch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Tensor, nn};

use crate::bridge::{Group, Store};
use crate::error::{Error, Result};

/// How long a rank waits for the others by default: to join, and at each collective. Past it,
/// a rank that hangs is named and the run ends with an error rather than waiting forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// This process's place in a distributed job, as its launcher describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Processes in the job.
    pub world: usize,
    /// Rank among this machine's processes (its GPU, on CUDA).
    pub local_rank: usize,
    /// Processes on this machine.
    pub local_world: usize,
    /// Where the rendezvous store is served (`MASTER_ADDR`).
    pub master_addr: String,
    /// Its port (`MASTER_PORT`).
    pub master_port: u16,
    /// torchrun's agent serves the store (`TORCHELASTIC_USE_AGENT_STORE=True`), so no rank does;
    /// otherwise rank 0 serves it.
    pub agent_store: bool,
    /// torchrun's restart count, which keeps a restarted job's keys apart from the last try's.
    pub attempt: u64,
}

impl Launch {
    /// The job this process belongs to, from torchrun's variables (`RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, as `cifar-train
    /// --nproc-per-node` also sets them) or, without them, from Slurm's (`SLURM_PROCID`,
    /// `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR` set by the job script and
    /// `MASTER_PORT` 29500 by default). `None` for a plain single process (no `WORLD_SIZE`, and
    /// not one of several Slurm tasks). A variable that is set but wrong is an error naming it.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Launch::from_env`] over any source of variables (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |name: &str, value: String| -> Result<usize> {
            value.trim().parse::<usize>().map_err(|_| {
                Error::Distributed(format!("{name}={value:?}: expected a whole number, 0 or more"))
            })
        };
        let required = |name: &str| -> Result<String> {
            var(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                Error::Distributed(format!(
                    "{name} is not set: a distributed launch (torchrun, srun, cifar-train \
                     --nproc-per-node) needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
                ))
            })
        };
        let (rank, world, local_rank, local_world, port) = if let Some(world) = var("WORLD_SIZE") {
            let world = number("WORLD_SIZE", world)?;
            let rank = number("RANK", required("RANK")?)?;
            let local_rank = var("LOCAL_RANK").map(|v| number("LOCAL_RANK", v)).transpose()?.unwrap_or(rank);
            let local_world =
                var("LOCAL_WORLD_SIZE").map(|v| number("LOCAL_WORLD_SIZE", v)).transpose()?.unwrap_or(world);
            (rank, world, local_rank, local_world, required("MASTER_PORT")?)
        } else if let (Some(id), Some(tasks)) = (var("SLURM_PROCID"), var("SLURM_NTASKS")) {
            let world = number("SLURM_NTASKS", tasks)?;
            if world <= 1 {
                return Ok(None);
            }
            let rank = number("SLURM_PROCID", id)?;
            let local_rank =
                var("SLURM_LOCALID").map(|v| number("SLURM_LOCALID", v)).transpose()?.unwrap_or(0);
            // "2(x3)": 2 tasks on each of 3 nodes; "3,2": uneven, this node's is not told apart.
            let local_world = var("SLURM_NTASKS_PER_NODE")
                .or_else(|| var("SLURM_TASKS_PER_NODE"))
                .and_then(|v| v.split(['(', ',']).next()?.trim().parse::<usize>().ok())
                .unwrap_or(1)
                .max(local_rank + 1);
            (rank, world, local_rank, local_world, var("MASTER_PORT").unwrap_or_else(|| "29500".into()))
        } else {
            return Ok(None);
        };
        if world == 0 || rank >= world {
            return Err(Error::Distributed(format!("RANK {rank} is not below WORLD_SIZE {world}")));
        }
        if local_world == 0 || local_rank >= local_world {
            return Err(Error::Distributed(format!(
                "LOCAL_RANK {local_rank} is not below LOCAL_WORLD_SIZE {local_world}"
            )));
        }
        let master_port = port.trim().parse::<u16>().map_err(|_| {
            Error::Distributed(format!("MASTER_PORT={port:?}: expected a port number, 0 to 65535"))
        })?;
        Ok(Some(Launch {
            rank,
            world,
            local_rank,
            local_world,
            master_addr: required("MASTER_ADDR")?,
            master_port,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
            attempt: var("TORCHELASTIC_RESTART_COUNT").and_then(|v| v.parse().ok()).unwrap_or(0),
        }))
    }

    /// The device a rank trains on: the CPU, or on CUDA its own GPU, `LOCAL_RANK`.
    pub fn device(&self, requested: Device) -> Device {
        match requested {
            Device::Cuda(_) => Device::Cuda(self.local_rank),
            other => other,
        }
    }
}

/// Pins this process (all its threads, and those it starts later) to its share of the cores
/// it may run on: local rank `r` of `n` takes the `r`-th of `n` equal runs of them. Ranks that
/// share a machine then no longer trade cores and caches between steps, and a step's all-reduce
/// no longer waits on a rank the scheduler moved (on 2 cores, 2 ranks × 16 trained 1.47× faster
/// pinned). Returns the cores taken, or `None` where there are fewer cores than local ranks
/// (nothing is changed) or the system refused.
#[cfg(target_os = "linux")]
pub fn pin_to_share(local_rank: usize, local_world: usize) -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size is the set's own.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    // SAFETY: CPU_ISSET reads the set in bounds (i < CPU_SETSIZE).
    let cpus: Vec<usize> =
        (0..libc::CPU_SETSIZE as usize).filter(|&i| unsafe { libc::CPU_ISSET(i, &set) }).collect();
    if local_world == 0 || cpus.len() < local_world || local_rank >= local_world {
        return None;
    }
    let per = cpus.len() / local_world;
    let mine = cpus[local_rank * per..(local_rank + 1) * per].to_vec();
    // SAFETY: as above, a valid empty set, then CPU_SET in bounds.
    let mut want: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in &mine {
        // SAFETY: c < CPU_SETSIZE (it came from the scan above).
        unsafe { libc::CPU_SET(c, &mut want) };
    }
    // Every thread there is now (libtorch's, the Ctrl-C handler's), by its task id.
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        // SAFETY: a task id of this process, and a valid set of the size given.
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &want) } != 0 {
            return None;
        }
    }
    Some(mine)
}

/// A c10d process group this process has joined: Gloo for CPU tensors, NCCL for CUDA ones.
///
/// Every collective is made by all ranks in the same order with tensors of the same shape;
/// one that fails (a rank gone, or silent past the timeout) is an [`Error::Distributed`]
/// naming the rank at fault.
pub struct ProcessGroup {
    launch: Launch,
    device: Device,
    timeout: Duration,
    store: Arc<Store>,
    group: Group,
    /// Exchanges made so far: each has keys of its own (every rank makes them in the same
    /// order), so a second run on this group never reads an earlier run's values.
    exchanges: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.launch.rank)
            .field("world", &self.launch.world)
            .field("device", &self.device)
            .field("backend", &self.backend())
            .finish()
    }
}

impl ProcessGroup {
    /// Joins the job described by the environment ([`Launch::from_env`]) for tensors on
    /// `device` (a CUDA device is replaced by the rank's own, `LOCAL_RANK`). `None` for a plain
    /// single process.
    pub fn from_env(device: Device, timeout: Duration) -> Result<Option<ProcessGroup>> {
        Launch::from_env()?.map(|l| ProcessGroup::join(&l, device, timeout)).transpose()
    }

    /// [`ProcessGroup::join`], bounded whatever answers at `MASTER_ADDR:MASTER_PORT`: an address
    /// that does not resolve is one error naming it; a join still unfinished after `timeout`
    /// (a port served by something that is not a store, which c10d waits on for ever) or
    /// interrupted by `interrupt` ends the process with one line naming the address (exit 1,
    /// or 130 when interrupted): no thread can be made to leave c10d's blocking calls.
    pub fn join_within(
        launch: &Launch,
        device: Device,
        timeout: Duration,
        interrupt: &crate::interrupt::Interrupt,
    ) -> Result<ProcessGroup> {
        use std::net::ToSocketAddrs;
        let (addr, port) = (launch.master_addr.clone(), launch.master_port);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watch = interrupt.clone();
        let rank = launch.rank;
        let deadline = std::time::Instant::now() + timeout + Duration::from_secs(5);
        let watchdog = std::thread::spawn(move || {
            loop {
                match done_rx.recv_timeout(Duration::from_millis(100)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let (why, code) = if watch.requested() {
                    ("interrupted while joining", 130)
                } else if std::time::Instant::now() > deadline {
                    ("no rendezvous store answered", 1)
                } else {
                    continue;
                };
                eprintln!(
                    "cifar-train: error: rank {rank}: {why} at {addr}:{port} (MASTER_ADDR:MASTER_PORT) \
                     within {} s: is a c10d store served there?",
                    timeout.as_secs()
                );
                std::process::exit(code);
            }
        });
        let joined = (launch.master_addr.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::Distributed(format!("MASTER_ADDR {}: cannot be resolved ({e})", launch.master_addr))
            })
            .and_then(|_| Self::join(launch, device, timeout));
        let _ = done_tx.send(());
        let _ = watchdog.join();
        joined
    }

    /// Joins the job `launch` describes: connects to (rank 0: serves) the TCPStore at
    /// `MASTER_ADDR:MASTER_PORT`, then makes the process group under the keys Python's
    /// default group uses, so `torch.distributed.init_process_group` ranks could join it.
    /// Waits up to `timeout` for all ranks; `timeout` then bounds each collective.
    pub fn join(launch: &Launch, device: Device, timeout: Duration) -> Result<ProcessGroup> {
        let device = launch.device(device);
        let backend = backend_for(device);
        let (addr, port) = (&launch.master_addr, launch.master_port);
        let serve = launch.rank == 0 && !launch.agent_store;
        let store = Store::connect(addr, port, launch.world, serve, timeout).map_err(|e| {
            Error::Distributed(format!(
                "cannot {} the rendezvous store at {addr}:{port} (MASTER_ADDR:MASTER_PORT) within {} s: {e}",
                if serve { "serve" } else { "reach" },
                timeout.as_secs()
            ))
        })?;
        let index = if let Device::Cuda(i) = device { i } else { 0 };
        let group = Group::new(&store, backend, launch.rank, launch.world, index, timeout).map_err(|e| {
            Error::Distributed(format!(
                "cannot join the {backend} process group of {} ranks within {} s: {e}",
                launch.world,
                timeout.as_secs()
            ))
        })?;
        Ok(ProcessGroup {
            launch: launch.clone(),
            device,
            timeout,
            store: Arc::new(store),
            group,
            exchanges: Default::default(),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    /// Processes in the job.
    pub fn world(&self) -> usize {
        self.launch.world
    }

    /// Whether this is rank 0, the one that prints, evaluates and writes.
    pub fn is_main(&self) -> bool {
        self.launch.rank == 0
    }

    /// How this process was launched.
    pub fn launch(&self) -> &Launch {
        &self.launch
    }

    /// The device this rank's tensors live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// "gloo" or "nccl".
    pub fn backend(&self) -> &'static str {
        backend_for(self.device)
    }

    /// Sums `tensor` over all ranks, in place.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        self.group.all_reduce_sum(tensor).map_err(|e| self.blame("an all-reduce", e))
    }

    /// Replaces `tensor` on every rank by rank `root`'s.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        self.group.broadcast(tensor, root).map_err(|e| self.blame("a broadcast", e))
    }

    /// Waits until every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.group.barrier().map_err(|e| self.blame("a barrier", e))
    }

    /// Gives every rank rank 0's values of all of `vs`'s variables (one broadcast of them
    /// flat), as DDP does at its start.
    pub fn broadcast_weights(&self, vs: &nn::VarStore) -> Result<()> {
        self.broadcast_variables(vs, |_| true)
    }

    /// Gives every rank rank 0's buffers: the variables that do not train (batch norms'
    /// running statistics), which each rank otherwise updates from its own shard. DDP
    /// broadcasts them before every forward pass (`broadcast_buffers=True`); since nothing in a
    /// training step reads them, broadcasting them where they are read (an evaluation, a
    /// checkpoint, an export) gives the same values, rank 0's, at a fraction of the cost.
    pub fn broadcast_buffers(&self, vs: &nn::VarStore) -> Result<()> {
        self.broadcast_variables(vs, |t| !t.requires_grad())
    }

    fn broadcast_variables(&self, vs: &nn::VarStore, keep: impl Fn(&Tensor) -> bool) -> Result<()> {
        let vars: Vec<Tensor> = sorted_variables(vs).into_iter().filter(|t| keep(t)).collect();
        if vars.is_empty() {
            return Ok(());
        }
        let flat = tch::no_grad(|| {
            Tensor::cat(&vars.iter().map(|t| t.detach().flatten(0, -1)).collect::<Vec<_>>(), 0)
        });
        self.broadcast(&flat, 0)?;
        tch::no_grad(|| unflatten_into(&flat, &vars, |v, slice| v.copy_(slice)));
        Ok(())
    }

    /// Replaces each gradient of `vs` by its mean over all ranks, in one all-reduce of them
    /// flat: the step of a custom data-parallel loop, between `backward()` and the optimizer.
    /// A variable without a gradient on this rank counts as zeros.
    pub fn average_gradients(&self, vs: &nn::VarStore) -> Result<()> {
        let vars: Vec<Tensor> = sorted_variables(vs).into_iter().filter(Tensor::requires_grad).collect();
        // Every variable needs a gradient to receive the others' mean: zeros where it has none.
        let missing: Vec<Tensor> =
            vars.iter().filter(|v| !v.grad().defined()).map(|v| (v * 0.0).sum(None)).collect();
        if !missing.is_empty() {
            Tensor::stack(&missing, 0).sum(None).backward();
        }
        let flat = tch::no_grad(|| {
            Tensor::cat(&vars.iter().map(|v| v.grad().flatten(0, -1)).collect::<Vec<_>>(), 0)
        });
        self.all_reduce_sum(&flat)?;
        let flat = flat / self.world() as f64;
        tch::no_grad(|| {
            unflatten_into(&flat, &vars, |v, slice| {
                v.grad().copy_(slice);
            })
        });
        Ok(())
    }

    /// Every rank's `mine` for step `what` of the start (one key each in the store), in rank
    /// order. An `Err` anywhere ends every rank with it, so that a rank that cannot start (bad
    /// data, a refused resume) stops the others at once, naming itself.
    ///
    /// Every rank makes the same exchanges in the same order; each one has keys of its own
    /// (numbered), so the same `what` exchanged again — a second run on this group — waits for
    /// the new values rather than reading the last ones.
    pub fn exchange(&self, what: &str, mine: std::result::Result<String, String>) -> Result<Vec<String>> {
        let n = self.exchanges.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let step = format!("{what}#{n}");
        let payload = match &mine {
            Ok(v) => format!("ok:{v}"),
            Err(e) => format!("error:{e}"),
        };
        self.store
            .set(&self.key(&format!("{step}/{}", self.rank())), payload.as_bytes())
            .map_err(|e| Error::Distributed(format!("cannot write to the rendezvous store: {e}")))?;
        if let Err(e) = mine {
            return Err(Error::Distributed(e));
        }
        let mut all = Vec::with_capacity(self.world());
        for r in 0..self.world() {
            let v = self.store.get(&self.key(&format!("{step}/{r}")), self.timeout).map_err(|e| {
                Error::Distributed(format!(
                    "rank {r} did not reach the start ({what}) within {} s: {e}",
                    self.timeout.as_secs()
                ))
            })?;
            let v = String::from_utf8_lossy(&v).into_owned();
            match v.split_once(':') {
                Some(("ok", v)) => all.push(v.to_string()),
                Some(("error", e)) => return Err(Error::Distributed(format!("rank {r}: {e}"))),
                _ => return Err(Error::Distributed(format!("rank {r} sent {v:?} for {what}"))),
            }
        }
        Ok(all)
    }

    /// Leaves this rank's error where the others look when their next collective fails, so
    /// they name it and its reason rather than only its silence.
    pub fn report_failure(&self, error: &str) {
        let _ = self.store.set(&self.key(&format!("error/{}", self.rank())), error.as_bytes());
    }

    fn key(&self, name: &str) -> String {
        format!("cifar-fast/{}/{name}", self.launch.attempt)
    }

    /// The error for a failed collective, naming the rank at fault. Each rank that sees a
    /// collective fail marks itself in the store and looks, for a few seconds, for the others'
    /// marks; a rank that left its error (see [`ProcessGroup::report_failure`]) is named with
    /// it, one that never marks itself died or hangs. A store that does not answer means rank
    /// 0, which serves it (unless torchrun's agent does), is gone.
    fn blame(&self, op: &str, error: String) -> Error {
        let (store, rank, world) = (self.store.clone(), self.rank(), self.world());
        let keys: Vec<(String, String)> =
            (0..world).map(|r| (self.key(&format!("failed/{r}")), self.key(&format!("error/{r}")))).collect();
        let look = Duration::from_secs(3).min(self.timeout);
        let (tx, rx) = crossbeam_channel::bounded(1);
        // The store may itself hang (its server stopped, not dead): looked at on a thread that
        // is abandoned when it takes too long.
        let _ = std::thread::Builder::new().name("cifar-blame".into()).spawn(move || {
            let verdict = look_for_fault(&store, &keys, rank, look);
            let _ = tx.send(verdict);
        });
        let served_by = if self.launch.agent_store { "torchrun's agent" } else { "rank 0" };
        let why = match rx.recv_timeout(look + Duration::from_secs(2)) {
            Ok(Ok(Verdict { failed, .. })) if !failed.is_empty() => {
                failed.iter().map(|(r, e)| format!("rank {r} failed: {e}")).collect::<Vec<_>>().join("; ")
            }
            Ok(Ok(Verdict { silent, .. })) if !silent.is_empty() => format!(
                "{} stopped answering (exited, was killed, or hangs)",
                silent.iter().map(|r| format!("rank {r}")).collect::<Vec<_>>().join(", ")
            ),
            Ok(Ok(_)) => "every rank saw it fail".to_string(),
            Ok(Err(_)) | Err(_) => format!(
                "{} is gone (the rendezvous store it serves at {}:{} does not answer)",
                served_by, self.launch.master_addr, self.launch.master_port
            ),
        };
        Error::Distributed(format!("{op} of the {} group failed: {why} ({})", self.backend(), error.trim()))
    }
}

/// What the ranks other than the one looking left in the store after a collective failed.
struct Verdict {
    /// Ranks that left their error, with it.
    failed: Vec<(usize, String)>,
    /// Ranks that did not mark the failure as seen.
    silent: Vec<usize>,
}

/// Marks the failure as seen by `rank`, then looks for the others' marks (`keys[r]`: the mark,
/// the error) until all are there, an error is, or `look` has passed.
fn look_for_fault(
    store: &Store,
    keys: &[(String, String)],
    rank: usize,
    look: Duration,
) -> std::result::Result<Verdict, String> {
    store.set(&keys[rank].0, b"")?;
    let until = Instant::now() + look;
    loop {
        let mut v = Verdict { failed: Vec::new(), silent: Vec::new() };
        for (r, (mark, err)) in keys.iter().enumerate().filter(|(r, _)| *r != rank) {
            if store.check(err)? {
                v.failed.push((r, String::from_utf8_lossy(&store.get(err, look)?).into_owned()));
            } else if !store.check(mark)? {
                v.silent.push(r);
            }
        }
        if !v.failed.is_empty() || v.silent.is_empty() || Instant::now() >= until {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// c10d's backend for tensors on `device`: NCCL for CUDA, Gloo for the CPU.
fn backend_for(device: Device) -> &'static str {
    if device.is_cuda() { "nccl" } else { "gloo" }
}

/// `vs`'s variables in name order, the order every rank agrees on.
fn sorted_variables(vs: &nn::VarStore) -> Vec<Tensor> {
    crate::train::model::variables_by_name(vs).into_iter().map(|(_, t)| t).collect()
}

/// Calls `write(variable, its slice of flat)` for each variable, in order.
fn unflatten_into(flat: &Tensor, vars: &[Tensor], mut write: impl FnMut(&mut Tensor, &Tensor)) {
    let mut offset = 0;
    for v in vars {
        let n = v.numel() as i64;
        let slice = flat.narrow(0, offset, n).view(v.size().as_slice());
        let mut v = v.shallow_clone();
        write(&mut v, &slice);
        offset += n;
    }
}
