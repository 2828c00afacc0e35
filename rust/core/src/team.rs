//! The crate's one thread runtime: a process-wide team of worker threads, used by the kernels,
//! the mHC ops and the engine alike, and sized by the one thread budget
//! ([`crate::kernels::num_threads`], which `set_num_threads` shares with torch's intra-op
//! threads). Spin-synchronised, with work stealing and jobs that close behind late workers.
//!
//! **Borrowing.** [`borrow`] lends the team for a while (an engine forward step, one kernel
//! call): a caller that asks for one thread, or that finds the team lent to another caller (a
//! second model's forward, a kernel call from another Python thread, a kernel called from inside
//! a team job), gets an *inline* [`Crew`] and runs every job itself, with no synchronisation at
//! all. Nobody ever blocks on the team, so nesting cannot deadlock, and the one-thread path costs
//! nothing. The team is (re)built with the size the borrower asks for: one budget means one size
//! in practice, and a different count (an engine built with `threads=3`) rebuilds it once.
//!
//! Why not rayon: one decode step of a 12-layer model runs ~50 parallel sections (matrix
//! products, attention, the head) of 10–100 µs each. Handing each to a rayon pool from a
//! non-worker thread parks the caller on a condition variable and wakes a worker through the
//! kernel: several µs per section on this VM, a sizeable slice of a 4 ms token budget. Here the
//! caller publishes a job by bumping an epoch counter and starts working at once; workers spin on
//! the epoch between sections (as llama.cpp's threads do) for ~0.1 ms, then yield their core for
//! a few milliseconds, then park on a condition variable, so an idle team burns no CPU and a team
//! between torch ops gives way to torch's own threads.
//!
//! Robustness on a busy machine (the reason for the design below). With a static split, a
//! section ends when the *slowest* thread ends, and a worker the OS has descheduled stalls the
//! caller for a whole scheduler slice (measured here, with the machine's load average at 5 on 2
//! cores: 2-thread decode 5× slower than 1-thread). So:
//! * a job is `n` items in chunks; each thread first takes chunks from its own contiguous share
//!   (static, so a weight row keeps meeting the same core's cache), then steals the others'
//!   unclaimed chunks — a late worker finds its share already done by the caller;
//! * a job *closes* when the caller has run out of chunks: workers that have not entered by then
//!   skip it without touching it (entering and closing are one atomic word, so no worker can
//!   enter a closed job), and the caller waits only for workers already inside, each of which
//!   holds at most one chunk.
//!
//! A job is a borrowed closure `f(thread, lo, hi)` run on item ranges `lo..hi`; `thread` is the
//! index of the thread running it (for per-thread scratch; the caller is 0). [`Team::run`]
//! returns only after every thread that entered has left, which is what makes lending stack
//! references to workers sound. A panic in any thread is caught and reported by `run` as
//! [`crate::Error::Internal`].

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;

/// Busy polls (`spin_loop` hints, ~10–40 ns each) before a waiting thread starts yielding its
/// core: on a machine with other load a descheduled partner would otherwise leave us spinning
/// for a whole scheduler slice.
const YIELD_AFTER: usize = 1 << 12;
/// Idle polls (spins, then `yield_now` calls of ~0.3–1 µs each) before a worker parks.
const SPIN_LIMIT: usize = 1 << 13;
/// `state` bit: the current job accepts no more workers.
const CLOSED: usize = 1 << (usize::BITS - 1);

type Job<'a> = dyn Fn(usize, usize, usize) + Sync + 'a;

/// A chunk cursor on its own cache line (threads hammer their own; others read it to steal).
#[repr(align(64))]
struct Cursor {
    next: AtomicUsize,
    end: AtomicUsize,
}

struct Shared {
    n: usize,
    epoch: AtomicUsize,
    /// `CLOSED` bit plus the number of workers inside the current job.
    state: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    cursors: Vec<Cursor>,
    chunk: AtomicUsize,
    /// The current job, lifetime-erased; only read by a worker between entering and leaving.
    job: UnsafeCell<Option<*const Job<'static>>>,
}

// SAFETY: `job` is written by `run` only while the job is closed with no worker inside, and
// published by opening `state` (Release); workers read it only after entering through a CAS on
// `state` (Acquire) and stop before leaving. `run` returns only when no worker is inside.
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync` above.
unsafe impl Send for Shared {}

/// A team of `n` threads: the caller of [`Team::run`] plus `n - 1` workers.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `n ≥ 1` threads (`n - 1` are spawned).
    pub fn new(n: usize) -> crate::Result<Self> {
        let n = crate::kernels::check_threads(n, "thread team")?.max(1);
        let shared = Arc::new(Shared {
            n,
            epoch: AtomicUsize::new(0),
            state: AtomicUsize::new(CLOSED),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            cursors: (0..n)
                .map(|_| Cursor {
                    next: AtomicUsize::new(0),
                    end: AtomicUsize::new(0),
                })
                .collect(),
            chunk: AtomicUsize::new(1),
            job: UnsafeCell::new(None),
        });
        let mut workers = Vec::with_capacity(n - 1);
        for t in 1..n {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("nanochat-{t}"))
                .spawn(move || worker(s, t))
                .map_err(|e| crate::Error::Internal(format!("cannot start worker thread: {e}")))?;
            workers.push(h);
        }
        Ok(Self { shared, workers })
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.shared.n
    }

    /// Run `f(thread, lo, hi)` over items `0..n` in chunks of `chunk` (the last may be shorter),
    /// each chunk exactly once, on whichever threads get there; returns when all are done.
    /// Thread `t`'s own share is the `t`-th of `n_threads` contiguous runs of whole chunks.
    /// A job of one chunk is a single call `f(0, 0, n)` on the caller.
    pub fn run<F: Fn(usize, usize, usize) + Sync>(
        &mut self,
        n: usize,
        chunk: usize,
        f: F,
    ) -> crate::Result<()> {
        let s = &*self.shared;
        let chunk = chunk.max(1);
        if n == 0 {
            return Ok(());
        }
        if n <= chunk {
            return catch(|| f(0, 0, n));
        }
        if s.n == 1 {
            return run_inline(n, chunk, f);
        }
        let job: &Job<'_> = &f;
        // SAFETY: erase the lifetime; the pointer is only used by workers inside the job, and
        // we return only after the job is closed and empty. `&mut self` keeps `run` single-entry.
        let job: *const Job<'static> = unsafe { std::mem::transmute(job as *const Job<'_>) };
        // SAFETY: the previous job is closed and empty, so no worker reads `job` now.
        unsafe { *s.job.get() = Some(job) };
        for (t, c) in s.cursors.iter().enumerate() {
            let (lo, hi) = share(n, t, s.n, chunk);
            c.next.store(lo, Ordering::Relaxed);
            c.end.store(hi, Ordering::Relaxed);
        }
        s.chunk.store(chunk, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.state.store(0, Ordering::Release); // open
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch(|| work(s, 0, &f));
        s.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut spins = 0usize;
        while s.state.load(Ordering::Acquire) & !CLOSED != 0 {
            spins += 1;
            if spins < YIELD_AFTER {
                std::hint::spin_loop();
            } else {
                // A worker inside was descheduled mid-chunk: let it run.
                std::thread::yield_now();
            }
        }
        // SAFETY: the job is closed and every worker has left, so no one reads `job` now.
        unsafe { *s.job.get() = None };
        mine?;
        if s.panicked.load(Ordering::Acquire) {
            return Err(crate::Error::Internal("a worker thread panicked".into()));
        }
        Ok(())
    }
}

/// A job on the calling thread alone: every chunk in order, panics caught as in [`Team::run`].
fn run_inline<F: Fn(usize, usize, usize)>(n: usize, chunk: usize, f: F) -> crate::Result<()> {
    catch(|| {
        for lo in (0..n).step_by(chunk) {
            f(0, lo, (lo + chunk).min(n));
        }
    })
}

/// The process-wide team (built on first use; rebuilt when a borrower asks for another size).
static TEAM: Mutex<Option<Team>> = Mutex::new(None);

/// The right to run jobs on `threads()` threads for as long as it is held: the process-wide
/// team, or the calling thread alone (see the module docs).
pub struct Crew {
    team: Option<MutexGuard<'static, Option<Team>>>,
}

/// Borrow the process-wide team sized `threads` (already resolved: ≥ 1, at most
/// [`crate::kernels::max_threads`]). One thread, or a team lent to someone else, gives an inline
/// crew; never blocks. Errors only if the team must be (re)built and a thread cannot start.
pub fn borrow(threads: usize) -> crate::Result<Crew> {
    if threads <= 1 {
        return Ok(Crew::inline());
    }
    let mut g = match TEAM.try_lock() {
        Ok(g) => g,
        // A panic while the team was lent is caught inside `run`; the team itself is intact.
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return Ok(Crew::inline()),
    };
    if g.as_ref().map(Team::threads) != Some(threads) {
        *g = None; // join the old workers before starting new ones
        *g = Some(Team::new(threads)?);
    }
    Ok(Crew { team: Some(g) })
}

impl Crew {
    /// The calling thread alone.
    pub const fn inline() -> Self {
        Self { team: None }
    }

    /// Threads that run this crew's jobs, the caller included.
    pub fn threads(&self) -> usize {
        match &self.team {
            Some(g) => g.as_ref().map_or(1, Team::threads),
            None => 1,
        }
    }

    /// As [`Team::run`]: `f(thread, lo, hi)` over items `0..n` in chunks of `chunk`.
    pub fn run<F: Fn(usize, usize, usize) + Sync>(
        &mut self,
        n: usize,
        chunk: usize,
        f: F,
    ) -> crate::Result<()> {
        match self.team.as_mut().and_then(|g| g.as_mut()) {
            Some(team) => team.run(n, chunk, f),
            None => run_inline(n, chunk.max(1), f),
        }
    }
}

/// Take chunks from thread `t`'s own share, then steal from the others'.
fn work(s: &Shared, t: usize, f: &(dyn Fn(usize, usize, usize) + Sync)) {
    let chunk = s.chunk.load(Ordering::Relaxed);
    for k in 0..s.n {
        let c = &s.cursors[(t + k) % s.n];
        let end = c.end.load(Ordering::Relaxed);
        loop {
            let lo = c.next.fetch_add(chunk, Ordering::Relaxed);
            if lo >= end {
                break;
            }
            f(t, lo, (lo + chunk).min(end));
        }
    }
}

fn catch(f: impl FnOnce()) -> crate::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        crate::Error::Internal(format!("a panic in a parallel job: {msg}"))
    })
}

fn worker(s: Arc<Shared>, t: usize) {
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: spin, then yield, then park.
        let mut spins = 0usize;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins < YIELD_AFTER {
                std::hint::spin_loop();
                continue;
            }
            if spins < SPIN_LIMIT {
                std::thread::yield_now();
                continue;
            }
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        // Enter the open job, if it is still open (else it is finished or finishing: skip).
        let mut st = s.state.load(Ordering::Acquire);
        let entered = loop {
            if st & CLOSED != 0 {
                break false;
            }
            match s
                .state
                .compare_exchange_weak(st, st + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) => st = now,
            }
        };
        if !entered {
            continue;
        }
        // SAFETY: we are inside an open job: `job` was published before it opened and stays
        // valid until we leave.
        if let Some(job) = unsafe { *s.job.get() } {
            // SAFETY: as above; the pointee outlives the job, and we have entered it.
            let f = unsafe { &*job };
            if catch(|| work(&s, t, f)).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
        }
        s.state.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// The half-open share `[lo, hi)` of `len` items for thread `t` of `n`, in whole `align`-sized
/// units (the last thread takes the remainder).
#[inline]
pub fn share(len: usize, t: usize, n: usize, align: usize) -> (usize, usize) {
    let units = len.div_ceil(align);
    let lo = (units * t / n * align).min(len);
    let hi = (units * (t + 1) / n * align).min(len);
    (lo, hi)
}

/// A raw pointer that may cross into the team's threads; each thread writes a disjoint range.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: users only write disjoint index ranges from different threads, while the owner of the
// buffer waits in `Team::run`.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for `Send` above.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    pub fn new(s: &mut [T]) -> Self {
        Self(s.as_mut_ptr())
    }
    /// The raw pointer (a method, so closures capture the `Sync` wrapper, not the field).
    #[inline(always)]
    pub fn ptr(&self) -> *mut T {
        self.0
    }
    /// # Safety
    /// `lo..hi` must lie inside the original slice and not overlap any range another thread
    /// touches during the same job.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, lo: usize, hi: usize) -> &mut [T] {
        // SAFETY: the caller guarantees `lo..hi` lies inside the original slice and is touched by
        // no other thread during the job.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(lo), hi - lo) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_exactly_once() {
        for threads in 1..4 {
            let mut team = Team::new(threads).unwrap();
            for (n, chunk) in [
                (0usize, 1usize),
                (1, 1),
                (7, 3),
                (100, 1),
                (1000, 32),
                (4096, 64),
            ] {
                for _ in 0..50 {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    team.run(n, chunk, |t, lo, hi| {
                        assert!(t < threads && lo < hi && hi <= n);
                        assert!(hi - lo <= chunk);
                        for h in &hits[lo..hi] {
                            h.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                    .unwrap();
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            }
        }
    }

    #[test]
    fn panics_become_internal_errors() {
        let mut team = Team::new(2).unwrap();
        // Item 5 panics on whichever thread takes it: an internal error, not a value error.
        let e = team
            .run(64, 1, |_, lo, _| assert!(lo != 5, "boom"))
            .unwrap_err();
        assert!(matches!(e, crate::Error::Internal(_)), "{e:?}");
        team.run(64, 1, |_, _, _| {}).unwrap();
    }

    #[test]
    fn absurd_team_sizes_are_refused_before_allocating() {
        for n in [
            crate::kernels::max_threads() + 1,
            100_000,
            1 << 40,
            usize::MAX,
        ] {
            let e = Team::new(n).err().expect("refused");
            assert!(e.to_string().contains("threads requested"), "{e}");
        }
        assert_eq!(Team::new(0).unwrap().threads(), 1);
    }

    /// Runs `n` items on `crew` and checks each ran exactly once, on a thread index the crew has.
    fn exactly_once(crew: &mut Crew, n: usize, chunk: usize) {
        let threads = crew.threads();
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        crew.run(n, chunk, |t, lo, hi| {
            assert!(t < threads && lo < hi && hi <= n && hi - lo <= chunk);
            for h in &hits[lo..hi] {
                h.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn one_thread_is_inline_and_a_lent_team_gives_an_inline_crew() {
        let mut one = borrow(1).unwrap();
        assert_eq!(one.threads(), 1);
        exactly_once(&mut one, 100, 7);
        // Other tests (kernels, Sinkhorn, the engine) borrow the same team concurrently, so the
        // first borrow may itself be inline; while it holds the team, a second borrow (here:
        // nested, as a kernel called from inside a job would be) must be inline.
        let mut outer = borrow(2).unwrap();
        assert!([1, 2].contains(&outer.threads()));
        if outer.threads() == 2 {
            let mut inner = borrow(2).unwrap();
            assert_eq!(inner.threads(), 1);
            exactly_once(&mut inner, 50, 3);
        }
        exactly_once(&mut outer, 1000, 16);
    }

    #[test]
    fn the_team_is_rebuilt_for_another_size() {
        for n in [3, 2, 3, 4] {
            let mut crew = borrow(n).unwrap();
            assert!([1, n].contains(&crew.threads()));
            exactly_once(&mut crew, 4096, 64);
        }
    }

    #[test]
    fn concurrent_borrowers_each_run_every_item_once() {
        // Threads race for the team: the losers run inline; nobody blocks, nothing is lost.
        std::thread::scope(|s| {
            for k in 0..4 {
                s.spawn(move || {
                    for i in 0..200 {
                        let mut crew = borrow(2).unwrap();
                        exactly_once(&mut crew, 64 + k + i % 7, 1 + i % 5);
                    }
                });
            }
        });
    }

    #[test]
    fn a_panic_in_a_borrowed_team_is_an_error_and_the_team_stays_usable() {
        let mut crew = borrow(2).unwrap();
        let e = crew
            .run(64, 1, |_, lo, _| assert!(lo != 9, "boom"))
            .unwrap_err();
        assert!(matches!(e, crate::Error::Internal(_)), "{e:?}");
        exactly_once(&mut crew, 64, 1);
        drop(crew);
        exactly_once(&mut borrow(2).unwrap(), 64, 1);
    }

    #[test]
    fn shares_cover_exactly() {
        for len in [0usize, 1, 31, 32, 100, 4096] {
            for n in 1..5 {
                let mut next = 0;
                for t in 0..n {
                    let (lo, hi) = share(len, t, n, 32);
                    assert_eq!(lo, next);
                    assert!(hi >= lo);
                    next = hi;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn parks_and_wakes() {
        let mut team = Team::new(2).unwrap();
        team.run(2, 1, |_, _, _| {}).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let c = AtomicUsize::new(0);
        team.run(100, 1, |_, lo, hi| {
            c.fetch_add(hi - lo, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(c.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_busy_caller_finishes_alone_when_workers_are_late() {
        // Workers parked (after idling) and the job short: the caller may do everything; either
        // way every item runs once and run returns.
        let mut team = Team::new(3).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let c = AtomicUsize::new(0);
        team.run(10, 1, |_, lo, hi| {
            c.fetch_add(hi - lo, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(c.load(Ordering::Relaxed), 10);
    }
}
