//! Reading the datapath's counters from the pinned maps (summed over CPUs).

use std::{borrow::Borrow, path::Path};

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{maps, Counter, Stat};
use serde::Serialize;

use crate::error::{is_permission, Error};

/// One outcome's totals.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct OutcomeCount {
    pub outcome: String,
    pub malformed: bool,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters by outcome, in [`Stat`] order, plus totals.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub outcomes: Vec<OutcomeCount>,
    pub total_packets: u64,
    pub total_bytes: u64,
}

impl Snapshot {
    pub fn get(&self, stat: Stat) -> &OutcomeCount {
        &self.outcomes[stat as usize]
    }
}

/// Opens the pinned STATS map in `pin_dir`.
pub fn open(pin_dir: &Path) -> Result<PerCpuArray<MapData, Counter>, Error> {
    let path = pin_dir.join(maps::STATS);
    match path.try_exists() {
        Ok(true) => {}
        Ok(false) => return Err(Error::NotRunning { path }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(Error::Permission { action: "reading the pinned counters" }),
        Err(e) => return Err(Error::other(format!("checking {}", path.display()), e)),
    }
    let data = MapData::from_pin(&path).map_err(|e| {
        if is_permission(&e) {
            Error::Permission { action: "reading the pinned counters" }
        } else {
            Error::other(format!("opening {}", path.display()), e)
        }
    })?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|e| Error::other(format!("{}", path.display()), e))
}

/// Reads and sums every outcome over all CPUs.
pub fn read<T: Borrow<MapData>>(map: &PerCpuArray<T, Counter>) -> Result<Snapshot, Error> {
    let mut outcomes = Vec::with_capacity(Stat::ALL.len());
    for &stat in Stat::ALL {
        let per_cpu = map.get(&(stat as u32), 0).map_err(|e| Error::other(format!("reading counter {}", stat.name()), e))?;
        let (packets, bytes) = per_cpu.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
        outcomes.push(OutcomeCount { outcome: stat.name().to_owned(), malformed: stat.is_malformed(), packets, bytes });
    }
    let total_packets = outcomes.iter().map(|o| o.packets).sum();
    let total_bytes = outcomes.iter().map(|o| o.bytes).sum();
    Ok(Snapshot { outcomes, total_packets, total_bytes })
}
