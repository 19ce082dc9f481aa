//! `sluice lab …`: runs `sluice-lab`, the lab's own binary (crate `sluice-lab`), so that this
//! production binary carries no load generator, SYN flooder or fault injector. It is looked for
//! beside this binary, then on `PATH`, and told which `sluice` to run (`SLUICE_BIN`).

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use crate::Error;

#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// What `sluice-lab` takes: up, down, load, incident, chaos, flood, cluster (`sluice lab
    /// --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Replaces this process with `sluice-lab ARGS…`; returns only if it cannot be started.
pub fn run(a: &Args) -> Result<(), Error> {
    let me = std::env::current_exe().map_err(|e| Error::other("finding the sluice binary", e))?;
    let program = me.parent().map(|d| d.join("sluice-lab")).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("sluice-lab"));
    // argv[0] "sluice lab": its usage lines then read as the operator typed them.
    let e = Command::new(&program).arg0("sluice lab").args(&a.args).env("SLUICE_BIN", &me).exec();
    if e.kind() == std::io::ErrorKind::NotFound {
        return Err(Error::other(
            "sluice lab",
            anyhow::anyhow!("the lab is not installed: no `sluice-lab` beside {} or on PATH (build it with `cargo xtask build`, or `cargo build -p sluice-lab`)", me.display()),
        ));
    }
    Err(Error::other(format!("running {}", program.display()), e))
}
