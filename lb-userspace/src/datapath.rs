//! Loading the XDP object, attaching it, and pinning its maps under the bpf filesystem.

use std::{
    fs,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::Array,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{flow_table_buckets, maps, Config, FlowCount, DEFAULT_FLOW_CAPACITY, DEFAULT_RING_SLOTS, GLOBAL_CONFIG, PROG_BALANCER, PROG_DECAP};

use crate::error::{is_permission, Error};

/// The XDP object built by `build.rs` (`ebpf_build.rs`) from `lb-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// `statfs` magic number of the bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Choices made when the object is loaded: the datapath's configuration global (the
/// verifier prunes what it turns off) and the capacities of the sized maps.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub config: Config,
    /// Capacity of `FLOWS` (the flow table never evicts; a full table refuses new flows).
    pub flow_capacity: u32,
    /// Capacity of `RINGS` in slots (all services' rings, twice over for swaps).
    pub ring_slots: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { config: Config::DEFAULT, flow_capacity: DEFAULT_FLOW_CAPACITY, ring_slots: DEFAULT_RING_SLOTS }
    }
}

impl LoadOptions {
    /// The configuration global as loaded: `config` with the flow table's capacity and size.
    fn loaded_config(&self) -> Config {
        Config { flow_capacity: self.flow_capacity, flow_buckets: flow_table_buckets(self.flow_capacity), ..self.config }
    }

    /// A loader with the configuration global set and the sized maps sized.
    fn loader<'a>(&self, config: &'a Config) -> EbpfLoader<'a> {
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_CONFIG, config, true)
            .map_max_entries(maps::FLOWS, config.flow_buckets)
            .map_max_entries(maps::FLOW_TAGS, config.flow_buckets)
            .map_max_entries(maps::RINGS, self.ring_slots);
        loader
    }
}

/// Records the flow table's capacity in a freshly created `FLOW_COUNT` (the datapath reads it
/// from the configuration global; userspace and bpftool read it here).
fn write_flow_capacity(ebpf: &mut Ebpf, capacity: u32) -> Result<(), Error> {
    let map = ebpf.map_mut(maps::FLOW_COUNT).ok_or_else(|| Error::other("FLOW_COUNT", anyhow::anyhow!("missing from the object")))?;
    let mut count: Array<&mut aya::maps::MapData, FlowCount> = Array::try_from(map).map_err(|e| Error::other("FLOW_COUNT", e))?;
    count.set(0, FlowCount { live: 0, capacity: u64::from(capacity) }, 0).map_err(|e| Error::other("writing FLOW_COUNT", e))
}

/// Parses the object and loads the balancer program into the kernel, without attaching it.
/// Used by `sluice run` and by the BPF_PROG_TEST_RUN tests.
pub fn load_balancer() -> Result<Ebpf, Error> {
    load_balancer_with(&LoadOptions::default())
}

/// [`load_balancer`] with explicit options.
pub fn load_balancer_with(opts: &LoadOptions) -> Result<Ebpf, Error> {
    load_program(opts, PROG_BALANCER)
}

/// Loads the backend-side decapsulator (`sluice_decap`) from the same object.
pub fn load_decap() -> Result<Ebpf, Error> {
    load_program(&LoadOptions { flow_capacity: 1, ring_slots: 1, ..LoadOptions::default() }, PROG_DECAP)
}

/// Loads the program `name` from the object (the benchmarks load the floor programs).
pub fn load_program(opts: &LoadOptions, name: &str) -> Result<Ebpf, Error> {
    load_program_from(opts, name, OBJECT)
}

/// [`load_program`] from another build's object file (`bench_ab` compares two builds in one
/// run).
pub fn load_program_from(opts: &LoadOptions, name: &str, object: &[u8]) -> Result<Ebpf, Error> {
    let config = opts.loaded_config();
    let mut ebpf = opts.loader(&config).load(object).map_err(|e| match e {
        EbpfError::MapError(ref m) if is_permission(m) => Error::Permission { action: "creating BPF maps" },
        e => Error::other("loading the XDP object", e),
    })?;
    write_flow_capacity(&mut ebpf, opts.flow_capacity)?;
    let prog: &mut Xdp = program(&mut ebpf, name)?;
    prog.load().map_err(|e| load_error(name, e))?;
    Ok(ebpf)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, Error> {
    ebpf.program_mut(name)
        .ok_or_else(|| Error::other(format!("program {name}"), anyhow::anyhow!("missing from the object")))?
        .try_into()
        .map_err(|e: ProgramError| Error::other(format!("program {name}"), e))
}

fn load_error(name: &str, e: ProgramError) -> Error {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            if matches!(io_error.raw_os_error(), Some(libc::EPERM)) && verifier_log.to_string().trim().is_empty() {
                Error::Permission { action: "loading the XDP program" }
            } else {
                Error::Verifier { program: name.into(), io_error, verifier_log: verifier_log.to_string() }
            }
        }
        e if is_permission(&e) => Error::Permission { action: "loading the XDP program" },
        e => Error::other(format!("loading program {name}"), e),
    }
}

/// How to attach: let the kernel choose (native on drivers that support it, e.g. veth),
/// or force generic (skb) or native (driver) mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    #[default]
    Auto,
    Native,
    Generic,
}

impl From<AttachMode> for XdpMode {
    fn from(m: AttachMode) -> Self {
        match m {
            AttachMode::Auto => Self::Default,
            AttachMode::Native => Self::Driver,
            AttachMode::Generic => Self::Skb,
        }
    }
}

/// A loaded, attached and pinned balancer. Dropping it detaches the program (aya drops the
/// link); [`Datapath::shutdown`] also removes the pins.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pinned: Vec<PathBuf>,
}

impl Datapath {
    /// The bare balancer (`sluice run --iface`): default options, pins removed on shutdown.
    pub fn start(iface: &str, pin_dir: &Path, mode: AttachMode) -> Result<Self, Error> {
        Self::start_program(iface, pin_dir, mode, &LoadOptions::default(), PROG_BALANCER)
    }

    /// Loads program `name` (the balancer or the decapsulator), pins, attaches.
    pub fn start_program(iface: &str, pin_dir: &Path, mode: AttachMode, opts: &LoadOptions, name: &str) -> Result<Self, Error> {
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(Error::NoSuchInterface { iface: iface.into() });
        }
        prepare_pin_dir(pin_dir)?;
        let ebpf = load_program(opts, name).inspect_err(|_| {
            let _ = fs::remove_dir(pin_dir);
        })?;
        let mut dp = Self { ebpf, pin_dir: pin_dir.to_owned(), pinned: Vec::new() };
        // Pin before attaching so that every packet the program counts is visible to readers.
        dp.pin_maps()?;
        let attached = program(&mut dp.ebpf, name)?.attach(iface, mode.into());
        match attached {
            Ok(_) => Ok(dp),
            Err(e) => {
                dp.unpin();
                if is_permission(&e) {
                    Err(Error::Permission { action: "attaching XDP" })
                } else {
                    Err(Error::Attach { iface: iface.into(), source: e })
                }
            }
        }
    }

    fn pin_maps(&mut self) -> Result<(), Error> {
        // The interface maps only: not the globals' (.rodata…) or the datapath's scratch space.
        for name in maps::ALL {
            let path = self.pin_dir.join(name);
            let Some(map) = self.ebpf.map(name) else {
                self.unpin();
                return Err(Error::other(format!("map {name}"), anyhow::anyhow!("missing from the object")));
            };
            if let Err(e) = map.pin(&path) {
                self.unpin();
                return Err(Error::other(format!("pinning map {name} at {}", path.display()), e));
            }
            self.pinned.push(path);
        }
        Ok(())
    }

    fn unpin(&mut self) {
        for p in self.pinned.drain(..) {
            let _ = fs::remove_file(&p);
        }
        // Only removes the directory if nothing else lives there.
        let _ = fs::remove_dir(&self.pin_dir);
    }

    /// The daemon's start: adopt the datapath a previous daemon left attached and pinned (same
    /// maps, so no flow and no counter is lost; the program is replaced atomically in the
    /// pinned XDP link), or load, pin and attach a fresh one. Says whether it adopted.
    pub fn start_persistent(iface: &str, pin_dir: &Path, mode: AttachMode, opts: &LoadOptions) -> Result<(Self, Started), Error> {
        let want = nix::net::if_::if_nametoindex(iface).map_err(|_| Error::NoSuchInterface { iface: iface.into() })?;
        let link_path = pin_dir.join(lb_common::PIN_LINK);
        let adopt = link_path.exists();
        if adopt {
            check_pinned(pin_dir, opts)?;
        } else {
            prepare_pin_dir(pin_dir)?;
        }
        let config = opts.loaded_config();
        let mut loader = opts.loader(&config);
        let paths: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, pin_dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| match e {
            EbpfError::MapError(ref m) if is_permission(m) => Error::Permission { action: "creating BPF maps" },
            e => Error::other("loading the XDP object", e),
        })?;
        let prog = program(&mut ebpf, PROG_BALANCER)?;
        prog.load().map_err(|e| load_error(PROG_BALANCER, e))?;
        let mut relinked = None;
        if adopt {
            // The link outlives the daemon, not its interface: a removed namespace, a NIC reset
            // or a rename leaves it detached (ifindex 0) or on another interface. Then keep the
            // maps (flows and counters) and attach a new link to the configured interface.
            match pinned_link_ifindex(&link_path) {
                Ok(on) if on == want => {
                    let pinned = PinnedLink::from_pin(&link_path).map_err(|e| Error::other(format!("opening the pinned link {}", link_path.display()), e))?;
                    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| Error::other("the pinned link is not an XDP link", e))?;
                    prog.attach_to_link(link).map_err(|e| Error::other("replacing the program in the pinned XDP link", e))?;
                }
                Ok(on) => {
                    let was = if on == 0 { "its interface is gone".to_owned() } else { format!("it is attached to interface index {on}, not {iface} (index {want})") };
                    relinked = Some(format!("the pinned XDP link was stale ({was}): attached a new one to {iface}; maps, flows and counters kept"));
                }
                Err(e) => {
                    return Err(Error::other(
                        format!("reading the pinned XDP link {}", link_path.display()),
                        anyhow::anyhow!("{e}; if it is stale, remove it (`rm {}`, the maps stay) and start again", link_path.display()),
                    ))
                }
            }
        }
        if !adopt {
            let schema: Array<&mut aya::maps::MapData, u32> = Array::try_from(ebpf.map_mut(maps::SCHEMA).expect("SCHEMA in the object")).map_err(|e| Error::other("SCHEMA", e))?;
            let mut schema = schema;
            schema.set(0, lb_common::SCHEMA_VERSION, 0).map_err(|e| Error::other("writing SCHEMA", e))?;
            write_flow_capacity(&mut ebpf, opts.flow_capacity)?;
        }
        if !adopt || relinked.is_some() {
            let prog = program(&mut ebpf, PROG_BALANCER)?;
            let id = prog.attach(iface, mode.into()).map_err(|e| {
                if is_permission(&e) {
                    Error::Permission { action: "attaching XDP" }
                } else {
                    Error::Attach { iface: iface.into(), source: e }
                }
            })?;
            let link = prog.take_link(id).map_err(|e| Error::other("taking the XDP link", e))?;
            let fd_link = FdLink::try_from(link)
                .map_err(|e| Error::other("pinning the attachment", anyhow::anyhow!("{e}: the kernel attached XDP without a BPF link, which cannot outlive the daemon")))?;
            // Pinned beside the old one, then renamed over it: a stale link's pin goes (and with
            // it that link) only once the new one is attached and pinned.
            // (bpffs refuses names with a dot.)
            let staged = pin_dir.join(format!("{}_new", lb_common::PIN_LINK));
            let _ = fs::remove_file(&staged);
            fd_link.pin(&staged).map_err(|e| Error::other(format!("pinning the XDP link at {}", staged.display()), e))?;
            fs::rename(&staged, &link_path).map_err(|e| Error::other(format!("moving the XDP link's pin to {}", link_path.display()), e))?;
        }
        let pinned = paths.into_iter().map(|(_, p)| p).chain([link_path]).collect();
        Ok((Self { ebpf, pin_dir: pin_dir.to_owned(), pinned }, Started { adopted: adopt, relinked }))
    }

    /// Leaves the datapath attached and pinned for the next daemon to adopt.
    pub fn leave_running(mut self) {
        self.pinned.clear();
        drop(self);
    }

    /// Detaches the program and removes the pins.
    pub fn shutdown(mut self) {
        self.unpin();
        drop(self.ebpf);
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Takes a map out of the loaded object (the daemon owns the event ring buffer this way).
    pub fn take_map(&mut self, name: &str) -> Option<aya::maps::Map> {
        self.ebpf.take_map(name)
    }

    pub fn tables(&mut self) -> crate::tables::Tables<'_> {
        crate::tables::Tables::new(&mut self.ebpf)
    }

    /// The tables, read only.
    pub fn read(&self) -> crate::tables::TablesRead<'_> {
        crate::tables::TablesRead::new(&self.ebpf)
    }
}

/// How [`Datapath::start_persistent`] found the datapath.
#[derive(Clone, Debug)]
pub struct Started {
    /// The maps were pinned already (flows and counters kept).
    pub adopted: bool,
    /// The pinned link was not on the configured interface and a new one was attached: why.
    pub relinked: Option<String>,
}

/// The interface a pinned XDP link is attached to (0 once its interface is gone). aya 0.14's
/// `LinkInfo` does not expose it, so this asks the kernel directly.
fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags.
    let mut attr = [0u64; 16];
    attr[0] = cpath.as_ptr() as u64;
    // SAFETY: `attr` is a zeroed bpf_attr large enough for the command; the kernel reads the
    // path while the call runs and `cpath` outlives it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose `xdp`
    // member starts with the ifindex (u32) at byte 16.
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32) | ((size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: `info` is writable for `info_len` bytes for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), size_of_val(&attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info[4])
}

/// Refuses pins of another schema, or sized differently from what `opts` asks.
fn check_pinned(pin_dir: &Path, opts: &LoadOptions) -> Result<(), Error> {
    let open = |name: &str| aya::maps::MapData::from_pin(pin_dir.join(name)).map_err(|e| Error::other(format!("opening the pinned {name} in {}", pin_dir.display()), e));
    let schema = Array::<_, u32>::try_from(aya::maps::Map::Array(open(maps::SCHEMA)?)).map_err(|e| Error::other("SCHEMA", e))?;
    let found = schema.get(&0, 0).map_err(|e| Error::other("reading SCHEMA", e))?;
    if found != lb_common::SCHEMA_VERSION {
        return Err(Error::Schema { dir: pin_dir.to_owned(), found, want: lb_common::SCHEMA_VERSION });
    }
    let count = Array::<_, FlowCount>::try_from(aya::maps::Map::Array(open(maps::FLOW_COUNT)?)).map_err(|e| Error::other("FLOW_COUNT", e))?;
    let flows = count.get(&0, 0).map_err(|e| Error::other("reading FLOW_COUNT", e))?.capacity;
    let buckets = open(maps::FLOWS)?.info().map_err(|e| Error::other("FLOWS", e))?.max_entries();
    if flows != u64::from(opts.flow_capacity) || buckets != flow_table_buckets(opts.flow_capacity) {
        return Err(Error::other(
            "adopting the running datapath",
            anyhow::anyhow!(
                "its flow table holds {flows} flows but flows.capacity is {}; a capacity change needs a fresh datapath: `sluice detach` (drops every flow) then start again",
                opts.flow_capacity
            ),
        ));
    }
    Ok(())
}

/// Detaches a datapath left running by a daemon and removes its pins (`sluice detach`).
pub fn detach(pin_dir: &Path) -> Result<(), Error> {
    let link = pin_dir.join(lb_common::PIN_LINK);
    if !link.exists() && !pin_dir.join(maps::STATS).exists() {
        return Err(Error::NotRunning { path: link });
    }
    let _ = fs::remove_file(&link);
    for m in maps::ALL {
        let _ = fs::remove_file(pin_dir.join(m));
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(())
}

fn prepare_pin_dir(dir: &Path) -> Result<(), Error> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match nix::sys::statfs::statfs(parent) {
        Ok(st) if st.filesystem_type().0 == BPF_FS_MAGIC => {}
        Ok(_) | Err(nix::Error::ENOENT) => return Err(Error::NotBpffs { dir: parent.to_owned() }),
        Err(nix::Error::EACCES | nix::Error::EPERM) => return Err(Error::Permission { action: "checking the pin directory" }),
        Err(e) => return Err(Error::other(format!("checking {}", parent.display()), e)),
    }
    if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::AlreadyPinned { dir: dir.to_owned() });
    }
    // 0700: pinned maps are the datapath's state; only root may read or change them.
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            Error::Permission { action: "creating the pin directory" }
        } else {
            Error::other(format!("creating {}", dir.display()), e)
        }
    })
}
