//! `sluice decap --iface IFACE`: on a backend, attach the decapsulator that strips the outer
//! header of `ipip` packets (these kernels have no ipip module), and keep it attached until
//! SIGINT/SIGTERM. Its counters (`decapsulated`, `decap_passthrough`) are pinned like the
//! balancer's, so `sluice status --pin-dir DIR` reads them.

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    datapath::{AttachMode, Datapath, LoadOptions},
    Error,
};

#[derive(clap::Args)]
pub struct Args {
    /// Interface the encapsulated packets arrive on.
    #[arg(long)]
    pub iface: String,
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,
    /// Directory on a bpf filesystem for its pinned counters.
    #[arg(long, default_value = "/sys/fs/bpf/sluice-decap")]
    pub pin_dir: std::path::PathBuf,
}

pub fn run(args: &Args) -> Result<(), Error> {
    super::init_tracing();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::other("starting the runtime", e))?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::other("SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::other("SIGINT handler", e))?;
        let opts = LoadOptions { flow_capacity: 1, ring_slots: 1, ..LoadOptions::default() };
        let dp = Datapath::start_program(&args.iface, &args.pin_dir, args.xdp_mode, &opts, lb_common::PROG_DECAP)?;
        tracing::info!(iface = %args.iface, "sluice decapsulator attached");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        dp.shutdown();
        Ok(())
    })
}
