//! `sluice status`: the datapath's counters by outcome.

use super::PinDir;
use crate::{outln, stats, Error};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pin: PinDir,
}

/// With a daemon: its services and backends, then the datapath's counters; without one, the
/// pinned counters alone.
pub fn run(args: &Args, socket: &std::path::Path) -> Result<(), Error> {
    if socket.exists() {
        let st = crate::client::block_on(crate::client::Client::new(socket).status())?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&st).expect("json"));
            return Ok(());
        }
        outln!("sluice on {} (config {}), {} flows of {}", st.interface, st.config.display(), st.flows, st.flow_capacity);
        if let Some(c) = &st.cluster {
            outln!("{}", c.line());
        }
        super::ctl::print_services(&st.services);
        if let Some(line) = listeners_line(&st.listeners, st.open_files.as_ref()) {
            outln!("{line}");
        }
        for a in &st.alerts_firing {
            outln!("ALERT {} [{}]: {}", a.alertname, a.severity, a.summary);
            outln!("      {}", a.description);
        }
        for d in &st.last_drift {
            outln!("drift: backend id {} counter {} vs {} flows{}", d.backend_id, d.counter, d.flows, if d.corrected { " (corrected)" } else { "" });
        }
        outln!();
        print_outcomes(&st.outcomes, false);
        return Ok(());
    }
    let map = stats::open(&args.pin.pin_dir)?;
    let snap = stats::read(&map)?;
    print_outcomes(&snap, args.json);
    Ok(())
}

/// One line: each listener's connections of its maximum, what it refused and timed out, and
/// the open files.
fn listeners_line(listeners: &[crate::listen::ListenerReport], files: Option<&crate::openfiles::OpenFiles>) -> Option<String> {
    let parts: Vec<String> = listeners
        .iter()
        .map(|l| {
            let mut extra = Vec::new();
            if l.refused > 0 {
                extra.push(format!("{} refused at the limit", l.refused));
            }
            if l.timed_out > 0 {
                extra.push(format!("{} timed out", l.timed_out));
            }
            if l.accept_errors > 0 {
                extra.push(format!("{} failed accepts", l.accept_errors));
            }
            let extra = if extra.is_empty() { String::new() } else { format!(" ({})", extra.join(", ")) };
            format!("{} {}/{}{extra}", l.name, l.open, l.max_connections)
        })
        .collect();
    if parts.is_empty() && files.is_none() {
        return None;
    }
    let mut line = format!("listeners: {}", parts.join(", "));
    if let Some(f) = files {
        let low = if f.limit < f.needed { format!(", BELOW the {} the config may need", f.needed) } else { String::new() };
        line.push_str(&format!("; open files {} of {}{low}", f.open, f.limit));
    }
    Some(line)
}

fn print_outcomes(snap: &stats::Snapshot, json: bool) {
    if json {
        outln!("{}", serde_json::to_string_pretty(snap).expect("serializable"));
        return;
    }
    outln!("{:<16} {:>14} {:>16}", "OUTCOME", "PACKETS", "BYTES");
    for o in &snap.outcomes {
        let mark = if o.malformed && o.packets > 0 { "  (malformed)" } else { "" };
        outln!("{:<16} {:>14} {:>16}{mark}", o.outcome, o.packets, o.bytes);
    }
    outln!("{:<16} {:>14} {:>16}", "total", snap.total_packets, snap.total_bytes);
}
