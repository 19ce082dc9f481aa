//! Network namespaces: the primitives every topology here is built from — the lab's
//! (`topo.rs`, named after its prefix and kept until `sluice lab down`), the tests' small
//! deployment (`l2lab.rs`) and the tests' own — and [`Netns`], a namespace owned by a guard.
//!
//! Links live inside the namespaces, so deleting a namespace deletes them; nothing touches the
//! host's interfaces. A command runs in a namespace through `nsenter --net`: `ip netns exec`
//! would also remount /sys and hide /sys/fs/bpf, where the pins are.
//!
//! [`Netns`] names carry the process's pid (`slc-<pid>-<n>-<label>`). Its methods panic on
//! failure: it is for tests, which must fail loudly.
//!
//! Nothing outlives a killed test (SIGKILL runs no destructor), by two means:
//! - every long-running child ([`Netns::spawn`], the lab's `Lab::spawn`) is started by
//!   [`spawn_tied`] with `PR_SET_PDEATHSIG` = SIGKILL, from one thread that lives as long as the
//!   process (the signal fires when the *thread* that forked the child ends, so a child forked
//!   by a short-lived thread — a scoped one, a test's — would die with that thread);
//! - [`sweep_stale`] (run by every [`Netns::new`] and by the tests' labs) finds what a dead
//!   process left: in each `slc-<pid>-…` namespace whose process is gone it kills every process
//!   (those PDEATHSIG does not reach: a child's own children, anything started otherwise),
//!   then deletes the namespace, and removes that pid's pins and temporary files.

use std::{
    collections::BTreeSet,
    fs::File,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sched::{setns, CloneFlags};

const PREFIX: &str = "slc-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Panics unless running as root: BPF and netns tests must run, not skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs / creates network namespaces and needs root; run the \
         suite as root with `cargo xtask test` (it is not skipped: a skipped privileged test \
         would hide a broken datapath)"
    );
}

/// Runs `cmd`; an error carries its stderr.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {}", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        bail!("{} {}: {}", cmd.get_program().to_string_lossy(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `ip args…`.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// `ip -n NS args…`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    ip(&a)
}

/// Creates namespace `ns` with `lo` up.
pub fn add(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])
}

/// A command run in namespace `ns` (only the network namespace changes).
pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
    c
}

/// Runs `f` on a thread that has entered namespace `ns`: sockets it creates live there.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(format!("/run/netns/{ns}")).with_context(|| format!("namespace {ns}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A veth pair `a` (in `ns_a`) ↔ `b` (in `ns_b`), both up, with `mtu` if given.
pub fn veth_pair(ns_a: &str, a: &str, ns_b: &str, b: &str, mtu: Option<u32>) -> Result<()> {
    let mtu = mtu.map(|m| m.to_string());
    let mtu_args: Vec<&str> = mtu.as_deref().map(|m| vec!["mtu", m]).unwrap_or_default();
    let mut args = vec!["link", "add", a];
    args.extend(&mtu_args);
    args.extend(["netns", ns_a, "type", "veth", "peer", "name", b]);
    args.extend(&mtu_args);
    args.extend(["netns", ns_b]);
    ip(&args)?;
    ip_in(ns_a, &["link", "set", a, "up"])?;
    ip_in(ns_b, &["link", "set", b, "up"])
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new, empty namespace with `lo` up. `label` shows in `ip netns list` (keep it short).
    /// First removes what dead test processes left ([`sweep_stale`]).
    pub fn new(label: &str) -> Self {
        require_root();
        sweep_stale();
        let name = format!("{PREFIX}{}-{}-{label}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        add(&name).unwrap_or_else(|e| panic!("{e:#}"));
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME args…`
    pub fn ip(&self, args: &[&str]) {
        ip_in(&self.name, args).unwrap_or_else(|e| panic!("{e:#}"));
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
        command_in(&self.name, program)
    }

    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// Spawns a process in this namespace; it is killed when the guard drops, and when this
    /// process ends however it ends ([`spawn_tied`]). Its output goes to files (a pipe nobody
    /// reads could fill and block it).
    pub fn spawn(&self, cmd: &mut Command) -> ChildGuard {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("sluice-test-{}-{n}", std::process::id()));
        let (out, err) = (base.with_extension("out"), base.with_extension("err"));
        let child = spawn_tied(cmd.stdout(File::create(&out).expect("stdout file")).stderr(File::create(&err).expect("stderr file"))).expect("spawning in netns");
        ChildGuard { child: Some(child), out, err }
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&self.name, f).unwrap_or_else(|e| panic!("{e:#}"))
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
    veth_pair(ns_a.name(), a, ns_b.name(), b, None).unwrap_or_else(|e| panic!("{e:#}"));
}

/// What the tests name after their pid besides namespaces: pin directories under /sys/fs/bpf
/// (`slc-<pid>-…` of the tests' labs, [`crate::PinDir`]'s `sluice-test-<pid>-…`) and entries of
/// the temporary directory ([`Netns::spawn`]'s output files, `l2lab`'s and the tests' labs'
/// directories, the cluster tests' BIRD directories).
const PIN_PREFIXES: &[&str] = &[PREFIX, "sluice-test-"];
const TEMP_PREFIXES: &[&str] = &["sluice-test-", "sluice-lab-test-", "sluice-lab-", "sluice-cluster-"];

/// The pid in `name` if it is `<one of prefixes><pid>` followed by `-`, `.` or nothing.
fn owner_pid(name: &str, prefixes: &[&str]) -> Option<u32> {
    prefixes.iter().find_map(|p| {
        let rest = name.strip_prefix(p)?;
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        (end > 0 && matches!(rest[end..].chars().next(), None | Some('-' | '.'))).then(|| rest[..end].parse().ok())?
    })
}

fn is_dead(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what test processes that no longer exist (killed by SIGKILL, which runs no
/// destructor) left: in each `slc-<pid>-…` namespace of a dead pid, kills every process (and
/// waits, up to 5 s, until none is left), then deletes the namespace; then that pid's pins and
/// temporary files. Namespaces, pins and files of a live process are never touched.
pub fn sweep_stale() {
    let stale: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| owner_pid(n, &[PREFIX]).is_some_and(is_dead))
        .collect();
    if !stale.is_empty() {
        let inodes: BTreeSet<u64> = stale.iter().filter_map(|n| netns_inode(n)).collect();
        kill_all_in(&inodes, Duration::from_secs(5));
        for name in &stale {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    for (dir, prefixes) in [(PathBuf::from("/sys/fs/bpf"), PIN_PREFIXES), (std::env::temp_dir(), TEMP_PREFIXES)] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if owner_pid(&e.file_name().to_string_lossy(), prefixes).is_some_and(is_dead) {
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }
}

/// The inode of namespace `name` (`/run/netns/NAME`): what `/proc/PID/ns/net` of a process
/// inside shows, also once the name is deleted.
pub fn netns_inode(name: &str) -> Option<u64> {
    std::fs::metadata(format!("/run/netns/{name}")).ok().map(|m| m.ino())
}

/// The processes (pid, command name) whose network namespace is one of `inodes` (what
/// `ip netns pids` lists, also for a namespace whose name is gone). Zombies have none.
pub fn processes_in(inodes: &BTreeSet<u64>) -> Vec<(i32, String)> {
    if inodes.is_empty() {
        return Vec::new();
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| inodes.contains(&m.ino())))
        .map(|pid| (pid, std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()))
        .collect()
}

/// SIGKILLs every process in the namespaces `inodes` until none is left or `timeout` passes;
/// returns what was killed.
pub fn kill_all_in(inodes: &BTreeSet<u64>, timeout: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + timeout;
    let mut killed: Vec<(i32, String)> = Vec::new();
    loop {
        let left = processes_in(inodes);
        if left.is_empty() || Instant::now() > deadline {
            return killed;
        }
        for (pid, comm) in left {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            if !killed.iter().any(|(p, _)| *p == pid) {
                killed.push((pid, comm));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A request to the spawner thread: the command, the caller thread's network namespace, where
/// to answer (the command comes back with the child).
struct SpawnRequest {
    cmd: Command,
    net: File,
    reply: mpsc::Sender<(Command, std::io::Result<Child>)>,
}

/// The thread that forks every [`spawn_tied`] child: it runs as long as the process (its
/// channel's sender is a static), so PR_SET_PDEATHSIG fires when the process ends, not before.
fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("sluice-spawner".into())
            .spawn(move || {
                for mut r in rx {
                    // The child starts in the caller's network namespace, as if it had forked it.
                    let child = setns(&r.net, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from).and_then(|()| r.cmd.spawn());
                    let _ = r.reply.send((r.cmd, child));
                }
            })
            .expect("starting the spawner thread");
        tx
    })
}

/// Spawns `cmd` so that its process is SIGKILLed when this process ends, however it ends
/// (SIGKILL included): `PR_SET_PDEATHSIG`, set between fork and exec (it survives the exec of
/// `nsenter` and nsenter's own exec of the program, which do not fork; it does not pass to the
/// program's children, nor survive the exec of a set-uid or file-capability binary: those are
/// [`sweep_stale`]'s). The fork happens on one long-lived thread ([`spawner`]), because the
/// signal fires when the forking *thread* ends: spawned from a test's or a scoped thread, the
/// child would die with that thread.
pub fn spawn_tied(cmd: &mut Command) -> std::io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl and
    // getppid (async-signal-safe) and builds errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent ended between fork and prctl: no signal will come, so do not run.
            if libc::getppid().cast_unsigned() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let net = File::open("/proc/thread-self/ns/net")?;
    let (reply, answer) = mpsc::channel();
    let req = SpawnRequest { cmd: std::mem::replace(cmd, Command::new("")), net, reply };
    spawner().send(req).expect("the spawner thread runs as long as the process");
    let (back, child) = answer.recv().expect("the spawner thread answers");
    *cmd = back;
    child
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
