//! A small `l2dsr` deployment in network namespaces for end-to-end tests of the real daemon:
//! a switch namespace with a bridge; a client, the load balancer and N backends on it. The
//! VIP is routed by the client via the load balancer and sits on the backends' loopback, so
//! replies go straight back to the client. Backends run a TCP server that answers each
//! connection with its name and keeps it open. Everything is removed on drop.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    netns::{veth, ChildGuard, Netns},
    PinDir,
};

pub const VIP: &str = "10.70.0.100";

/// The `sluice` binary under test ([`crate::sluice_bin`]), which must exist.
pub fn sluice_bin() -> PathBuf {
    let p = crate::sluice_bin();
    assert!(p.exists(), "sluice binary not found at {}; run the tests with `cargo xtask test`", p.display());
    p
}

/// A backend namespace and its server thread (stoppable, restartable).
pub struct Backend {
    pub ns: Netns,
    pub n: u8,
    server: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Backend {
    pub fn address(&self) -> String {
        format!("10.70.0.{}", 10 + self.n)
    }

    /// Starts the server on :80: answers each connection with "backend-N", keeps it open and
    /// echoes whatever the client sends.
    pub fn start(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let name = format!("backend-{}", self.n);
        let listener = self.ns.run(|| TcpListener::bind("0.0.0.0:80").expect("bind :80"));
        listener.set_nonblocking(true).expect("nonblocking");
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let mut idle = true;
                if let Ok((mut c, _)) = listener.accept() {
                    let _ = c.write_all(name.as_bytes());
                    let _ = c.set_nonblocking(true);
                    held.push(c);
                    idle = false;
                }
                held.retain_mut(|c| match c.read(&mut buf) {
                    Ok(0) => false,
                    Ok(n) => {
                        idle = false;
                        let _ = c.set_nonblocking(false);
                        let ok = c.write_all(&buf[..n]).is_ok();
                        let _ = c.set_nonblocking(true);
                        ok
                    }
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                });
                if idle {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        self.server = Some((stop, thread));
    }

    /// Stops the server: the port is closed (connections refused), open ones are dropped.
    pub fn stop(&mut self) {
        if let Some((stop, t)) = self.server.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a [`Lab::webhook_receiver`] received: (arrival, request) in order.
#[derive(Clone, Default)]
pub struct Posts(pub Arc<std::sync::Mutex<Vec<(Instant, String)>>>);

impl Posts {
    /// The first request containing every string of `want`.
    pub fn first(&self, want: &[&str]) -> Option<(Instant, String)> {
        self.0.lock().expect("posts").iter().find(|(_, b)| want.iter().all(|w| b.contains(w))).cloned()
    }

    pub fn any(&self, want: &[&str]) -> bool {
        self.first(want).is_some()
    }
}

pub struct Lab {
    pub switch: Netns,
    pub lb: Netns,
    pub client: Netns,
    pub backends: Vec<Backend>,
    pub pins: PinDir,
    pub dir: PathBuf,
    pub config: PathBuf,
    _switch_xdp: ChildGuard,
    _decap_pins: PinDir,
}

impl Lab {
    pub fn new(n_backends: u8) -> Self {
        let switch = Netns::new("sw");
        switch.bridge("br0");
        let lb = Netns::new("lb");
        let client = Netns::new("cl");
        veth(&lb, "lb0", &switch, "sw-lb");
        veth(&client, "cl0", &switch, "sw-cl");
        for p in ["sw-lb", "sw-cl"] {
            switch.ip(&["link", "set", p, "master", "br0"]);
        }
        // A frame sent with XDP_TX into a veth is delivered only if the peer runs an XDP
        // program (on this kernel, enabling GRO on the peer is not enough): give the switch
        // port one that passes everything (the decapsulator passes plain frames untouched).
        let decap_pins = PinDir::new();
        let switch_xdp = switch.spawn(switch.command(sluice_bin()).args(["decap", "--iface", "sw-lb", "--pin-dir"]).arg(&decap_pins.0));
        wait_for("the switch port's XDP program", || switch.link_show("sw-lb").contains("xdp"));
        lb.addr_add("lb0", "10.70.0.1/24");
        client.addr_add("cl0", "10.70.0.2/24");
        client.route_add(&format!("{VIP}/32"), "10.70.0.1");
        // The client's kernel would leave TCP checksums to an offload the XDP path never does.
        assert!(client.output("ethtool", &["-K", "cl0", "tx", "off"]).status.success());
        let mut backends = Vec::new();
        for n in 1..=n_backends {
            let ns = Netns::new(&format!("be{n}"));
            veth(&ns, "eth0", &switch, &format!("sw-be{n}"));
            switch.ip(&["link", "set", &format!("sw-be{n}"), "master", "br0"]);
            ns.addr_add("eth0", &format!("10.70.0.{}/24", 10 + n));
            ns.addr_add("lo", &format!("{VIP}/32"));
            // Do not answer ARP for the VIP (on the wire it is the load balancer's).
            assert!(ns.output("sysctl", &["-qw", "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"]).status.success());
            let mut b = Backend { ns, n, server: None };
            b.start();
            backends.push(b);
        }
        let dir = std::env::temp_dir().join(format!("sluice-lab-{}-{}", std::process::id(), lb.name()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("sluice.toml");
        Self { switch, lb, client, backends, pins: PinDir::new(), dir, config, _switch_xdp: switch_xdp, _decap_pins: decap_pins }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("sluice.sock")
    }

    pub fn journal(&self) -> PathBuf {
        self.dir.join("journal.jsonl")
    }

    /// Writes the config: one service "web" on VIP:80 with `backends` (TOML for each
    /// `[[service.backend]]` table body, e.g. `max_conns = 10`).
    pub fn write_config(&self, backends: &[(u8, &str)]) {
        self.write_config_with(backends, "");
    }

    /// [`Lab::write_config`] with extra top-level TOML (e.g. an `[alerts]` table) at the end.
    pub fn write_config_with(&self, backends: &[(u8, &str)], extra: &str) {
        let mut t = format!(
            "[daemon]\ninterface = \"lb0\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\njournal = \"{}\"\n\
             [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nproto = \"tcp\"\nring_size = 1009\n",
            self.pins.0.display(),
            self.socket().display(),
            self.journal().display()
        );
        for (n, body) in backends {
            t.push_str(&format!("[[service.backend]]\naddress = \"10.70.0.{}\"\n{body}\n", 10 + n));
        }
        t.push_str(extra);
        std::fs::write(&self.config, t).expect("write config");
    }

    /// Starts `sluice run --config` in the load balancer's namespace and waits until it serves.
    pub fn start_daemon(&self) -> ChildGuard {
        let mut d = self.lb.spawn(self.lb.command(sluice_bin()).arg("run").arg("--config").arg(&self.config));
        wait_for("the daemon to attach and serve", || {
            if let Some(out) = d.exited() {
                panic!("sluice run exited: {}", String::from_utf8_lossy(&out.stderr));
            }
            self.lb.link_show("lb0").contains("xdp") && self.socket().exists()
        });
        d
    }

    /// Connects to the VIP from the client; returns the backend's name and the open stream.
    pub fn connect(&self) -> Result<(String, TcpStream), std::io::Error> {
        self.client.run(|| {
            let mut s = TcpStream::connect_timeout(&SocketAddr::new(VIP.parse().expect("vip"), 80), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 32];
            let n = s.read(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), s))
        })
    }

    /// `GET /metrics` from the daemon (it listens on 127.0.0.1:9477 inside the lb namespace).
    pub fn metrics(&self) -> String {
        self.lb.run(|| {
            let mut s = TcpStream::connect("127.0.0.1:9477").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
            let mut body = String::new();
            s.read_to_string(&mut body).expect("response");
            assert!(body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"), "{}", body.lines().next().unwrap_or(""));
            body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
        })
    }

    /// A webhook receiver (Alertmanager's side) in the load balancer's namespace: records each
    /// POST with its arrival time and answers 200.
    pub fn webhook_receiver(&self) -> (u16, Posts) {
        let l = self.lb.run(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
        let port = l.local_addr().expect("addr").port();
        let posts = Posts::default();
        let p = posts.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { break };
                let mut body = Vec::new();
                let mut buf = [0u8; 8192];
                // Until the body is complete (content-length).
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    body.extend_from_slice(&buf[..n]);
                    if crate::load::http_message(&body).is_some() {
                        break;
                    }
                }
                p.0.lock().expect("posts").push((Instant::now(), String::from_utf8_lossy(&body).into_owned()));
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        (port, posts)
    }

    /// `sluice timeline --format markdown` of this lab's journal (no daemon needed).
    pub fn timeline_markdown(&self) -> String {
        let out = std::process::Command::new(sluice_bin())
            .args(["timeline", "--since", "1h", "--format", "markdown", "--journal"])
            .arg(self.journal())
            .output()
            .expect("sluice timeline");
        assert!(out.status.success(), "timeline: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sluice detach` for this lab's pins (the daemon leaves the datapath running on exit).
    pub fn detach(&self) {
        let out = std::process::Command::new(sluice_bin()).arg("detach").arg("--pin-dir").arg(&self.pins.0).output().expect("sluice detach");
        assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `sluice --socket S args…` → (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = std::process::Command::new(sluice_bin()).arg("--socket").arg(self.socket()).args(args).output().expect("sluice");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` every 50 ms for up to 15 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
