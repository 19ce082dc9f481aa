//! Errors a `sluice` user can meet. Each renders as one paragraph that says what went wrong
//! and what to do; the verifier's log is attached when the kernel rejects the program.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no network interface named \"{iface}\" in this network namespace. \
         List interfaces with `ip -br link` and pass one with --iface."
    )]
    NoSuchInterface { iface: String },

    #[error(
        "permission denied while {action}: loading and attaching XDP programs and pinning maps \
         needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN). Run sluice as root."
    )]
    Permission { action: &'static str },

    #[error(
        "the kernel's verifier rejected the XDP program {program}: {io_error}. This is a bug in \
         Sluice's datapath or a kernel too old for it; please report it with this log.\n\
         --- verifier log ---\n{verifier_log}"
    )]
    Verifier { program: String, io_error: io::Error, verifier_log: String },

    #[error(
        "{dir} is not on a bpf filesystem, so maps cannot be pinned there. Mount one with \
         `mount -t bpf bpf /sys/fs/bpf` (cargo xtask setup does this) or pass --pin-dir. \
         Started with `ip netns exec`? It remounts /sys for the namespace, hiding the host's \
         bpf filesystem: enter only the network namespace instead, \
         `nsenter --net=/run/netns/NAME sluice …`."
    )]
    NotBpffs { dir: PathBuf },

    #[error(
        "Sluice's datapath is not loaded: no pinned map at {path}. Start it with \
         `sluice run --iface IFACE` (or pass the --pin-dir it was started with)."
    )]
    NotRunning { path: PathBuf },

    #[error(
        "maps are already pinned in {dir}: another `sluice run` is using it, or one was \
         killed without cleaning up. Stop the other instance, or remove the stale pins with \
         `rm -r {dir}`."
    )]
    AlreadyPinned { dir: PathBuf },

    #[error("attaching XDP to {iface} failed: {source}")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("{0}")]
    Config(Rejected),

    #[error(
        "the datapath pinned in {dir} has schema version {found}, this sluice speaks {want}: it \
         cannot adopt it without breaking its flows. Run the matching sluice, or remove it with \
         `sluice detach` (dropping every flow) and start again."
    )]
    Schema { dir: PathBuf, found: u32, want: u32 },

    #[error("{context}: {source}")]
    Other {
        context: String,
        #[source]
        source: anyhow::Error,
    },
}

impl Error {
    pub fn other(context: impl Into<String>, source: impl Into<anyhow::Error>) -> Self {
        Self::Other { context: context.into(), source: source.into() }
    }
}

/// Whether an error chain bottoms out in EPERM/EACCES.
pub(crate) fn is_permission(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// How bad a finding in a config file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    pub severity: Severity,
    /// Key path, e.g. `service[0].backend[1].max_conns` (empty for the whole file).
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.key.is_empty() {
            write!(f, "{sev}: {}", self.message)
        } else {
            write!(f, "{sev}: {}: {}", self.key, self.message)
        }
    }
}

/// Why a config file was refused: its path and every finding (errors first).
#[derive(Debug)]
pub struct Rejected {
    pub file: PathBuf,
    pub findings: Vec<Finding>,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} was refused and nothing of it applied:", self.file.display())?;
        for x in self.findings.iter().filter(|x| x.severity == Severity::Error) {
            write!(f, "\n  {}: {}", self.file.display(), x)?;
        }
        Ok(())
    }
}
