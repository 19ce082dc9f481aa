//! One serialized path for every change of the running config: 50 `sluice backend set-limit`
//! calls on 50 backends at once, while a health-checked backend flaps, `config apply` applies
//! the file three times and SIGHUP reloads it three times. Every edit must be in the final state, in the config file (runtime changes
//! are written back, so a reload keeps them) and in the journal, once.

use std::{process::Command, time::Duration};

use nix::sys::signal::{kill, Signal};
use serde_json::Value;
use sluice_tests::{
    l2lab::{wait_for, Lab},
    sluice_bin,
};

const N: u8 = 50;

fn address(n: u8) -> String {
    format!("10.70.0.{}", 10 + n)
}

fn limits(lab: &Lab) -> Vec<(String, u64, String)> {
    let (code, out, err) = lab.ctl(&["service", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    v[0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["address"].as_str().unwrap_or("").to_owned(), b["max_conns"].as_u64().unwrap_or(0), b["state"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[test]
fn concurrent_edits_health_flaps_and_reloads_lose_nothing() {
    let mut lab = Lab::new(1);
    // Backend 1 is real and health-checked; the others exist only in the config (their MACs
    // given, so nothing waits on the neighbour table).
    let bodies: Vec<(u8, String)> = (1..=N)
        .map(|n| {
            if n == 1 {
                (n, "max_conns = 100\nhealth = { kind = \"tcp\", interval = \"50ms\", timeout = \"40ms\", rise = 1, fall = 1 }".to_owned())
            } else {
                (n, format!("max_conns = 100\nmac = \"02:00:00:00:01:{n:02x}\""))
            }
        })
        .collect();
    let bodies: Vec<(u8, &str)> = bodies.iter().map(|(n, b)| (*n, b.as_str())).collect();
    lab.write_config(&bodies);
    let daemon = lab.start_daemon();
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);

    let (config, socket) = (lab.config.clone(), lab.socket());
    let apply = || Command::new(sluice_bin()).arg("--socket").arg(&socket).args(["config", "apply"]).arg(&config).output().expect("sluice");
    let (edits, applies) = std::thread::scope(|s| {
        let edits: Vec<_> = (1..=N)
            .map(|n| {
                let socket = &socket;
                s.spawn(move || {
                    Command::new(sluice_bin())
                        .arg("--socket")
                        .arg(socket)
                        .args(["backend", "set-limit", "web", &address(n), &(200 + u32::from(n)).to_string()])
                        .output()
                        .expect("sluice")
                })
            })
            .collect();
        // Meanwhile: `config apply` of the file, SIGHUP reloads, and backend 1 flapping.
        let applies: Vec<_> = (0..3).map(|_| s.spawn(apply)).collect();
        let flaps = s.spawn(|| {
            for _ in 0..3 {
                kill(pid, Signal::SIGHUP).expect("SIGHUP");
                std::thread::sleep(Duration::from_millis(60));
            }
        });
        for _ in 0..2 {
            lab.backends[0].stop();
            wait_for("backend 1 to be taken out of the ring", || limits(&lab).iter().any(|(a, _, st)| *a == address(1) && st == "down"));
            lab.backends[0].start();
            wait_for("backend 1 back in the ring", || limits(&lab).iter().any(|(a, _, st)| *a == address(1) && st == "active"));
        }
        flaps.join().expect("reloads");
        (edits.into_iter().map(|h| h.join().expect("edit thread")).collect::<Vec<_>>(), applies.into_iter().map(|h| h.join().expect("apply thread")).collect::<Vec<_>>())
    });
    for out in &applies {
        assert!(out.status.success(), "config apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    for (n, out) in (1..=N).zip(&edits) {
        assert!(out.status.success(), "set-limit on {}: {}", address(n), String::from_utf8_lossy(&out.stderr));
    }

    // Every edit holds in the running state...
    let after = limits(&lab);
    for n in 1..=N {
        let (_, max, _) = after.iter().find(|(a, _, _)| *a == address(n)).unwrap_or_else(|| panic!("backend {} gone", address(n)));
        assert_eq!(*max, 200 + u64::from(n), "backend {}: its edit was lost", address(n));
    }
    // ...in the file (a reload keeps them)...
    let (cfg, _) = lb_userspace::config::load(&lab.config).expect("the written-back file is valid");
    for b in &cfg.services[0].backends {
        let n = b.address.to_string().rsplit('.').next().and_then(|x| x.parse::<u32>().ok()).expect("address") - 10;
        assert_eq!(b.max_conns, 200 + n, "{} in the file", b.address);
    }
    // ...and in the journal, once each.
    let journal = std::fs::read_to_string(lab.journal()).expect("journal");
    for n in 1..=N {
        let line = format!("service \\\"web\\\" backend {}: max_conns 100 -> {}", address(n), 200 + u32::from(n));
        assert_eq!(journal.matches(&line).count(), 1, "the journal should record {line} once:\n{journal}");
    }
    drop(daemon);
    lab.detach();
}
