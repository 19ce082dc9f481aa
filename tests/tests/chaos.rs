//! Chaos in the lab (`sluice_lab::chaos`, also `sluice lab chaos`): under continuous
//! load, seeded random backend crashes and restarts, daemon restarts, crashes and upgrades,
//! config reloads that change limits and weights, and drains; then no connection may have broken
//! except by its own backend's crash, the counters, the flow table and the clients' open
//! connections must agree after one reconciliation period, and nothing may be left once the
//! clients close and the timeouts pass. Both forwarding modes. `SLUICE_CHAOS_SEED` and
//! `SLUICE_CHAOS_SECS` change the run (below ~40 s not every one of the 7 kinds may occur).

use std::{sync::Mutex, time::Duration};

use lb_userspace::config::Mode;
use sluice_lab::chaos::{self, Options, Verdict as _, BACKENDS};
use sluice_tests::labs::{down_and_check, lab};

// The two runs share two CPUs with their load: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn chaos(mode: Mode, default_seed: u64) {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = lab(BACKENDS, 2, mode);
    let opts = Options { duration: Duration::from_secs(env("SLUICE_CHAOS_SECS", 45)), seed: env("SLUICE_CHAOS_SEED", default_seed), ..Options::default() };
    let report = chaos::run(&lab, &opts);
    down_and_check(lab);
    let report = report.expect("chaos run");
    println!("{}", report.markdown());
    assert!(report.passed(), "seed {}: some checks failed:\n{}", opts.seed, report.markdown());
    // A run that injected or carried little proves little.
    assert!(report.faults_by_kind.values().sum::<u64>() >= 7, "{:?}", report.faults_by_kind);
    assert!(report.carried > 1000 && report.held_survived > 0, "carried {}, held through {}", report.carried, report.held_survived);
}

#[test]
fn chaos_l2dsr_breaks_nothing_and_leaves_exact_counters() {
    chaos(Mode::L2dsr, 1);
}

#[test]
fn chaos_ipip_breaks_nothing_and_leaves_exact_counters() {
    chaos(Mode::Ipip, 2);
}
