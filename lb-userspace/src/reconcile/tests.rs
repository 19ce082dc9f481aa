use super::*;

fn cfg(ring: u32, web_limit: u32) -> Config {
    let text = format!(
        "[daemon]\ninterface = \"lo\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nproto = \"tcp\"\nring_size = {ring}\n\
         [[service.backend]]\naddress = \"10.0.1.1\"\nmax_conns = {web_limit}\n[[service.backend]]\naddress = \"10.0.1.2\"\nmax_conns = 10\n\
         [[service]]\nname = \"dns\"\nvip = \"10.0.0.53\"\nport = 53\nproto = \"udp\"\nring_size = 257\nmode = \"ipip\"\n\
         [[service.backend]]\naddress = \"10.0.2.1\"\nmax_conns = 10\n"
    );
    crate::config::parse(std::path::Path::new("test.toml"), &text).map_or_else(|e| panic!("{e}"), |(c, _)| c)
}

/// A plan is made without a datapath: what it would change, named, and nothing applied.
#[test]
fn a_plan_needs_no_datapath_and_says_what_changes() {
    let applied = Applied::new(8 * 257);
    let mac = |_: IpAddr| Some([2, 0, 0, 0, 0, 1]);
    let plan = applied.plan(&cfg(257, 10), &mac, |_| 0).expect("plan");
    let what: Vec<&str> = plan.changes.iter().map(|c| c.what.as_str()).collect();
    assert_eq!(what.len(), 5, "{what:?}");
    assert!(what.iter().any(|w| w.starts_with("add service \"web\"")), "{what:?}");
    assert!(what.iter().any(|w| w.starts_with("service \"dns\": add backend 10.0.2.1")), "{what:?}");
    assert!(applied.services.is_empty(), "planning applies nothing");
    assert!(plan.changes.iter().any(|c| c.key == "service \"dns\" backend 10.0.2.1"), "{:?}", plan.changes);

    // A limit change names the key it changes.
    let mut now = Applied::new(8 * 257);
    now.services = plan.next.clone();
    let plan = now.plan(&cfg(257, 99), &mac, |_| 0).expect("plan");
    assert_eq!(plan.changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), ["service \"web\" backend 10.0.1.1 max_conns"]);

    // A health check moved to another port changes no map, and is said all the same: a
    // wrong one takes backends out of the ring.
    let mut checked = cfg(257, 10);
    let check = |port| crate::config::Health { port: Some(port), ..toml::from_str("kind = \"tcp\"").expect("health") };
    checked.services[0].backends[0].health = Some(check(80));
    let mut was = Applied::new(8 * 257);
    was.services = applied.plan(&checked, &mac, |_| 0).expect("plan").next;
    checked.services[0].backends[0].health = Some(check(8080));
    let plan = was.plan(&checked, &mac, |_| 0).expect("plan");
    let said: Vec<(&str, &str)> = plan.changes.iter().map(|c| (c.key.as_str(), c.what.as_str())).collect();
    assert_eq!(said, [("service \"web\" backend 10.0.1.1 health", "service \"web\" backend 10.0.1.1: health check tcp :80 every 1s -> tcp :8080 every 1s")]);

    // Rings that do not fit RINGS: refused before anything is written, naming the service.
    let e = applied.plan(&cfg(4099, 10), &mac, |_| 0).expect_err("no room for the ring");
    assert!(e.to_string().contains("service \"web\"") && e.to_string().contains("RINGS"), "{e}");

    // l2dsr without a MAC for a backend: refused, naming it.
    let e = applied.plan(&cfg(257, 10), &|_| None, |_| 0).expect_err("no MAC");
    assert!(e.to_string().contains("backend 10.0.1.1"), "{e}");
}
