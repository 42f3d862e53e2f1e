//! How many threads libtorch's CPU kernels use: the count the user fixed; for ranks sharing a
//! machine, their share of its cores (each pinned to its own); for a lone process, the cores
//! that other programs leave free.
//!
//! libtorch splits each kernel across its threads (OpenMP) and waits for the slowest at the
//! kernel's end. When another busy program shares a core with one of them, that thread gets half
//! the core, every kernel waits for it, and the waiting threads spin: on 2 cores beside one busy
//! process, a 2-thread LeNet step ran at about a quarter of its quiet speed, a 1-thread one at
//! its full speed. So when the user does not fix `--threads`, the [`Governor`] measures, once a
//! second, how much CPU time the rest of the machine used (all CPUs' busy time from
//! `/proc/stat`, less this process's from `/proc/self/stat`), and sets the thread count to the
//! cores left.

use std::time::{Duration, Instant};

use crate::dist::Launch;

/// How [`set_up_threads`] set this process's threads up.
#[derive(Debug, Clone, Default)]
pub struct Threads {
    /// The cores this rank was pinned to, if it was.
    pub pinned: Option<Vec<usize>>,
    /// The count is left to [`crate::train::run`] to fit to what other programs leave free
    /// (its configuration's `adapt_threads`).
    pub adapt: bool,
}

/// Sets libtorch's thread count for this process, which is one of `local_ranks` on this
/// machine (`launch` says which, under a launcher): `fixed` where the user gave one. Ranks
/// sharing a machine pin themselves to their share of its cores (unless `pin` is false; see
/// [`crate::dist::pin_to_share`]) and take `OMP_NUM_THREADS` where the launcher set it
/// (torchrun sets 1), else
/// their share, fixed (a governor would take the other ranks for other programs). A lone
/// process adapts. Call it before starting any thread, so that all of them inherit the pinning.
pub fn set_up_threads(launch: Option<&Launch>, local_ranks: usize, fixed: Option<i32>, pin: bool) -> Threads {
    let pinned = match launch {
        Some(l) if l.local_world > 1 && pin => crate::dist::pin_to_share(l.local_rank, l.local_world),
        _ => None,
    };
    match fixed {
        Some(n) => tch::set_num_threads(n),
        None if local_ranks > 1 => {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            let omp = std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok());
            let share = pinned.as_ref().map_or(cores / local_ranks, Vec::len);
            tch::set_num_threads(omp.unwrap_or(share).max(1) as i32);
        }
        None => {}
    }
    Threads { adapt: fixed.is_none() && local_ranks == 1, pinned }
}

/// Time between two looks at the machine.
pub const EVERY: Duration = Duration::from_secs(1);

/// Threads for `cores` cores of which other programs keep `others` busy (in cores, from the
/// time they used): the idle ones, at least 1. A core counts as taken from 0.75 of it busy, so
/// that short blips (a shell, a process exiting) do not halve a run.
pub fn threads_for(cores: usize, others: f64) -> usize {
    let taken = (others + 0.25).floor().max(0.0) as usize;
    cores.saturating_sub(taken).max(1)
}

/// Busy time of all CPUs and of this process, in clock ticks.
fn sample() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user): all but idle
    // and iowait are busy.
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| cpu.get(i)).sum();
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name (which may hold spaces) in parentheses come fields 3 (the state)
    // onwards: utime and stime are fields 14 and 15, the 12th and 13th of these.
    let rest: Vec<&str> = me[me.rfind(')')? + 1..].split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some((busy, field(14)? + field(15)?))
}

/// Sets libtorch's thread count from what the rest of the machine uses; see the module's doc.
pub(crate) struct Governor {
    cores: usize,
    ticks_per_s: f64,
    last: Option<(Instant, (u64, u64))>,
    threads: usize,
}

impl Governor {
    /// Starts with a look over `first` (a short wait), and sets the thread count from it.
    /// `None` where the machine cannot be read (not Linux).
    pub fn start(first: Duration) -> Option<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: `sysconf` only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let mut g = Governor {
            cores,
            ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 },
            last: Some((Instant::now(), sample()?)),
            threads: cores,
        };
        // Set even when it is libtorch's default: the explicit call is what `--threads` makes,
        // and without it the default pool ran steps at batch 32 about 5% slower here.
        tch::set_num_threads(cores as i32);
        std::thread::sleep(first);
        g.look();
        Some(g)
    }

    /// Looks again if a second has passed since the last look.
    pub fn tick(&mut self) {
        if self.last.is_some_and(|(t, _)| t.elapsed() >= EVERY) {
            self.look();
        }
    }

    /// The thread count now.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn look(&mut self) {
        let (Some((t0, (busy0, me0))), Some(now)) = (self.last, sample()) else { return };
        let secs = t0.elapsed().as_secs_f64().max(1e-3);
        let others =
            (now.0.saturating_sub(busy0) as f64 - now.1.saturating_sub(me0) as f64) / self.ticks_per_s / secs;
        let want = threads_for(self.cores, others.max(0.0));
        if want != self.threads {
            tch::set_num_threads(want as i32);
            self.threads = want;
        }
        self.last = Some((Instant::now(), now));
    }
}

#[cfg(test)]
mod tests {
    use super::threads_for;

    #[test]
    fn the_cores_others_keep_busy_are_left_to_them() {
        assert_eq!(threads_for(2, 0.0), 2);
        assert_eq!(threads_for(2, 0.7), 2, "a blip is not a busy core");
        assert_eq!(threads_for(2, 0.8), 1);
        assert_eq!(threads_for(2, 1.0), 1);
        assert_eq!(threads_for(2, 3.0), 1, "never fewer than one");
        assert_eq!(threads_for(16, 3.8), 12);
    }
}
