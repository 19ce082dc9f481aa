//! `sluice run`: load, pin, attach, wait for a signal, detach.

use tokio::signal::unix::{signal, SignalKind};

use super::PinDir;
use crate::{
    datapath::{AttachMode, Datapath},
    Error,
};

#[derive(clap::Args)]
pub struct Args {
    /// Interface to attach the XDP balancer to.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,
    #[command(flatten)]
    pub pin: PinDir,
}

pub fn run(args: &Args) -> Result<(), Error> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::other("starting the runtime", e))?;
    rt.block_on(async {
        // Install the handlers before attaching so a signal during startup is not lost.
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::other("SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::other("SIGINT handler", e))?;
        let dp = Datapath::start(&args.iface, &args.pin.pin_dir, args.xdp_mode)?;
        tracing::info!(iface = %args.iface, pin_dir = %dp.pin_dir().display(), "sluice attached");
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

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
