//! The `sluice` command line (clap derive), one module per subcommand.

mod config;
mod ctl;
mod decap;
mod lab;
mod run;
mod status;
mod top;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lb_common::DEFAULT_PIN_DIR;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: an XDP layer-4 load balancer whose connection limits are never silent")]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = "/run/sluice/sluice.sock", env = "SLUICE_SOCKET")]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the XDP balancer, pin its maps, attach it to an interface, and run until
    /// SIGINT/SIGTERM (then detach and remove the pins).
    Run(run::Args),
    /// The daemon's services and backends (if it runs) and the datapath's counters.
    Status(status::Args),
    /// Services of the running daemon.
    #[command(subcommand)]
    Service(ctl::ServiceCmd),
    /// Change a backend of the running daemon.
    #[command(subcommand)]
    Backend(ctl::BackendCmd),
    /// Which backend a flow goes to, and whether it would be admitted or refused and why.
    Explain(ctl::ExplainArgs),
    /// Live view: open/limit with a saturation bar, new flows/s, refusals/s, alerts firing.
    Top(top::Args),
    /// Sampled refusal events: time, 5-tuple, service, backend, reason.
    Events(ctl::EventsArgs),
    /// What happened to the load balancer: config changes, backend states, alerts, restarts.
    Timeline(ctl::TimelineArgs),
    /// Break-glass limits.
    #[command(subcommand)]
    Limit(ctl::LimitCmd),
    /// Detach the datapath a stopped daemon left running, and remove its pins (drops every flow).
    Detach(PinDir),
    /// On a backend: strip `ipip` encapsulation in XDP (attach until SIGINT/SIGTERM).
    Decap(decap::Args),
    /// A whole deployment in network namespaces: demos, training, the incident replay.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// Work with config files.
    #[command(subcommand)]
    Config(config::Command),
}

/// Where the maps are pinned; every command that touches the datapath takes it.
#[derive(clap::Args, Clone)]
pub struct PinDir {
    /// Directory on a bpf filesystem for the pinned maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "SLUICE_PIN_DIR")]
    pub pin_dir: PathBuf,
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Run(a) => run::run(&a),
        Command::Status(a) => status::run(&a, &cli.socket),
        Command::Service(c) => ctl::service(&cli.socket, &c),
        Command::Backend(c) => ctl::backend(&cli.socket, &c),
        Command::Explain(a) => ctl::explain(&cli.socket, &a),
        Command::Events(a) => ctl::events(&cli.socket, &a),
        Command::Top(a) => top::run(&cli.socket, &a),
        Command::Limit(c) => ctl::limit(&cli.socket, &c),
        Command::Timeline(a) => ctl::timeline(&a),
        Command::Config(c) => return config::run(&c, &cli.socket),
        Command::Decap(a) => decap::run(&a),
        Command::Lab(c) => lab::run(&c),
        Command::Detach(p) => crate::datapath::detach(&p.pin_dir).map(|()| println!("detached; pins removed from {}", p.pin_dir.display())),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            1
        }
    }
}
