//! The daemon's one lock, timed. Every change of the running state, every report and every
//! scrape takes it, on a runtime with two workers: a long hold stalls them all. Each hold is
//! measured when its guard drops (a few nanoseconds: one `Instant` and a couple of atomics),
//! and the longest is kept with the place that took it, so `sluice status` and `/metrics` say
//! which code holds the lock too long.

use std::{
    ops::{Deref, DerefMut},
    panic::Location,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::Instant,
};

pub use crate::status::lock::LockReport;

pub(super) struct Timed<T> {
    inner: Mutex<T>,
    holds: AtomicU64,
    longest_ns: AtomicU64,
    longest_at: Mutex<&'static Location<'static>>,
    over_10ms: AtomicU64,
    over_100ms: AtomicU64,
}

/// The lock was poisoned: a thread panicked holding it.
#[derive(Debug)]
pub struct Poisoned;

impl<T> Timed<T> {
    pub(super) fn new(value: T) -> Self {
        Self {
            inner: Mutex::new(value),
            holds: AtomicU64::new(0),
            longest_ns: AtomicU64::new(0),
            longest_at: Mutex::new(Location::caller()),
            over_10ms: AtomicU64::new(0),
            over_100ms: AtomicU64::new(0),
        }
    }

    /// Takes the lock; the hold is timed from here to the guard's drop, and charged to the
    /// caller's source line.
    #[track_caller]
    pub(super) fn lock(&self) -> Result<Guard<'_, T>, Poisoned> {
        let at = Location::caller();
        let guard = self.inner.lock().map_err(|_| Poisoned)?;
        Ok(Guard { held: guard, since: Instant::now(), at, lock: self })
    }

    pub(super) fn into_inner(self) -> Result<T, Poisoned> {
        self.inner.into_inner().map_err(|_| Poisoned)
    }

    pub(super) fn report(&self) -> LockReport {
        LockReport {
            holds: self.holds.load(Ordering::Relaxed),
            longest_ms: self.longest_ns.load(Ordering::Relaxed) as f64 / 1e6,
            longest_at: self.longest_at.lock().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default(),
            over_10ms: self.over_10ms.load(Ordering::Relaxed),
            over_100ms: self.over_100ms.load(Ordering::Relaxed),
        }
    }

    fn record(&self, ns: u64, at: &'static Location<'static>) {
        self.holds.fetch_add(1, Ordering::Relaxed);
        if ns > 10_000_000 {
            self.over_10ms.fetch_add(1, Ordering::Relaxed);
        }
        if ns > 100_000_000 {
            self.over_100ms.fetch_add(1, Ordering::Relaxed);
        }
        if self.longest_ns.fetch_max(ns, Ordering::Relaxed) < ns {
            if let Ok(mut l) = self.longest_at.lock() {
                *l = at;
            }
        }
    }
}

/// A held lock; its drop records how long.
pub struct Guard<'a, T> {
    held: MutexGuard<'a, T>,
    since: Instant,
    at: &'static Location<'static>,
    lock: &'a Timed<T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.held
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.held
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.lock.record(ns, self.at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_hold_is_kept_with_its_place() {
        let l = Timed::new(0u32);
        *l.lock().expect("lock") += 1;
        let line = line!() + 1;
        let g = l.lock().expect("lock");
        std::thread::sleep(std::time::Duration::from_millis(12));
        drop(g);
        *l.lock().expect("lock") += 1;
        let r = l.report();
        assert_eq!((r.holds, r.over_10ms, r.over_100ms), (3, 1, 0), "{r:?}");
        assert!(r.longest_ms >= 12.0 && r.longest_at.ends_with(&format!("lock.rs:{line}")), "{r:?}");
    }
}
