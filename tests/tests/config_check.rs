//! `sluice config check`: findings name the file, the key and the reason; the exit status
//! says the severity (0 clean, 1 warnings, 2 errors). Needs no privileges.

use std::{path::Path, process::Command};

use sluice_tests::sluice_bin;

fn check(text: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("sluice-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join(format!("c{}.toml", text.len()));
    std::fs::write(&file, text).expect("write");
    let out = Command::new(sluice_bin()).args(["config", "check"]).arg(&file).output().expect("sluice");
    let _ = std::fs::remove_file(&file);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_shipped_example_is_clean() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sluice.example.toml");
    let out = Command::new(sluice_bin()).args(["config", "check"]).arg(&example).output().expect("sluice");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn exit_status_by_severity() {
    let base = "[daemon]\ninterface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nproto = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.11\"\nmax_conns = 10\n";
    let (code, out) = check(base);
    assert_eq!(code, 0, "{out}");
    let (code, out) = check(&base.replace("interface = \"eth0\"", "interface = \"eth0\"\nmetrics_listen = \"0.0.0.0:9477\""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("warning: daemon.metrics_listen"), "{out}");
    let (code, out) = check(&base.replace("max_conns = 10", "max_conns = 0"));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(".toml: error: service[0].backend[0].max_conns: is 0"), "{out}");
    let (code, out) = check("[daemon\n");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 1"), "{out}");
}

#[test]
fn the_shipped_prometheus_rules_are_valid() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    let out = Command::new("promtool").args(["check", "rules"]).arg(&rules).output().expect("promtool (cargo xtask setup installs it)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("11 rules found"), "one rule per built-in alert: {text}");
}

#[test]
fn the_shipped_alertmanager_routing_is_valid_and_routes_sluice_alerts_to_the_load_balancer_team() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/alertmanager/alertmanager.yml");
    let out = Command::new("amtool").args(["check-config"]).arg(&cfg).output().expect("amtool (cargo xtask setup installs prometheus-alertmanager)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Where a Sluice alert goes, by its labels (as Sluice sets them, plus a service's team).
    let route = |labels: &[&str]| {
        let out = Command::new("amtool").args(["config", "routes", "test", "--config.file"]).arg(&cfg).args(labels).output().expect("amtool");
        String::from_utf8_lossy(&out.stdout).split([',', '\n', ' ']).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(",")
    };
    assert_eq!(route(&["alertname=SluiceBackendAtLimit", "component=sluice-load-balancer", "service=web"]), "load-balancer");
    assert_eq!(route(&["alertname=SluiceBackendAtLimit", "component=sluice-load-balancer", "team=checkout"]), "checkout,load-balancer");
    assert_eq!(route(&["alertname=Other"]), "default");
    // Every alert Sluice can raise has its runbook section (the runbook_url's anchor).
    let runbook = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/RUNBOOK.md")).expect("RUNBOOK.md");
    let rules = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml")).expect("rules");
    for name in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(runbook.contains(&format!("\n## {name}\n")), "docs/RUNBOOK.md has no section for {name}");
    }
}

#[test]
fn the_grafana_dashboard_only_uses_metrics_sluice_exports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/sluice.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("valid JSON");
    let metrics_rs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-userspace/src/metrics.rs")).expect("metrics.rs");
    let mut used = 0;
    for p in v["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("sluice_")) {
                assert!(metrics_rs.contains(&format!("\"{word}\"")), "panel \"{}\" uses {word}, which Sluice does not export", p["title"]);
                used += 1;
            }
        }
    }
    assert!(used >= 10, "{used}");
}
