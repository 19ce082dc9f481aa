//! Building and removing the lab's namespaces, links and processes. Everything is named after
//! the lab's prefix (`PREFIX-sw`, `PREFIX-lb`, `PREFIX-cl1`, `PREFIX-be1`, pins under
//! `/sys/fs/bpf/PREFIX-*`), so `cleanup(prefix)` finds what a crashed run left behind.

use std::{
    collections::BTreeMap,
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{backend4, backend6, client4, client6, LB4, LB6, MAX_BACKENDS, MAX_CLIENTS, PORT, VIP4, VIP6};
use lb_userspace::config::{self, Mode};

use crate::netns::{self, ip, run};

/// Short flow timeouts, so that "no leaked flows after timeouts" is seconds, not hours away.
pub const SYN_TIMEOUT: Duration = Duration::from_secs(3);
pub const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(10);
pub const CLOSING_TIMEOUT: Duration = Duration::from_secs(3);

/// The config's `[flows.timeouts]` with the short timeouts above.
pub fn short_timeouts() -> config::Timeouts {
    config::Timeouts { syn: SYN_TIMEOUT, established: ESTABLISHED_TIMEOUT, closing: CLOSING_TIMEOUT, udp: Duration::from_secs(10) }
}

/// What to build.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Namespace-name prefix (keep it short: interface and namespace names are derived from it).
    pub prefix: String,
    pub backends: u8,
    pub clients: u8,
    /// `l2dsr` (the VIP on the backends' loopback) or `ipip` (plus `sluice decap` on them).
    pub mode: Mode,
    /// Start the built-in HTTP server on each backend (tests may bring their own).
    pub servers: bool,
    /// The lab's files: generated config, logs, control socket, journal.
    pub dir: PathBuf,
    /// The `sluice` binary run inside the namespaces.
    pub sluice: PathBuf,
}

/// One backend in a generated config.
#[derive(Clone, Debug)]
pub struct BackendConf {
    pub n: u8,
    pub max_conns: u32,
    pub weight: u32,
}

/// Service options in a generated config.
#[derive(Clone, Debug, Default)]
pub struct ServiceOpts {
    /// Add service "web6" on the IPv6 VIP (same backends' IPv6 addresses).
    pub v6: bool,
    /// `overflow.spill`: try other backends before refusing.
    pub spill: bool,
}

/// A running lab. Dropping it removes every trace (processes, namespaces, pins, files).
pub struct Lab {
    pub spec: Spec,
    children: Mutex<BTreeMap<String, Child>>,
    /// Built by this process (torn down on drop), or attached to one `lab up` runs.
    owned: bool,
}

/// What `lab down` needs to find a lab another process built.
#[derive(Serialize, Deserialize)]
struct StateFile {
    spec: Spec,
    supervisor: u32,
}

/// The pid of another process that built the lab in `dir` and still runs.
fn running_supervisor(dir: &Path) -> Option<u32> {
    let st: StateFile = serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).ok()?).ok()?;
    (st.supervisor != std::process::id() && Path::new(&format!("/proc/{}", st.supervisor)).exists()).then_some(st.supervisor)
}

/// Whether `pid` is still one the lab starts — `sluice`, a cluster lab's `bird` or `etcd` — (a
/// pid file may outlive its process, and the pid be reused by something else).
fn is_ours(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with("sluice") || f == "bird" || f == "etcd"))
}

/// Removes what a lab with this prefix left: its processes (from the pid files, then whatever
/// still runs in its namespaces: etcd, BIRD, a daemon's children, anything started by hand),
/// namespaces (which takes their links and XDP programs along), pins, and files in `dir`.
pub fn cleanup(prefix: &str, dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("lab.json")) {
        if let Ok(st) = serde_json::from_str::<StateFile>(&text) {
            let me = std::process::id();
            if st.supervisor != me && Path::new(&format!("/proc/{}", st.supervisor)).exists() {
                // A `lab up` still runs: ask it to tear down itself, then make sure.
                let pid = nix::unistd::Pid::from_raw(st.supervisor as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(15);
                while Path::new(&format!("/proc/{}", st.supervisor)).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                removed.push(format!("stopped `sluice lab up` (pid {})", st.supervisor));
            }
        }
    }
    for pidfile in std::fs::read_dir(dir).into_iter().flatten().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "pid")) {
        if let Some(pid) = std::fs::read_to_string(pidfile.path()).ok().and_then(|p| p.trim().parse::<i32>().ok()).filter(|p| is_ours(*p)) {
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).is_ok() {
                removed.push(format!("killed {} (pid {pid})", pidfile.path().file_stem().unwrap_or_default().to_string_lossy()));
            }
        }
    }
    let ours = |name: &str| name.strip_prefix(prefix).is_some_and(|r| r.starts_with('-'));
    let namespaces: Vec<String> =
        std::fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| ours(n)).collect();
    // A process left inside would keep its namespace (and XDP program) alive once the name is gone.
    let inodes = namespaces.iter().filter_map(|n| netns::netns_inode(n)).collect();
    for (pid, comm) in netns::kill_all_in(&inodes, Duration::from_secs(10)) {
        removed.push(format!("killed {comm} (pid {pid}) in the lab's namespaces"));
    }
    for name in namespaces {
        if ip(&["netns", "del", &name]).is_ok() {
            removed.push(format!("namespace {name}"));
        }
    }
    for e in std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ours(&name) && std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(format!("pins /sys/fs/bpf/{name}"));
        }
    }
    if dir.exists() && std::fs::remove_dir_all(dir).is_ok() {
        removed.push(format!("files {}", dir.display()));
    }
    removed
}

impl Lab {
    /// Builds the topology (after removing what a previous lab with this prefix left).
    pub fn up(spec: Spec) -> Result<Self> {
        if !(1..=MAX_BACKENDS).contains(&spec.backends) {
            bail!("--backends {}: between 1 and {MAX_BACKENDS}", spec.backends);
        }
        if !(1..=MAX_CLIENTS).contains(&spec.clients) {
            bail!("--clients {}: between 1 and {MAX_CLIENTS}", spec.clients);
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab creates network namespaces and loads XDP programs: run it as root");
        }
        for (tool, pkg) in [("ip", "iproute2"), ("nsenter", "util-linux"), ("ethtool", "ethtool")] {
            if Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
                bail!("`{tool}` is missing: install {pkg} (`cargo xtask setup` does)");
            }
        }
        super::raise_nofile();
        if let Some(pid) = running_supervisor(&spec.dir) {
            bail!("a lab is up already (`sluice lab up`, pid {pid}): remove it first with `sluice lab down`");
        }
        cleanup(&spec.prefix, &spec.dir);
        std::fs::create_dir_all(&spec.dir).with_context(|| format!("creating {}", spec.dir.display()))?;
        let lab = Self { spec, children: Mutex::new(BTreeMap::new()), owned: true };
        lab.write_state()?;
        // On failure, `lab` drops here and removes what was built so far.
        lab.build()?;
        Ok(lab)
    }

    /// The lab a `sluice lab up` built, from its state file in `dir` (not torn down on drop).
    pub fn attach(dir: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(dir.join("lab.json")).with_context(|| format!("no lab is up (no {}); start one with `sluice lab up`", dir.join("lab.json").display()))?;
        let st: StateFile = serde_json::from_str(&text).context("lab.json")?;
        super::raise_nofile();
        Ok(Self { spec: st.spec, children: Mutex::new(BTreeMap::new()), owned: false })
    }

    fn write_state(&self) -> Result<()> {
        let st = StateFile { spec: self.spec.clone(), supervisor: std::process::id() };
        std::fs::write(self.spec.dir.join("lab.json"), serde_json::to_vec_pretty(&st)?).context("writing lab.json")
    }

    /// The full name of namespace `short` ("lb", "sw", "cl1", "be2").
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.spec.prefix)
    }

    pub(crate) fn ns_ip(&self, short: &str, args: &[&str]) -> Result<()> {
        netns::ip_in(&self.ns(short), args)
    }

    /// A command in namespace `short` (`netns::command_in`).
    pub fn command(&self, short: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns::command_in(&self.ns(short), program)
    }

    /// Runs `f` on a thread inside namespace `short`: sockets it creates live there.
    pub fn run_in<T: Send>(&self, short: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(&self.ns(short), f)
    }

    pub(crate) fn sysctl(&self, short: &str, kv: &[&str]) -> Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(kv);
        run(self.command(short, "sysctl").args(&args))
    }

    pub(crate) fn veth(&self, a_ns: &str, a: &str, b_ns: &str, b: &str, mtu: u32) -> Result<()> {
        netns::veth_pair(&self.ns(a_ns), a, &self.ns(b_ns), b, Some(mtu))
    }

    pub(crate) fn add_ns(&self, short: &str) -> Result<()> {
        netns::add(&self.ns(short))
    }

    fn build(&self) -> Result<()> {
        // The fabric carries 1600-byte frames so `ipip` (+20/+40 bytes) fits under clients' 1500.
        const FABRIC_MTU: u32 = 1600;
        self.add_ns("sw")?;
        self.ns_ip("sw", &["link", "add", "br0", "type", "bridge"])?;
        self.ns_ip("sw", &["link", "set", "br0", "mtu", &FABRIC_MTU.to_string(), "up"])?;
        self.add_ns("lb")?;
        self.veth("lb", "lb0", "sw", "sw-lb", FABRIC_MTU)?;
        self.ns_ip("sw", &["link", "set", "sw-lb", "master", "br0"])?;
        self.ns_ip("lb", &["addr", "add", &format!("{LB4}/24"), "dev", "lb0"])?;
        self.ns_ip("lb", &["addr", "add", &format!("{LB6}/64"), "dev", "lb0", "nodad"])?;
        // ipip's next hop comes from bpf_fib_lookup, which answers only on forwarding interfaces.
        self.sysctl("lb", &["net.ipv4.conf.all.forwarding=1", "net.ipv4.conf.lb0.forwarding=1", "net.ipv6.conf.all.forwarding=1"])?;
        // XDP_TX into a veth needs an XDP program on the peer: a pass-through one.
        self.spawn_decap("sw", "sw-lb")?;
        for c in 1..=self.spec.clients {
            let short = format!("cl{c}");
            self.add_ns(&short)?;
            self.veth(&short, "cl0", "sw", &format!("sw-cl{c}"), 1500)?;
            self.ns_ip("sw", &["link", "set", &format!("sw-cl{c}"), "master", "br0"])?;
            self.ns_ip(&short, &["addr", "add", &format!("{}/24", client4(c)), "dev", "cl0"])?;
            self.ns_ip(&short, &["addr", "add", &format!("{}/64", client6(c)), "dev", "cl0", "nodad"])?;
            self.ns_ip(&short, &["route", "add", &format!("{VIP4}/32"), "via", &LB4.to_string()])?;
            self.ns_ip(&short, &["-6", "route", "add", &format!("{VIP6}/128"), "via", &LB6.to_string()])?;
            // The XDP path forwards what the client sends as is: no checksum left to offload.
            run(self.command(&short, "ethtool").args(["-K", "cl0", "tx", "off"]))?;
        }
        for n in 1..=self.spec.backends {
            let short = format!("be{n}");
            self.add_ns(&short)?;
            self.veth(&short, "eth0", "sw", &format!("sw-be{n}"), FABRIC_MTU)?;
            self.ns_ip("sw", &["link", "set", &format!("sw-be{n}"), "master", "br0"])?;
            self.ns_ip(&short, &["addr", "add", &format!("{}/24", backend4(n)), "dev", "eth0"])?;
            self.ns_ip(&short, &["addr", "add", &format!("{}/64", backend6(n)), "dev", "eth0", "nodad"])?;
            // The VIP is local on every backend, never announced (on the wire it is the LB's).
            self.ns_ip(&short, &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            self.ns_ip(&short, &["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
            self.sysctl(&short, &["net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"])?;
            if self.spec.mode == Mode::Ipip {
                self.spawn_decap(&short, "eth0")?;
            }
            if self.spec.servers {
                self.start_server(n)?;
            }
        }
        // Fill the load balancer's neighbour table (l2dsr takes backend MACs from it; ipip's
        // FIB lookup needs resolved next hops).
        for n in 1..=self.spec.backends {
            let _ = run(self.command("lb", "ping").args(["-c1", "-W1", &backend4(n).to_string()]));
            let _ = run(self.command("lb", "ping").args(["-6", "-c1", "-W1", &backend6(n).to_string()]));
        }
        Ok(())
    }

    pub(crate) fn spawn_decap(&self, short: &str, iface: &str) -> Result<()> {
        let pins = PathBuf::from(format!("/sys/fs/bpf/{}-decap-{short}-{iface}", self.spec.prefix));
        let key = format!("decap-{short}-{iface}");
        self.spawn(&key, self.command(short, &self.spec.sluice).args(["decap", "--iface", iface, "--pin-dir"]).arg(&pins))?;
        self.wait(&format!("XDP on {short}/{iface}"), Duration::from_secs(15), || self.link_has_xdp(short, iface))
    }

    /// Whether `iface` in namespace `short` has an XDP program attached.
    pub fn link_has_xdp(&self, short: &str, iface: &str) -> bool {
        Command::new("ip").args(["-n", &self.ns(short), "link", "show", iface]).output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("xdp"))
    }

    /// Starts a process whose output goes to `DIR/KEY.log` and whose pid to `DIR/KEY.pid`; it is
    /// SIGKILLed when this process ends ([`netns::spawn_tied`]).
    pub fn spawn(&self, key: &str, cmd: &mut Command) -> Result<u32> {
        let log = File::create(self.spec.dir.join(format!("{key}.log"))).context("log file")?;
        // Tied to this process: a killed `lab up` (or test) leaves no process behind.
        let child = netns::spawn_tied(cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log)).with_context(|| format!("starting {key}"))?;
        let pid = child.id();
        std::fs::write(self.spec.dir.join(format!("{key}.pid")), pid.to_string())?;
        if let Some(mut old) = self.children.lock().expect("children").insert(key.to_owned(), child) {
            let _ = old.kill();
            let _ = old.wait();
        }
        Ok(pid)
    }

    /// Stops `key` with `sig`, waits up to 10 s (then SIGKILL); true if it was running.
    pub fn stop(&self, key: &str, sig: nix::sys::signal::Signal) -> bool {
        let Some(mut child) = self.children.lock().expect("children").remove(key) else { return false };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
        let _ = std::fs::remove_file(self.spec.dir.join(format!("{key}.pid")));
        true
    }

    /// Whether `key` is still running (its log tail if it exited).
    pub fn exited(&self, key: &str) -> Option<String> {
        let mut ch = self.children.lock().expect("children");
        let c = ch.get_mut(key)?;
        c.try_wait().ok().flatten()?;
        ch.remove(key);
        let _ = std::fs::remove_file(self.spec.dir.join(format!("{key}.pid")));
        Some(self.log_tail(key))
    }

    /// The last lines of `DIR/KEY.log`.
    pub fn log_tail(&self, key: &str) -> String {
        let text = std::fs::read_to_string(self.spec.dir.join(format!("{key}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The built-in HTTP server on backend `n` (`sluice lab serve`), answering with its name.
    pub fn start_server(&self, n: u8) -> Result<()> {
        let short = format!("be{n}");
        self.spawn(&format!("serve-be{n}"), self.command(&short, &self.spec.sluice).args(["lab", "serve", "--name", &format!("backend-{n}"), "--port", &PORT.to_string()]))?;
        self.wait(&format!("backend-{n}'s server"), Duration::from_secs(10), || self.run_in(&short, || std::net::TcpStream::connect((backend4(n), PORT)).is_ok()).unwrap_or(false))
    }

    /// Kills backend `n`'s server (SIGKILL, as a crash): its port closes, its connections reset.
    pub fn kill_server(&self, n: u8) -> bool {
        self.stop(&format!("serve-be{n}"), nix::sys::signal::Signal::SIGKILL)
    }

    pub fn socket(&self) -> PathBuf {
        self.spec.dir.join("sluice.sock")
    }
    pub fn journal(&self) -> PathBuf {
        self.spec.dir.join("journal.jsonl")
    }
    pub fn config_path(&self) -> PathBuf {
        self.spec.dir.join("sluice.toml")
    }
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-lb", self.spec.prefix))
    }

    /// A config for the lab: one service "web" on the VIP(s) port 80 with `backends`, health
    /// checked (TCP, every 500 ms, so a killed backend leaves the ring within ~1.5 s), then
    /// `edit` (e.g. its `[alerts]`), written as TOML. Built from `Config` values: a key renamed
    /// in the config fails to compile here, not when a lab runs.
    pub fn config_text(&self, backends: &[BackendConf], opts: &ServiceOpts, edit: impl FnOnce(&mut config::Config)) -> String {
        let health = config::Health {
            kind: config::HealthKind::Tcp,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(400),
            port: None,
            path: None,
            expect_status: 200,
            rise: 2,
            fall: 2,
        };
        #[expect(clippy::type_complexity, reason = "a table of three columns")]
        let families: &[(&str, IpAddr, fn(u8) -> IpAddr)] = &[("web", IpAddr::V4(VIP4), |n| IpAddr::V4(backend4(n))), ("web6", IpAddr::V6(VIP6), |n| IpAddr::V6(backend6(n)))];
        let services = families
            .iter()
            .take(if opts.v6 { 2 } else { 1 })
            .map(|(name, vip, addr)| config::ServiceCfg {
                name: (*name).to_owned(),
                vip: *vip,
                port: PORT,
                proto: config::Proto::Tcp,
                mode: self.spec.mode,
                overflow: config::Overflow { spill: config::Spill::Enabled(opts.spill), reject: config::Reject::Rst },
                ring_size: 1009,
                backends: backends
                    .iter()
                    .map(|b| config::BackendCfg {
                        address: addr(b.n),
                        max_conns: b.max_conns,
                        weight: b.weight,
                        drain: false,
                        mac: None,
                        health: Some(health.clone()),
                        safe_share: None,
                    })
                    .collect(),
                labels: Default::default(),
            })
            .collect();
        let mut cfg = config::Config {
            daemon: config::Daemon { pin_dir: self.pin_dir(), control_socket: self.socket(), journal: self.journal(), ..config::Daemon::new("lb0") },
            flows: config::Flows { capacity: 65536, ..config::Flows::default() },
            datapath: config::Datapath::default(),
            services,
            alerts: config::AlertsCfg::default(),
            guard: config::GuardCfg::default(),
            cluster: None,
        };
        edit(&mut cfg);
        format!("# Generated by `sluice lab` for namespace {}.\n{}", self.ns("lb"), config::to_toml(&cfg))
    }

    /// Writes the config file (the daemon reads it at start and on SIGHUP / `config apply`).
    pub fn write_config(&self, text: &str) -> Result<()> {
        std::fs::write(self.config_path(), text).with_context(|| format!("writing {}", self.config_path().display()))
    }

    /// Starts `sluice run --config` in the load balancer's namespace; waits until it serves.
    pub fn start_daemon(&self) -> Result<()> {
        self.start_daemon_with(&self.spec.sluice)
    }

    /// `start_daemon` from another binary (an upgrade).
    pub fn start_daemon_with(&self, sluice: &Path) -> Result<()> {
        self.spawn("daemon", self.command("lb", sluice).arg("run").arg("--config").arg(self.config_path()))?;
        self.wait("the daemon to attach and serve", Duration::from_secs(30), || {
            if let Some(log) = self.exited("daemon") {
                return Err(anyhow::anyhow!("sluice run exited:\n{log}"));
            }
            Ok(self.link_has_xdp("lb", "lb0") && self.socket().exists())
        })
    }

    /// SIGTERM to the daemon (the datapath stays attached; flows continue).
    pub fn stop_daemon(&self) -> bool {
        self.stop("daemon", nix::sys::signal::Signal::SIGTERM)
    }

    /// Polls `f` every 50 ms until true, an error, or `timeout`.
    pub fn wait<R: IntoWaitResult>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> R) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if f().into_wait_result()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tears everything down; returns what was removed.
    pub fn down(&self) -> Vec<String> {
        let keys: Vec<String> = self.children.lock().expect("children").keys().cloned().collect();
        // The daemon first (SIGTERM: it records its stop in the journal), then the rest.
        let mut gone = Vec::new();
        if self.stop_daemon() {
            gone.push("daemon".to_owned());
        }
        for k in keys.iter().filter(|k| *k != "daemon") {
            self.stop(k, nix::sys::signal::Signal::SIGKILL);
            gone.push(k.clone());
        }
        gone.extend(cleanup(&self.spec.prefix, &self.spec.dir));
        gone
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            self.down();
        }
    }
}

/// `bool` or `Result<bool>` from a wait condition.
pub trait IntoWaitResult {
    fn into_wait_result(self) -> Result<bool>;
}
impl IntoWaitResult for bool {
    fn into_wait_result(self) -> Result<bool> {
        Ok(self)
    }
}
impl IntoWaitResult for Result<bool> {
    fn into_wait_result(self) -> Result<bool> {
        self
    }
}
