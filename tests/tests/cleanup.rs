//! Nothing outlives a killed test. This test runs its own binary again as a child (env
//! `SLUICE_CLEANUP_CHILD`), which builds what tests build — an `l2lab` deployment with the real
//! daemon, a process forked for it from a thread that ends at once, a process that escapes
//! PDEATHSIG (a child's child), and a lab (`sluice_lab::Lab`) with its decap, HTTP server and
//! daemon — says it is ready and sleeps. The test SIGKILLs it (no destructor runs), then checks:
//! - every process the harness started dies with it (PR_SET_PDEATHSIG, see `netns::spawn_tied`);
//! - after the sweep the next test's first namespace runs (`netns::sweep_stale`), no process,
//!   namespace, pin or temporary file of the dead pid is left.
//!
//! And what `sluice lab down` runs (`topo::cleanup`, from a process that did not start the lab)
//! stops etcd and whatever else runs in the lab's namespaces before deleting them.

use std::{
    collections::BTreeSet,
    io::BufRead as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::config::Mode;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use sluice_lab::topo::{BackendConf, ServiceOpts};
use sluice_tests::{
    l2lab,
    labs::lab,
    netns::{self, processes_in, Netns},
};

const CHILD: &str = "SLUICE_CLEANUP_CHILD";
const TEST: &str = "a_killed_test_leaves_no_process_namespace_pin_or_file";

/// The child: builds, says `READY from_thread=PID escaped=PID`, sleeps until killed.
fn child() -> ! {
    let l2 = l2lab::Lab::new(1);
    l2.write_config(&[(1, "max_conns = 10")]);
    let _daemon = l2.start_daemon();
    // Spawned from a thread that ends at once: PDEATHSIG must not fire with that thread.
    let be = &l2.backends[0].ns;
    let from_thread = std::thread::scope(|s| s.spawn(|| be.spawn(be.command("sleep").arg("1000"))).join().expect("spawning thread"));
    // Out of PDEATHSIG's reach: the shell's child, reparented when the shell exits.
    let out = l2.client.output("sh", &["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]);
    let escaped: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("the escaped sleep's pid");
    let lab = lab(1, 1, Mode::L2dsr);
    lab.write_config(&lab.config_text(&[BackendConf { n: 1, max_conns: 10, weight: 1 }], &ServiceOpts::default(), |_| ())).expect("config");
    lab.start_daemon().expect("the lab's daemon");
    println!("READY from_thread={} escaped={escaped}", from_thread.id());
    loop {
        std::thread::sleep(Duration::from_hours(1));
    }
}

/// Kills the child if the test fails before it does.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Names in `dir` a process `pid` of the harness left: `slc-…`/`sluice…` with the pid as one
/// of its `-`-separated fields.
fn leftovers(dir: &Path, pid: u32) -> Vec<String> {
    let pid = pid.to_string();
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| (n.starts_with("slc-") || n.starts_with("sluice")) && n.split(['-', '.']).any(|f| f == pid))
        .collect()
}

fn namespaces(pid: u32) -> Vec<String> {
    leftovers(Path::new("/run/netns"), pid)
}

#[test]
fn a_killed_test_leaves_no_process_namespace_pin_or_file() {
    if std::env::var_os(CHILD).is_some() {
        child();
    }
    sluice_tests::require_root();
    let mut cmd = Command::new(std::env::current_exe().expect("this test binary"));
    cmd.args(["--exact", TEST, "--nocapture", "--test-threads=1"]).env(CHILD, "1").stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = Killed(netns::spawn_tied(&mut cmd).expect("running the child"));
    let pid = child.0.id();
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = loop {
        match rx.recv_timeout(Duration::from_mins(2)) {
            // After libtest's "test NAME ... " (no newline).
            Ok(l) => {
                if let Some((_, r)) = l.split_once("READY ") {
                    break r.to_owned();
                }
            }
            Err(e) => panic!("the child (pid {pid}) did not get ready: {e} (its stderr is above)"),
        }
    };
    let field = |k: &str| -> i32 { ready.split_whitespace().find_map(|f| f.strip_prefix(k)?.strip_prefix('=')?.parse().ok()).unwrap_or_else(|| panic!("{k} in {ready:?}")) };
    let (from_thread, escaped) = (field("from_thread"), field("escaped"));

    // What the child built, so that the checks below are not vacuous.
    let names = namespaces(pid);
    let inodes: BTreeSet<u64> = names.iter().filter_map(|n| netns::netns_inode(n)).collect();
    assert_eq!(inodes.len(), 8, "the child's namespaces (l2lab: sw lb cl be1; lab: sw lb cl1 be1): {names:?}");
    let procs = processes_in(&inodes);
    println!("the child {pid} runs in its namespaces: {procs:?}");
    let pids: BTreeSet<i32> = procs.iter().map(|(p, _)| *p).collect();
    assert!(pids.contains(&from_thread), "the process spawned from a short-lived thread died with the thread: {procs:?}");
    assert!(pids.contains(&escaped), "{procs:?}");
    // l2lab: decap, daemon; the lab: decap, HTTP server, daemon; and the two sleeps.
    assert_eq!(procs.len(), 7, "{procs:?}");
    let (bpf, tmp) = (Path::new("/sys/fs/bpf"), std::env::temp_dir());
    let pins = leftovers(bpf, pid);
    let files = leftovers(&tmp, pid);
    println!("its pins: {pins:?}\nits files: {files:?}");
    assert!(pins.len() >= 4 && files.len() >= 4, "pins {pins:?} files {files:?}");

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
    let status = child.0.wait().expect("wait");
    println!("the child: {status}");

    // PDEATHSIG: all but the escaped process die with it, before any sweep.
    let deadline = Instant::now() + Duration::from_secs(5);
    let left = loop {
        let left: Vec<_> = processes_in(&inodes).into_iter().filter(|(p, _)| *p != escaped).collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(left.is_empty(), "still running 5 s after the test process was killed (no PDEATHSIG?): {left:?}");

    // The sweep: what the next test's first namespace does.
    drop(Netns::new("sweep"));
    let procs = processes_in(&inodes);
    assert!(procs.is_empty(), "processes left in the dead test's namespaces: {procs:?}");
    let names = namespaces(pid);
    assert!(names.is_empty(), "namespaces left: {names:?}");
    let pins = leftovers(bpf, pid);
    assert!(pins.is_empty(), "pins left: {pins:?}");
    let files = leftovers(&tmp, pid);
    assert!(files.is_empty(), "files left in {}: {files:?}", tmp.display());
}

#[test]
fn lab_down_stops_etcd_and_whatever_runs_in_the_labs_namespaces() {
    let lab = lab(1, 1, Mode::L2dsr);
    let (prefix, dir) = (lab.spec.prefix.clone(), lab.spec.dir.clone());
    // etcd as the limits lab starts it (its pid in DIR/etcd.pid), and a process no pid file names.
    let etcd = lab
        .spawn(
            "etcd",
            lab.command("cl1", "etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(dir.join("etcd"))
                .args(["--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379"])
                .args(["--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
                .args(["--initial-cluster", "t=http://127.0.0.1:2380", "--log-level", "warn"]),
        )
        .expect("etcd");
    let out = lab.command("be1", "sh").args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]).output().expect("sh");
    let stray: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("the stray sleep's pid");
    let names: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    let inodes: BTreeSet<u64> = names.iter().filter_map(|n| netns::netns_inode(n)).collect();
    let pids = || processes_in(&inodes).into_iter().map(|(p, _)| p).collect::<BTreeSet<i32>>();
    lab.wait("etcd to run", Duration::from_secs(10), || pids().contains(&(etcd as i32))).expect("etcd");
    assert!(pids().contains(&stray));

    // What `sluice lab down` runs.
    let removed = sluice_lab::topo_cleanup(&prefix, &dir);
    println!("removed: {removed:#?}");
    assert!(removed.iter().any(|r| r == &format!("killed etcd (pid {etcd})")), "etcd's pid file was not used: {removed:?}");
    assert!(removed.iter().any(|r| r.starts_with(&format!("killed sleep (pid {stray})"))), "{removed:?}");
    let procs = processes_in(&inodes);
    assert!(procs.is_empty(), "processes left in the lab's namespaces: {procs:?}");
    assert!(names.iter().all(|n| !Path::new("/run/netns").join(n).exists()), "namespaces left");
    assert!(leftovers(Path::new("/sys/fs/bpf"), std::process::id()).iter().all(|p| !p.starts_with(&format!("{prefix}-"))), "pins left");
    assert!(!dir.exists(), "{} left", dir.display());
    drop(lab);
}
