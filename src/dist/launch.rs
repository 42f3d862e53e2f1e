//! Starting local ranks, as `torchrun --standalone --nproc-per-node N` does: the same program
//! N times, each told its place through torchrun's variables, with a free port on 127.0.0.1
//! for the rendezvous; interrupts passed on; a rank left running after another failed is
//! stopped once the others have had their timeout to notice.
use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::interrupt::Interrupt;

/// How one rank ended.
#[derive(Debug)]
pub struct RankExit {
    /// Its rank.
    pub rank: usize,
    /// Its exit status.
    pub status: ExitStatus,
    /// The launcher killed it: still running `grace` after another rank failed.
    pub killed: bool,
}

impl RankExit {
    /// What happened, for a line of the launcher's report (`None` for a clean exit).
    pub fn problem(&self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        if self.status.success() {
            return None;
        }
        Some(match (self.killed, self.status.code(), self.status.signal()) {
            (true, ..) => format!("rank {} was still running after another rank failed: stopped", self.rank),
            (_, Some(code), _) => format!("rank {} exited with code {code}", self.rank),
            (_, None, Some(sig)) => format!("rank {} was killed by signal {sig}", self.rank),
            _ => format!("rank {} ended: {}", self.rank, self.status),
        })
    }
}

/// `--nproc-per-node N`: this program again as `n` ranks of one job on this machine, with the
/// arguments it was given less that option, as `torchrun --standalone --nproc-per-node N`
/// would start them; waits for all of them ([`local`]) and ends with one error naming each
/// rank that failed (a rank that exited 130 because `interrupt` was passed on to it did not).
pub fn relaunch_self(n: usize, grace: Duration, interrupt: &Interrupt) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
    let mut args = Vec::new();
    let mut given = std::env::args_os().skip(1);
    while let Some(a) = given.next() {
        let s = a.to_string_lossy();
        if s == "--nproc-per-node" || s == "--nproc_per_node" {
            given.next();
        } else if !(s.starts_with("--nproc-per-node=") || s.starts_with("--nproc_per_node=")) {
            args.push(a);
        }
    }
    let exits = local(n, &exe, &args, grace, interrupt)?;
    let problems: Vec<String> = exits
        .iter()
        .filter(|e| !(e.status.code() == Some(130) && interrupt.requested()))
        .filter_map(RankExit::problem)
        .collect();
    if problems.is_empty() { Ok(()) } else { Err(Error::Distributed(problems.join("; "))) }
}

/// Runs `exe args` as ranks `0..n` of one job on this machine and waits for all of them.
///
/// Each rank gets `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`
/// (127.0.0.1) and `MASTER_PORT` (a free port), and the launcher's stdin/stdout/stderr. When
/// `interrupt` is requested (the caller's Ctrl-C/SIGTERM handler), each rank is sent SIGINT
/// once, so all stop at one step and checkpoint. When a rank fails, the others are given
/// `grace` to notice and end by themselves (they name the failed rank), then killed.
pub fn local(
    n: usize,
    exe: &Path,
    args: &[OsString],
    grace: Duration,
    interrupt: &Interrupt,
) -> Result<Vec<RankExit>> {
    let port = free_port()?;
    // Whatever ends this function early (a rank that cannot start, a failed wait, a stop asked
    // for while they start), the ranks still running are stopped with it: none outlives the
    // launcher's error. Should the launcher itself be killed, each rank's parent-death signal
    // ends it.
    let mut children = Running(Vec::with_capacity(n));
    for rank in 0..n {
        if interrupt.requested() {
            return Err(Error::Interrupted);
        }
        let mut cmd = rank_command(exe, rank, n, port);
        end_with_parent(&mut cmd);
        let child = cmd.args(args).spawn().map_err(|e| Error::io(exe, e))?;
        children.0.push((rank, child));
    }
    let children = &mut children.0;
    let mut exits = Vec::with_capacity(n);
    let mut passed_on = false;
    let mut failed_at: Option<Instant> = None;
    while !children.is_empty() {
        if interrupt.requested() && !passed_on {
            passed_on = true;
            for (_, c) in children.iter() {
                // SAFETY: `kill` with a pid of our own child that has not been waited for (so
                // not reused) and a valid signal number has no memory effects.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            }
        }
        let overdue = failed_at.is_some_and(|t| t.elapsed() > grace);
        let mut i = 0;
        while i < children.len() {
            let (rank, child) = &mut children[i];
            let done = match child.try_wait().map_err(|e| Error::io(exe, e))? {
                Some(status) => Some((status, false)),
                None if overdue => {
                    let _ = child.kill();
                    Some((child.wait().map_err(|e| Error::io(exe, e))?, true))
                }
                None => None,
            };
            match done {
                Some((status, killed)) => {
                    if !status.success() && failed_at.is_none() {
                        failed_at = Some(Instant::now());
                    }
                    exits.push(RankExit { rank: *rank, status, killed });
                    children.swap_remove(i);
                }
                None => i += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    exits.sort_by_key(|e| e.rank);
    Ok(exits)
}

/// Makes the process `cmd` starts receive SIGKILL when this thread (the launcher's main thread,
/// which waits for the ranks) ends, however it ends: ranks never outlive a killed launcher.
fn end_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid is async-signal-safe and touches no memory.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, getppid, raise), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died between the fork and the prctl.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
}

/// Refuses `n` local CPU ranks on a machine with fewer cores (unless `oversubscribe`: each rank
/// then runs slower than one process would) or with less memory than `n` ranks take
/// ([`RANK_MEMORY`] each, whatever the flag).
pub fn check_local_ranks(n: usize, oversubscribe: bool) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n > cores && !oversubscribe {
        return Err(Error::Config(format!(
            "--nproc-per-node {n}: more CPU ranks than this machine's {cores} cores (each would \
             train slower than one process); pass --oversubscribe to start them anyway"
        )));
    }
    if let Some(free) = cifar_data::store::available_memory() {
        let need = n as u64 * RANK_MEMORY;
        if need > free {
            return Err(Error::Config(format!(
                "--nproc-per-node {n}: {n} ranks take about {:.1} GB ({} MB each), and {:.1} GB is \
                 available",
                need as f64 / 1e9,
                RANK_MEMORY >> 20,
                free as f64 / 1e9
            )));
        }
    }
    Ok(())
}

/// The memory one CPU rank takes at least: libtorch, its threads, the model, the loader's
/// buffers (the data's mapping is shared by all).
pub const RANK_MEMORY: u64 = 300 << 20;

/// The ranks not yet waited for; killed and reaped when dropped.
struct Running(Vec<(usize, Child)>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `exe` as local rank `rank` of `world` on this machine, its rendezvous at
/// `127.0.0.1:port`: torchrun's variables set as `torchrun --standalone` sets them, and
/// torchrun's agent store (which this launch has none of) unset.
pub fn rank_command(exe: impl AsRef<std::ffi::OsStr>, rank: usize, world: usize, port: u16) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
    cmd
}

/// A port nothing listens on now, for a rendezvous store on 127.0.0.1, chosen below the
/// kernel's ephemeral range: a port from that range, released for rank 0 to bind an instant
/// later, could meanwhile be handed to any socket bound to port 0 — Gloo binds its own that
/// way — and the store would then fail to start. (Another program choosing the same port
/// makes the start fail, not hang.)
pub fn free_port() -> Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(20000).max(1) as u64;
    // A random start per process (std's hasher keys are random), so that two launches at once
    // try different ports.
    let random = std::hash::RandomState::new();
    for attempt in 0..64u64 {
        let x = std::hash::BuildHasher::hash_one(&random, (std::process::id(), attempt));
        let port = 20000 + (x % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Distributed(format!("cannot find a free port on 127.0.0.1: {e}")))
}
