//! Network-namespace topology helpers: namespaces, veth pairs, bridges, addresses, routes,
//! processes and sockets inside a namespace. Every object is owned by a guard whose `Drop`
//! removes it, so a panicking test tears down too. Links live inside the test's own
//! namespaces, so deleting a namespace deletes them; nothing touches the host's interfaces.
//!
//! Namespace names carry the test process's pid (`slc-<pid>-<n>-<label>`); creating a
//! namespace first sweeps `slc-*` namespaces whose process is gone (a test killed by SIGKILL
//! cannot run its destructors).

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::sched::{setns, CloneFlags};

const PREFIX: &str = "slc-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip (install iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new, empty namespace with `lo` up. `label` shows in `ip netns list` (keep it short).
    pub fn new(label: &str) -> Self {
        crate::require_root();
        sweep_stale();
        let name = format!("{PREFIX}{}-{}-{label}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME args…`
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    pub fn addr_add(&self, dev: &str, cidr: &str) {
        let mut args = vec!["addr", "add", cidr, "dev", dev];
        if cidr.contains(':') {
            args.push("nodad"); // usable at once, no duplicate address detection wait
        }
        self.ip(&args);
    }

    pub fn link_up(&self, dev: &str) {
        self.ip(&["link", "set", dev, "up"]);
    }

    pub fn route_add(&self, dst: &str, via: &str) {
        self.ip(&["route", "add", dst, "via", via]);
    }

    /// A bridge named `name` in this namespace, up.
    pub fn bridge(&self, name: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.link_up(name);
    }

    /// A command run inside this namespace. Only the network namespace changes (nsenter
    /// --net), unlike `ip netns exec`, which also remounts /sys and would hide /sys/fs/bpf.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// Spawns a process in this namespace; it is killed when the guard drops. Its output
    /// goes to files (a pipe nobody reads could fill and block it).
    pub fn spawn(&self, cmd: &mut Command) -> ChildGuard {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("sluice-test-{}-{n}", std::process::id()));
        let (out, err) = (base.with_extension("out"), base.with_extension("err"));
        let child = cmd.stdout(File::create(&out).expect("stdout file")).stderr(File::create(&err).expect("stderr file")).spawn().expect("spawning in netns");
        ChildGuard { child: Some(child), out, err }
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let out = Command::new("ip").args(["-n", &self.name, "-br", "link", "show", dev]).output().expect("ip");
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text.split_whitespace().nth(2).unwrap_or_else(|| panic!("no MAC for {dev}: {text}"));
        parse_mac(mac)
    }

    /// `ip -n NAME link show dev` output.
    pub fn link_show(&self, dev: &str) -> String {
        let out = Command::new("ip").args(["-n", &self.name, "link", "show", dev]).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("bad MAC {s}"));
    }
    mac
}

/// A veth pair `a` (in `ns_a`) ↔ `b` (in `ns_b`), both up. Deleted with either namespace.
pub fn veth(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) {
    ip(&["link", "add", a, "netns", ns_a.name(), "type", "veth", "peer", "name", b, "netns", ns_b.name()]);
    ns_a.link_up(a);
    ns_b.link_up(b);
}

/// Deletes `slc-<pid>-…` namespaces whose test process no longer exists.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop unless it was already waited for;
/// its output files are removed then too.
pub struct ChildGuard {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Sends `sig` and waits up to `timeout` for the process to exit; returns its output.
    pub fn signal_and_wait(&mut self, sig: nix::sys::signal::Signal, timeout: Duration) -> Output {
        let pid = nix::unistd::Pid::from_raw(self.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("child");
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "process {} did not exit within {timeout:?} after {sig:?}", self.id());
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = self.child.take().expect("child").wait().expect("wait");
        self.output(status)
    }

    fn output(&self, status: std::process::ExitStatus) -> Output {
        Output { status, stdout: std::fs::read(&self.out).unwrap_or_default(), stderr: std::fs::read(&self.err).unwrap_or_default() }
    }

    /// Whether the process has exited (and then its output, for diagnostics).
    pub fn exited(&mut self) -> Option<Output> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(self.output(status))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
    }
}

/// Sends `frame` as-is out of `dev` through an AF_PACKET socket. Call it inside
/// [`Netns::run`] so `dev` is looked up in that namespace. Lets a test put malformed frames
/// on a real link, which no ordinary socket would send.
pub fn send_raw(dev: &str, frame: &[u8]) {
    let ifindex = nix::net::if_::if_nametoindex(dev).unwrap_or_else(|e| panic!("no interface {dev}: {e}"));
    // SAFETY: plain libc socket calls on a fresh fd with a zeroed, fully initialised sockaddr_ll.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = libc::sendto(fd, frame.as_ptr().cast(), frame.len(), 0, std::ptr::addr_of!(sll).cast(), size_of::<libc::sockaddr_ll>() as u32);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(n, frame.len() as isize, "sending a raw frame on {dev}: {err}");
    }
}
