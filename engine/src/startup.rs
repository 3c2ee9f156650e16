//! Start-up work at idle priority.
//!
//! A process that joins a busy node (a standalone proxy starting beside the agent, an agent
//! restarting beside the proxy) spends tens of milliseconds of CPU before it serves: building
//! each shard's tables and prefaulting the allow ledger. On a node with few cores that CPU is
//! taken from the processes already serving, whose queries then wait a scheduler slice: the
//! latency spike in the second a process starts (issue 8). Such work is not urgent: the other
//! process serves meanwhile. [`at_idle_priority`] runs it on a helper thread under
//! `SCHED_IDLE`, which the kernel runs only when nothing else wants the CPU; the calling
//! thread's own priority is left as it was, so the shard serves at normal priority once ready.
//!
//! Setting [`NORMAL_PRIORITY_ENV`] (to anything) runs the work on the calling thread at its
//! own priority instead: the A/B switch of `bench/ha/startup.sh`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// Environment variable that turns idle-priority preparation off (for A/B measurements).
pub const NORMAL_PRIORITY_ENV: &str = "DNSFENCE_PREPARE_AT_NORMAL_PRIORITY";

/// Environment variable that leaves transparent huge pages on (see [`small_pages_only`]).
pub const HUGE_PAGES_ENV: &str = "DNSFENCE_HUGE_PAGES";

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`, inherited by
/// children), unless [`HUGE_PAGES_ENV`] is set. The allocator (mimalloc) asks for huge pages
/// for its heaps, so each thread's first allocations made the kernel zero whole 2 MB pages:
/// a just-started proxy held 114 MB instead of 77, and on a VM first touches of fresh memory
/// can stall a CPU for milliseconds, which no scheduling priority hides from the process
/// serving beside it. Measured (bench/RESULTS.md): the p99 in the second a proxy joins fell
/// from a median of about 5x the steady seconds' to 1.7x, with CPU per query unchanged
/// within the noise. Returns whether it was turned off.
pub fn small_pages_only() -> bool {
    if std::env::var_os(HUGE_PAGES_ENV).is_some() {
        return false;
    }
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

/// How long start-up work may run at idle priority in all: the calls of [`at_idle_priority`]
/// in a process share it (the time between them does not count). Work still running when it
/// is spent is raised to normal priority, and later work runs at normal priority at once, so
/// that a node whose CPUs are all busy (where `SCHED_IDLE` gets well under 1 % of a core)
/// delays a start by this much at most, not by minutes nor by this much for each step.
pub const IDLE_GRACE: Duration = Duration::from_millis(250);

/// Runs `work` on a helper thread ("dnsf-prepare") under `SCHED_IDLE` while the process's
/// [`IDLE_GRACE`] lasts, then at normal priority, and returns its result; the calling thread
/// waits, its priority unchanged. A panic in `work` is resumed here. Runs `work` on the
/// calling thread at its own priority once the grace is spent, when the helper cannot be
/// started, and when the kernel refuses `SCHED_IDLE` or this process could not raise a thread
/// out of it (neither `CAP_SYS_NICE` nor an `RLIMIT_NICE` that allows nice 0): the grace must
/// hold.
pub fn at_idle_priority<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    static PROCESS: IdleBudget = IdleBudget::new(IDLE_GRACE);
    if std::env::var_os(NORMAL_PRIORITY_ENV).is_some() || !may_leave_idle() {
        return work();
    }
    PROCESS.run(work)
}

/// A grace shared by the calls made through it: what each spent at idle priority is taken
/// from it (calls running side by side each take theirs: the budget runs out sooner, never
/// later).
struct IdleBudget {
    grace: Duration,
    spent_ns: AtomicU64,
}

impl IdleBudget {
    const fn new(grace: Duration) -> IdleBudget {
        IdleBudget {
            grace,
            spent_ns: AtomicU64::new(0),
        }
    }

    /// `work` at idle priority for what is left of the grace, or on the calling thread
    /// when none is.
    fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        let spent = Duration::from_nanos(self.spent_ns.load(Ordering::Relaxed));
        let left = self.grace.saturating_sub(spent);
        if left.is_zero() {
            return work();
        }
        let started = Instant::now();
        let result = at_idle_priority_for(left, work);
        let idle = started.elapsed().min(left);
        self.spent_ns.fetch_add(
            u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        result
    }
}

fn at_idle_priority_for<T: Send>(grace: Duration, work: impl FnOnce() -> T + Send) -> T {
    // Shared (not moved) with the helper, so that the work is still here to run if the
    // helper cannot be started.
    let work = Mutex::new(Some(work));
    let take = || work.lock().unwrap_or_else(|e| e.into_inner()).take();
    let done = std::thread::scope(|scope| {
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let (go_tx, go_rx) = mpsc::sync_channel::<()>(1);
        // Dropped when the helper ends, normally or by a panic: what the caller waits for.
        let (done_tx, done_rx) = mpsc::sync_channel::<()>(0);
        let helper = std::thread::Builder::new()
            .name("dnsf-prepare".into())
            .spawn_scoped(scope, move || {
                let _done = done_tx;
                // SAFETY: gettid takes no arguments and cannot fail.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                // The caller lowers this thread, then says go: the helper never waits at idle
                // priority for its grace to start (review finding: on busy CPUs it could).
                let _ = go_rx.recv();
                take().map(|w| w())
            });
        let helper = match helper {
            Ok(h) => h,
            Err(_) => return None,
        };
        let lowered = tid_rx
            .recv()
            .ok()
            .filter(|&tid| set_thread_policy(tid, libc::SCHED_IDLE).is_ok());
        let _ = go_tx.send(());
        if let Some(tid) = lowered
            && let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(grace)
        {
            // Still working: the rest at normal priority.
            let _ = set_thread_policy(tid, libc::SCHED_OTHER);
        }
        match helper.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    match done {
        Some(result) => result,
        None => match take() {
            Some(w) => w(),
            None => unreachable!("the helper took the work and returned nothing"),
        },
    }
}

/// Whether this process may move a thread from `SCHED_IDLE` back to `SCHED_OTHER` at nice 0:
/// an unprivileged thread may only if `RLIMIT_NICE` allows nice 0 (20); else it needs
/// `CAP_SYS_NICE` (the kernel's `can_nice`). Read once.
fn may_leave_idle() -> bool {
    static MAY: OnceLock<bool> = OnceLock::new();
    *MAY.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit the call writes; the result is checked.
        let nice_ok =
            unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } == 0 && limit.rlim_cur >= 20;
        nice_ok
            || std::fs::read_to_string("/proc/self/status")
                .is_ok_and(|status| has_sys_nice(&status))
    })
}

/// Whether a `/proc/PID/status` text shows `CAP_SYS_NICE` (bit 23) among the effective
/// capabilities.
fn has_sys_nice(status: &str) -> bool {
    const CAP_SYS_NICE: u32 = 23;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// Sets the scheduling policy of thread `tid` (0: the calling thread), priority 0.
fn set_thread_policy(tid: libc::pid_t, policy: libc::c_int) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call. `tid` is 0 (the calling
    // thread) or a helper of ours still running (it is joined only after this call); moving a
    // thread of our own between SCHED_IDLE and SCHED_OTHER needs no privilege.
    let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The calling thread's scheduling policy (`libc::SCHED_*`).
pub fn current_thread_policy() -> io::Result<libc::c_int> {
    // SAFETY: sched_getscheduler takes no pointers; pid 0 is the calling thread.
    let r = unsafe { libc::sched_getscheduler(0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_at_idle_priority_and_the_caller_keeps_its_own() {
        let before = current_thread_policy().unwrap();
        assert_ne!(before, libc::SCHED_IDLE);
        // A budget of its own: the process's may be spent by the other tests' start-ups.
        let (policy, name) = IdleBudget::new(IDLE_GRACE).run(|| {
            (
                current_thread_policy().unwrap(),
                std::thread::current().name().map(str::to_owned),
            )
        });
        assert_eq!(
            policy,
            libc::SCHED_IDLE,
            "the work did not run under SCHED_IDLE"
        );
        assert_eq!(name.as_deref(), Some("dnsf-prepare"));
        assert_eq!(current_thread_policy().unwrap(), before);
    }

    #[test]
    fn reads_cap_sys_nice_from_the_status_text() {
        let status = |caps: &str| {
            format!(
                "Name:\tdnsfence\nCapPrm:\t000001ffffffffff\nCapEff:\t{caps}\nCapBnd:\t000001ffffffffff\n"
            )
        };
        assert!(has_sys_nice(&status("000001ffffffffff")));
        assert!(has_sys_nice(&status("0000000000800000")));
        assert!(!has_sys_nice(&status("00000000007fffff")));
        assert!(!has_sys_nice(&status("0000000000000000")));
        assert!(!has_sys_nice("Name:\tx\n"));
        assert!(!has_sys_nice(&status("zz")));
    }

    #[test]
    fn results_and_borrows_come_back() {
        let mut table = vec![0u64; 1024];
        let sum = IdleBudget::new(IDLE_GRACE).run(|| {
            for (i, x) in table.iter_mut().enumerate() {
                *x = i as u64;
            }
            table.iter().sum::<u64>()
        });
        assert_eq!(sum, 1023 * 1024 / 2);
        assert_eq!(table[1023], 1023);
    }

    #[test]
    fn work_still_running_after_the_grace_is_raised_to_normal_priority() {
        let start = Instant::now();
        let (raised_after, policy) = at_idle_priority_for(Duration::from_millis(50), || {
            while current_thread_policy().unwrap() == libc::SCHED_IDLE
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            (start.elapsed(), current_thread_policy().unwrap())
        });
        assert_eq!(policy, libc::SCHED_OTHER, "never raised");
        assert!(
            raised_after >= Duration::from_millis(50),
            "{raised_after:?}"
        );
        assert!(raised_after < Duration::from_secs(5), "{raised_after:?}");
    }

    #[test]
    fn the_grace_is_one_budget_for_all_the_work_and_only_work_spends_it() {
        let budget = IdleBudget::new(Duration::from_millis(600));
        // 200 ms of work at idle priority (longer on a loaded machine: an idle-priority thread
        // waits for the CPU, and that wait is spent too)...
        let started = Instant::now();
        let (policy, name) = budget.run(|| {
            std::thread::sleep(Duration::from_millis(200));
            (
                current_thread_policy().unwrap(),
                std::thread::current().name().map(str::to_owned),
            )
        });
        let first_took = started.elapsed();
        assert_eq!(policy, libc::SCHED_IDLE);
        assert_eq!(name.as_deref(), Some("dnsf-prepare"));
        // ... then a wait that spends none of it ...
        std::thread::sleep(Duration::from_millis(500));
        // ... so the next work starts at idle priority and is raised when the 400 ms left are
        // spent (not at once, as a clock counting the wait would; not after 600 ms, as a
        // grace for each call would).
        let entered = Instant::now();
        let (first, name, raised_after) = budget.run(|| {
            let first = current_thread_policy().unwrap();
            while current_thread_policy().unwrap() == libc::SCHED_IDLE
                && entered.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            let name = std::thread::current().name().map(str::to_owned);
            (first, name, entered.elapsed())
        });
        assert_eq!(first, libc::SCHED_IDLE);
        assert_eq!(name.as_deref(), Some("dnsf-prepare"));
        let left = Duration::from_millis(600).saturating_sub(first_took);
        assert!(
            (left.saturating_sub(Duration::from_millis(50))..Duration::from_millis(580))
                .contains(&raised_after),
            "{raised_after:?} (the first work took {first_took:?})"
        );
        // Spent: on the calling thread, at its own priority.
        let caller = std::thread::current().name().map(str::to_owned);
        let (policy, name) = budget.run(|| {
            (
                current_thread_policy().unwrap(),
                std::thread::current().name().map(str::to_owned),
            )
        });
        assert_ne!(policy, libc::SCHED_IDLE);
        assert_eq!(policy, current_thread_policy().unwrap());
        assert_eq!(name, caller);
    }

    #[test]
    #[should_panic(expected = "prepare failed")]
    fn a_panic_in_the_work_reaches_the_caller() {
        at_idle_priority(|| -> () { panic!("prepare failed") });
    }
}
