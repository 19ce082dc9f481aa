//! `sluice run`: the daemon (`--config FILE`), or the bare datapath on one interface
//! (`--iface IFACE`, no services: counting only).

use std::path::PathBuf;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::PinDir;
use crate::{
    daemon,
    datapath::{AttachMode, Datapath},
    Error,
};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["config", "iface"])))]
pub struct Args {
    /// Run the daemon with this config file (interface, services, backends, limits…). When it
    /// stops, the datapath keeps forwarding; the next `sluice run` adopts it.
    #[arg(long, conflicts_with_all = ["iface", "xdp_mode"])]
    pub config: Option<PathBuf>,
    /// Attach the bare datapath to this interface, with no services (counting only); it is
    /// detached and its pins removed on SIGINT/SIGTERM.
    #[arg(long)]
    pub iface: Option<String>,
    /// XDP attach mode (with --iface; the config file has `daemon.xdp_mode`).
    #[arg(long, value_enum)]
    pub xdp_mode: Option<AttachMode>,
    #[command(flatten)]
    pub pin: PinDir,
}

pub fn run(args: &Args) -> Result<(), Error> {
    super::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| Error::other("starting the runtime", e))?;
    rt.block_on(async {
        if let Some(cfg) = &args.config {
            let daemon = daemon::Daemon::start(cfg).await?;
            tracing::info!(config = %cfg.display(), "sluice daemon running");
            crate::node::run(&daemon, CancellationToken::new(), true).await?;
            daemon.leave_running()?;
            tracing::info!("stopped; the datapath keeps forwarding and the next `sluice run` adopts it (`sluice detach` removes it)");
            return Ok(());
        }
        let iface = args.iface.as_deref().expect("clap requires --config or --iface");
        // Install the handlers before attaching so a signal during startup is not lost.
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::other("SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::other("SIGINT handler", e))?;
        let dp = Datapath::start(iface, &args.pin.pin_dir, args.xdp_mode.unwrap_or_default())?;
        tracing::info!(iface, pin_dir = %dp.pin_dir().display(), "sluice attached");
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "detaching");
        dp.shutdown();
        tracing::info!("detached, pins removed");
        Ok(())
    })
}
