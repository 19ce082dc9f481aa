//! `cargo xtask bench limits`: cluster-wide limits, how fast capacity moves and what the
//! coordination costs. Runs `sluice lab cluster --limits` (three nodes, real BIRD, real etcd,
//! real TCP; `max_conns = 60` for the cluster) `RUNS` times and records, per run, the time to
//! 95 % of the limit after each change of skew, after a daemon restart, after a node fails and
//! after etcd comes back, and each node's etcd traffic. The floors they are set against: a
//! node's open connections only free capacity as they close (each held 2 s), and a failed node's
//! share only once its lease (3 s) expires. Writes its section of BENCHMARKS.md.
//! `SLUICE_BENCH_SHORT=1` (the test suite): one run of the lab's short form (`Options::short`:
//! the skews, the partition and the lowered limit; no restart, failure or etcd stop), phases of
//! 5 s instead of 7 (a skew reaches 95 % in ~1–2.5 s: the 2 s hold time is its floor).

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use lb_userspace::config::Mode;
use sluice_lab::limits::{self, Options, LEASE_TTL};
use sluice_tests::{
    bench,
    labs::{down_and_check, lab},
};

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let out_path: PathBuf = bench::out_path();
    let runs = bench::pick(3, 1);
    let opts = bench::pick(Options::default(), Options { short: true, phase: Duration::from_secs(5), ..Options::default() });
    let mut rows =
        String::from("| run | skew → n1 | skew → n2 | skew → n3 | n1 restarts | n3 fails | etcd back | most open / 60 | checks |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut traffic = String::new();
    let mut fail_ms = Vec::new();
    let mut skew_ms = Vec::new();
    for run in 1..=runs {
        let lab = lab(1, opts.nodes, Mode::L2dsr);
        let report = limits::run(&lab, &opts);
        down_and_check(lab);
        let report = report.expect("cluster limits run");
        // Steps by name: the short form has no restart, failure or etcd stop.
        let reached = |what: &str| report.steps.iter().find(|s| s.what.starts_with(what)).and_then(|s| s.reached_ms);
        let ms = |what: &str| reached(what).map_or("—".into(), |m| format!("{m} ms"));
        let skews: Vec<String> = (1..=opts.nodes).map(|k| format!("skew: most new connections to n{k}")).collect();
        assert!(
            skews.iter().all(|s| reached(s).is_some()),
            "run {run}: a skew never reached 95 % of the limit: {:?}",
            report.steps.iter().map(|s| (&s.what, s.reached_ms)).collect::<Vec<_>>()
        );
        assert!(report.max_sum > 0 && !report.checks.is_empty(), "run {run}: no connections or no checks");
        let passed = report.checks.iter().filter(|c| c.ok).count();
        let failed = format!("n{} fails", opts.nodes);
        writeln!(
            rows,
            "| {run} | {} | {} | {} | {} | {} | {} | {} | {passed} of {} held |",
            ms(&skews[0]),
            ms(&skews[1]),
            ms(&skews[2]),
            ms("n1's daemon restarts"),
            ms(&failed),
            ms("etcd back"),
            report.max_sum,
            report.checks.len()
        )
        .expect("w");
        fail_ms.extend(reached(&failed));
        skew_ms.extend(skews.iter().filter_map(|s| reached(s)));
        // n2 runs through the whole lab (n1 restarts, n3 fails): its counters cover the run.
        if let Some(t) = report.traffic.get("n2") {
            let per_s = |n: u64| n as f64 / report.run_s;
            writeln!(
                traffic,
                "| {run} | {:.1} | {:.0} B | {:.0} B | {:.1} | {:.2} | {:.2} |",
                per_s(t.requests),
                per_s(t.bytes_sent),
                per_s(t.bytes_received),
                per_s(t.reports),
                per_s(t.grants_written),
                per_s(t.grants_applied)
            )
            .expect("w");
        }
    }
    skew_ms.sort_unstable();
    fail_ms.sort_unstable();
    let hold = opts.hold.as_millis() as f64;
    let ttl = LEASE_TTL.as_millis() as f64;
    let ratio = |v: &[u64], floor: f64| v.last().map_or("—".into(), |m| format!("{:.2}–{:.2}", v[0] as f64 / floor, *m as f64 / floor));
    let body = format!(
        "## Cluster-wide limits (`cargo xtask bench limits`)\n\n\
         {runs} runs of `sluice lab cluster --limits` on {} (2 CPUs): three nodes behind a router\n\
         (BIRD, ECMP), one backend with `max_conns = 60` for the whole cluster, shares leased\n\
         through etcd 3.4 in the router's namespace, rounds every 200 ms plus a watch; each\n\
         client's flows steered to one node, {:.0} new connections/s from the hot node's client and\n\
         {:.0}/s from the others', each held {:?}. Time from the change until the open connections\n\
         summed over the nodes (sampled every 100 ms) first reached 57 (95 %):\n\n{rows}\n\
         Against their floors: a change of skew moves capacity only as the old hot node's\n\
         connections close (held {:?}): {} × that; a failed node's share is free only once its lease\n\
         ({} s) expires: {} × the TTL.\n\n\
         Coordination traffic of one node (n2, up through the whole run; the allocator for part of\n\
         it), per second:\n\n\
         | run | etcd requests | bytes sent | bytes received | reports | grants written | grants applied |\n|---|---:|---:|---:|---:|---:|---:|\n{traffic}",
        cpu(),
        opts.hot_rate,
        opts.cold_rate,
        opts.hold,
        opts.hold,
        ratio(&skew_ms, hold),
        LEASE_TTL.as_secs(),
        ratio(&fail_ms, ttl),
    );
    println!("{body}");
    sluice_tests::write_section(&out_path, "bench-limits", &body);
    println!("wrote {}", out_path.display());
}
