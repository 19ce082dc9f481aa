//! `sluice status`: the datapath's counters by outcome.

use super::PinDir;
use crate::{stats, Error};

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
        let v = crate::client::block_on(crate::client::ok(socket, hyper::Method::GET, "/v1/status", None))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            return Ok(());
        }
        println!("sluice on {} (config {}), {} flows of {}", v["interface"].as_str().unwrap_or(""), v["config"].as_str().unwrap_or(""), v["flows"], v["flow_capacity"]);
        if let Ok(Some(c)) = serde_json::from_value::<Option<crate::announce::Status>>(v["cluster"].clone()) {
            println!("{}", c.line());
        }
        super::ctl::print_services(&super::ctl::services_of(&v["services"])?);
        for a in v["alerts_firing"].as_array().into_iter().flatten() {
            println!("ALERT {} [{}]: {}", a["alertname"].as_str().unwrap_or(""), a["severity"].as_str().unwrap_or(""), a["summary"].as_str().unwrap_or(""));
            println!("      {}", a["description"].as_str().unwrap_or(""));
        }
        for d in v["last_drift"].as_array().into_iter().flatten() {
            println!(
                "drift: backend id {} counter {} vs {} flows{}",
                d["backend_id"],
                d["counter"],
                d["flows"],
                if d["corrected"].as_bool() == Some(true) { " (corrected)" } else { "" }
            );
        }
        println!();
        print_outcomes(&serde_json::from_value(v["outcomes"].clone()).map_err(|e| Error::other("status", e))?, false);
        return Ok(());
    }
    let map = stats::open(&args.pin.pin_dir)?;
    let snap = stats::read(&map)?;
    print_outcomes(&snap, args.json);
    Ok(())
}

fn print_outcomes(snap: &stats::Snapshot, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(snap).expect("serializable"));
        return;
    }
    println!("{:<16} {:>14} {:>16}", "OUTCOME", "PACKETS", "BYTES");
    for o in &snap.outcomes {
        let mark = if o.malformed && o.packets > 0 { "  (malformed)" } else { "" };
        println!("{:<16} {:>14} {:>16}{mark}", o.outcome, o.packets, o.bytes);
    }
    println!("{:<16} {:>14} {:>16}", "total", snap.total_packets, snap.total_bytes);
}
