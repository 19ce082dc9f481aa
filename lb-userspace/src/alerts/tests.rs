use std::time::Duration;

use super::*;

fn sample(open: u64, refused: u64) -> Sample {
    Sample {
        backends: vec![BackendSample {
            service: "web".into(),
            backend: "10.0.0.11".into(),
            open,
            max_conns: 100,
            active: true,
            refused: lb_common::Refusals { backend_limit: refused, ..Default::default() },
            cluster: None,
        }],
        flows: open,
        flow_capacity: 1000,
        drift: BTreeMap::new(),
        config_file: "/etc/sluice/sluice.toml".into(),
        not_announcing: None,
        limits: None,
        change_refused: None,
        service_labels: BTreeMap::new(),
        health_local: Vec::new(),
    }
}

fn engine() -> Engine {
    Engine::new(AlertsCfg { name: Some("lb-1".into()), fire_after: Duration::from_secs(2), resolve_after: Duration::from_secs(5), ..AlertsCfg::default() })
}

#[test]
fn at_limit_fires_after_the_hysteresis_and_names_the_setting() {
    let mut e = engine();
    let t0 = Instant::now();
    assert!(e.evaluate(t0, sample(100, 0)).is_empty(), "not before fire_after");
    assert!(e.evaluate(t0 + Duration::from_secs(1), sample(100, 3)).iter().all(|n| n.alertname != "SluiceBackendAtLimit"));
    let n = e.evaluate(t0 + Duration::from_secs(2), sample(100, 7));
    let at = n.iter().find(|n| n.alertname == "SluiceBackendAtLimit").expect("fires at 2 s");
    assert_eq!(at.status, Status::Firing);
    assert!(at.summary.contains("Sluice load balancer lb-1") && at.summary.contains("100 of 100"), "{}", at.summary);
    assert!(at.description.contains("service \"web\" backend 10.0.0.11 max_conns") && at.description.contains("/etc/sluice/sluice.toml"), "{}", at.description);
    assert!(at.description.contains("not the backend, not the database"), "{}", at.description);
    assert_eq!(at.labels["service"], "web");
    assert_eq!(at.labels["component"], "sluice-load-balancer");
    // Refusals: counted since the last sample, with the reason.
    // Refusals: counted since the last sample, with the reason; they fire at once
    // (refusals_fire_after = 0: clients are already failing).
    let mut e2 = engine();
    e2.evaluate(t0, sample(100, 0));
    let n = e2.evaluate(t0 + Duration::from_millis(300), sample(100, 3));
    let r = n.iter().find(|n| n.alertname == "SluiceRefusingConnections").expect("refusals fire at once");
    assert!(r.summary.contains("3 in the last") && r.labels["reason"] == "backend_limit", "{}", r.summary);
    assert!(r.description.contains("max_conns = 100"), "{}", r.description);
    let n = e2.evaluate(t0 + Duration::from_secs(1), sample(100, 8));
    assert!(n.iter().all(|n| n.alertname != "SluiceRefusingConnections"), "fires once");
}

#[test]
fn resolves_only_after_staying_false_and_flapping_does_not_resolve() {
    let mut e = engine();
    let t0 = Instant::now();
    e.evaluate(t0, sample(100, 0));
    assert!(e.evaluate(t0 + Duration::from_secs(2), sample(100, 0)).iter().any(|n| n.alertname == "SluiceBackendAtLimit"));
    // Dips below the limit briefly, back at it: no resolve, no second firing.
    let n = e.evaluate(t0 + Duration::from_secs(3), sample(50, 0));
    assert!(n.iter().all(|n| n.alertname != "SluiceBackendAtLimit"));
    let n = e.evaluate(t0 + Duration::from_secs(4), sample(100, 0));
    assert!(n.iter().all(|n| n.alertname != "SluiceBackendAtLimit"));
    e.evaluate(t0 + Duration::from_secs(5), sample(10, 0));
    assert!(e.evaluate(t0 + Duration::from_secs(9), sample(10, 0)).iter().all(|n| n.alertname != "SluiceBackendAtLimit"));
    let n = e.evaluate(t0 + Duration::from_secs(10), sample(10, 0));
    let r = n.iter().find(|n| n.alertname == "SluiceBackendAtLimit").expect("resolves after 5 s below");
    assert_eq!(r.status, Status::Resolved);
    assert!(r.summary.starts_with("RESOLVED: "));
}

#[test]
fn near_limit_saturation_forecast_and_service_saturated() {
    let mut e = engine();
    let t0 = Instant::now();
    let mut n = e.evaluate(t0, sample(40, 0));
    n.extend(e.evaluate(t0 + Duration::from_secs(1), sample(60, 0)));
    n.extend(e.evaluate(t0 + Duration::from_secs(3), sample(85, 0)));
    n.extend(e.evaluate(t0 + Duration::from_secs(5), sample(90, 0)));
    let names: Vec<&str> = n.iter().map(|n| n.alertname.as_ref()).collect();
    assert!(names.contains(&"SluiceBackendNearLimit"), "{names:?}");
    assert!(names.contains(&"SluiceBackendSaturationForecast"), "{names:?}");
    let mut e = engine();
    e.evaluate(t0, sample(100, 0));
    let n = e.evaluate(t0 + Duration::from_secs(2), sample(100, 0));
    assert!(n.iter().any(|n| n.alertname == "SluiceServiceSaturated"));
}

/// Only conditions that hold (or alerts still firing) are kept: 10,000 idle backends leave
/// no state behind, and an alert whose backend left the config resolves like any other.
#[test]
fn keeps_state_only_for_what_holds_and_resolves_a_removed_backend() {
    let mut e = engine();
    let t0 = Instant::now();
    let mut big = sample(10, 0);
    big.backends = (0..10_000).map(|i| BackendSample { backend: format!("10.1.{}.{}", i / 250, i % 250).into(), ..big.backends[0].clone() }).collect();
    big.backends[7].open = 100;
    e.evaluate(t0, big.clone());
    assert_eq!(e.rules.len(), 1, "one pending condition, nothing for the 9,999 idle backends");
    assert!(e.evaluate(t0 + Duration::from_secs(2), big.clone()).iter().any(|n| n.alertname == "SluiceBackendAtLimit" && n.labels["backend"] == "10.1.0.7"));
    // The backend leaves the config (and the order of the others changes).
    big.backends.remove(7);
    big.backends.reverse();
    assert!(e.evaluate(t0 + Duration::from_secs(3), big.clone()).is_empty());
    let n = e.evaluate(t0 + Duration::from_secs(8), big);
    assert!(n.iter().any(|n| n.alertname == "SluiceBackendAtLimit" && n.status == Status::Resolved), "{n:?}");
    assert!(e.rules.is_empty());
}
