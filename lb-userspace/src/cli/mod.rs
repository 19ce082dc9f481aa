//! The `sluice` command line (clap derive), one module per subcommand.
//!
//! Command output goes through [`out`] (`outln!`): a reader that closes the pipe ends the
//! command quietly. `println!` is refused here, so no command can panic on a closed stdout.
#![deny(clippy::print_stdout)]

mod config;
mod ctl;
mod decap;
mod docs;
mod lab;
pub mod out;
mod run;
mod status;
mod top;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lb_common::DEFAULT_PIN_DIR;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: an XDP layer-4 load balancer whose connection limits are never silent")]
pub struct Cli {
    /// The daemon's control socket. If it refuses this user and a read-only socket
    /// (`daemon.read_socket`) named `sluice-read.sock` is beside it, that one is used: reads
    /// answer as on the root socket, changes are refused.
    #[arg(long, global = true, default_value = "/run/sluice/sluice.sock", env = "SLUICE_SOCKET")]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The daemon (`--config FILE`): load or adopt the XDP balancer, apply the config, serve the
    /// control API; on SIGINT/SIGTERM it stops and the datapath keeps forwarding (`sluice
    /// detach` removes it). With `--iface IFACE` instead: the bare datapath, counting only,
    /// detached and its pins removed on SIGINT/SIGTERM.
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
    /// A service's load history: peaks of open connections and refusals per minute (24 h) and
    /// per hour (30 days), per backend; what the guard judges changes against.
    History(ctl::HistoryArgs),
    /// What happened to the load balancer: config changes, backend states, alerts, restarts.
    Timeline(ctl::TimelineArgs),
    /// Break-glass limits.
    #[command(subcommand)]
    Limit(ctl::LimitCmd),
    /// This node of a cluster: drain (withdraw its VIPs) and undrain.
    #[command(subcommand)]
    Node(ctl::NodeCmd),
    /// The cluster: every node's share of the cluster-wide limits, as etcd holds them.
    #[command(subcommand)]
    Cluster(ctl::ClusterCmd),
    /// Detach the datapath a stopped daemon left running, and remove its pins (drops every flow).
    Detach(PinDir),
    /// On a backend: strip `ipip` encapsulation in XDP (attach until SIGINT/SIGTERM).
    Decap(decap::Args),
    /// A whole deployment in network namespaces: demos, training, the incident replay (runs
    /// `sluice-lab`, beside this binary or on PATH; built from source with `cargo xtask build`,
    /// it is not in the Debian package: a production host needs no load generator).
    Lab(lab::Args),
    /// Work with config files.
    #[command(subcommand)]
    Config(config::Command),
    /// Print a shell completion script: `sluice completions bash > /etc/bash_completion.d/sluice`
    /// (the Debian package installs those for bash, zsh and fish).
    Completions(docs::CompletionsArgs),
    /// (packaging) Write the man pages, sluice.8 and one per subcommand, into a directory.
    #[command(hide = true)]
    Man(docs::ManArgs),
}

/// Where the maps are pinned; every command that touches the datapath takes it.
#[derive(clap::Args, Clone)]
pub struct PinDir {
    /// Directory on a bpf filesystem for the pinned maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "SLUICE_PIN_DIR")]
    pub pin_dir: PathBuf,
}

/// Logs to stderr: coloured only on a terminal and without `NO_COLOR`; under systemd
/// (`JOURNAL_STREAM` set) one plain line per event with a syslog priority prefix (`<4>` for a
/// warning) and no timestamp, which journald adds itself.
pub(crate) fn init_tracing() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = std::io::stderr().is_terminal() && !no_color && !journald;
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if journald { fmt.event_format(Journald).try_init() } else { fmt.try_init() };
}

/// A log line for journald: `<PRIORITY>target: message fields`.
struct Journald;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Journald
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing::Level;
        // sd-daemon(3) priorities: err 3, warning 4, info 6, debug 7.
        let prio = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(w, "<{prio}>{}: ", event.metadata().target())?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
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
        Command::Node(c) => ctl::node(&cli.socket, &c),
        Command::Cluster(c) => ctl::cluster(&cli.socket, &c),
        Command::History(a) => ctl::history(&cli.socket, &a),
        Command::Timeline(a) => ctl::timeline(&a),
        Command::Config(c) => return config::run(&c, &cli.socket),
        Command::Decap(a) => decap::run(&a),
        Command::Lab(a) => lab::run(&a),
        Command::Detach(p) => crate::datapath::detach(&p.pin_dir).map(|()| crate::outln!("detached; pins removed from {}", p.pin_dir.display())),
        Command::Completions(a) => {
            docs::completions(&a);
            Ok(())
        }
        Command::Man(a) => docs::man(&a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            1
        }
    }
}
