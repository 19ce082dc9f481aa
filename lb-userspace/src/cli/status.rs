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

pub fn run(args: &Args) -> Result<(), Error> {
    let map = stats::open(&args.pin.pin_dir)?;
    let snap = stats::read(&map)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&snap).expect("serializable"));
        return Ok(());
    }
    println!("{:<16} {:>14} {:>16}", "OUTCOME", "PACKETS", "BYTES");
    for o in &snap.outcomes {
        let mark = if o.malformed && o.packets > 0 { "  (malformed)" } else { "" };
        println!("{:<16} {:>14} {:>16}{mark}", o.outcome, o.packets, o.bytes);
    }
    println!("{:<16} {:>14} {:>16}", "total", snap.total_packets, snap.total_bytes);
    Ok(())
}
