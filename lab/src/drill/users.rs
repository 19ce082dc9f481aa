//! The drill's users: the lab's load generator (`load.rs`) run without end in one-second
//! slices that overlap (each slice's connections finish their hold after it), sharing one set of
//! counters, sampled every 100 ms. From the samples: whether users are failing (the report they
//! would make) and when they are served again.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::Scope,
    time::{Duration, Instant},
};

use crate::{
    load::{self, Counters, LoadSpec},
    Lab,
};

/// New connections per second over all clients.
pub const RATE: f64 = 150.0;
/// Each connection is held this long after its answer: ~`RATE × HOLD` open at once.
pub const HOLD: Duration = Duration::from_secs(3);
/// A user gives up on an answer after this.
pub const TIMEOUT: Duration = Duration::from_millis(1500);
const SLICE: Duration = Duration::from_secs(1);
const SAMPLE: Duration = Duration::from_millis(100);

/// Cumulative outcomes at `t` (seconds since the users started).
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    t: f64,
    ok: u64,
    refused: u64,
    timeout: u64,
    error: u64,
}

impl Sample {
    fn failed(&self) -> u64 {
        self.refused + self.timeout + self.error
    }
}

/// Outcomes between two instants.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Window {
    pub ok: u64,
    pub refused: u64,
    pub timeout: u64,
    pub error: u64,
}

impl Window {
    pub fn failed(&self) -> u64 {
        self.refused + self.timeout + self.error
    }
    pub fn total(&self) -> u64 {
        self.ok + self.failed()
    }
    /// The one of the two with more failed in percent.
    pub fn max_failed(self, other: Self) -> Self {
        if other.failed_pct() > self.failed_pct() {
            other
        } else {
            self
        }
    }
    /// Failed, in percent of all (0 with none).
    pub fn failed_pct(&self) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            100.0 * self.failed() as f64 / self.total() as f64
        }
    }
}

pub struct Users {
    pub t0: Instant,
    counters: Arc<Counters>,
    samples: Mutex<Vec<Sample>>,
    stop: AtomicBool,
}

impl Users {
    pub fn new() -> Self {
        Self { t0: Instant::now(), counters: Arc::default(), samples: Mutex::new(vec![Sample::default()]), stop: AtomicBool::new(false) }
    }

    /// Starts the load and the sampler on `s`; they run until [`Users::stop`].
    pub fn start<'s>(&'s self, s: &'s Scope<'s, '_>, lab: &'s Lab) {
        let spec = LoadSpec { rate: RATE, concurrency: 10_000, duration: SLICE, hold: HOLD, delay_ms: 0, timeout: TIMEOUT, v6: false, targets: Vec::new() };
        s.spawn(move || {
            let mut next = Instant::now();
            while !self.stop.load(Ordering::Relaxed) {
                let (spec, counters) = (spec.clone(), self.counters.clone());
                s.spawn(move || {
                    if let Err(e) = load::run(lab, &spec, &counters) {
                        eprintln!("drill: the users' load failed: {e:#}");
                    }
                });
                next += SLICE;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        });
        s.spawn(move || {
            while !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE);
                let c = &self.counters;
                let sample = Sample {
                    t: self.t0.elapsed().as_secs_f64(),
                    ok: c.ok.load(Ordering::Relaxed),
                    refused: c.refused.load(Ordering::Relaxed),
                    timeout: c.timeout.load(Ordering::Relaxed),
                    error: c.error.load(Ordering::Relaxed),
                };
                self.samples.lock().expect("samples").push(sample);
            }
        });
    }

    /// Stops starting new connections (those under way finish, then the scope's threads end).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Outcomes counted between `from` and `to` (seconds since the start).
    pub fn window(&self, from: f64, to: f64) -> Window {
        let samples = self.samples.lock().expect("samples");
        let at = |t: f64| samples.iter().rev().find(|s| s.t <= t).copied().unwrap_or_default();
        let (a, b) = (at(from), at(to));
        Window { ok: b.ok - a.ok, refused: b.refused - a.refused, timeout: b.timeout - a.timeout, error: b.error - a.error }
    }

    /// The first sample time at or after `from` when a failure was counted.
    pub fn first_failure_after(&self, from: f64) -> Option<f64> {
        let samples = self.samples.lock().expect("samples");
        samples.windows(2).find(|w| w[1].t >= from && w[1].failed() > w[0].failed()).map(|w| w[0].t.max(from))
    }

    /// The last sample time before `to` whose interval counted a failure.
    fn last_failure_before(&self, to: f64) -> Option<f64> {
        let samples = self.samples.lock().expect("samples");
        samples.windows(2).rev().find(|w| w[1].t <= to && w[1].failed() > w[0].failed()).map(|w| w[1].t)
    }

    /// Whether users fail now: at least `pct` % (and 5 connections) of those of the last
    /// `over` failed.
    pub fn failing(&self, over: Duration, pct: f64) -> Option<Window> {
        let now = self.now();
        let w = self.window(now - over.as_secs_f64(), now);
        (w.failed() >= 5 && w.failed_pct() >= pct).then_some(w)
    }

    /// Whether users are served again: of the connections of the last `over`, at most 1 %
    /// failed (the flow table and the limits refuse a rare one in normal operation), and there
    /// were some. Returns when they were served from: the last failure in the window, or its
    /// start.
    pub fn served(&self, over: Duration) -> Option<f64> {
        let now = self.now();
        let from = now - over.as_secs_f64();
        let w = self.window(from, now);
        (w.ok >= 50 && w.failed_pct() <= 1.0).then(|| self.last_failure_before(now).filter(|t| *t > from).unwrap_or(from))
    }
}

impl Default for Users {
    fn default() -> Self {
        Self::new()
    }
}
