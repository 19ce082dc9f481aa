//! Load history: per backend, the peak of open connections and the refusals of every minute of
//! the last 24 h and every hour of the last 30 days. The guard (`guard.rs`) judges a change
//! against it, `sluice config review` and `sluice history` show it.
//!
//! Each backend has two rings of fixed size (no per-slot timestamps: moving on from the last
//! minute written clears the slots skipped), 4 bytes a slot: 8,640 bytes a backend once it has
//! had a connection (none before), so 1,000 busy backends take 8.6 MB in memory and on disk,
//! 10,000 take 86 MB. Saved every
//! [`SAVE_EVERY`] and when the daemon stops, written beside and renamed over the old file; a
//! file that cannot be read is moved aside with a warning (history never stops forwarding).

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

pub const MINUTES: usize = 24 * 60;
pub const HOURS: usize = 30 * 24;
/// How often the history is written to disk (and when the daemon stops).
pub const SAVE_EVERY: Duration = Duration::from_mins(1);
const MAGIC: &[u8; 8] = b"SLUICEH1";

/// One slot: the peak of open connections and the refusals counted in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Slot {
    pub peak: u16,
    pub refused: u16,
}

/// A ring of slots; `last` is the unit (minute or hour since the epoch) of the newest. Its
/// slots are allocated at the first load it records: a backend that never had a connection
/// costs nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ring {
    last: u32,
    len: u32,
    slots: Vec<Slot>,
}

impl Ring {
    fn new(len: usize) -> Self {
        Self { last: 0, len: len as u32, slots: Vec::new() }
    }

    /// Moves on to `unit`, clearing the units skipped; returns its slot.
    fn at(&mut self, unit: u32) -> &mut Slot {
        let len = self.len;
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); len as usize];
            self.last = unit;
        }
        if unit > self.last {
            let gap = (unit - self.last).min(len);
            for u in (unit - gap + 1)..=unit {
                self.slots[(u % len) as usize] = Slot::default();
            }
            self.last = unit;
        }
        // A unit older than the newest (the clock stepped back) counts in the newest.
        let i = (unit.max(self.last.saturating_sub(len - 1)).min(self.last) % len) as usize;
        &mut self.slots[i]
    }

    /// The slots of the last `n` units up to `now` (oldest first), with their unit.
    fn window(&self, now: u32, n: u32) -> impl Iterator<Item = (u32, Slot)> + '_ {
        let len = self.len;
        let n = n.min(len);
        (now.saturating_sub(n - 1)..=now).map(move |u| {
            // A unit newer than `last` was not written; one older than `last - len` is gone.
            let s = if self.slots.is_empty() || u > self.last || u + len <= self.last { Slot::default() } else { self.slots[(u % len) as usize] };
            (u, s)
        })
    }
}

/// One backend's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    minutes: Ring,
    hours: Ring,
    /// The backend's refusal counter when last seen (to count each minute's).
    refused_total: u64,
}

impl Default for Series {
    fn default() -> Self {
        Self { minutes: Ring::new(MINUTES), hours: Ring::new(HOURS), refused_total: 0 }
    }
}

/// A peak and when it was (Unix seconds of its minute or hour).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Peak {
    pub open: u32,
    pub at: u64,
}

impl Series {
    /// Records `open` and the refusal counter `refused_total` seen at `now` (Unix seconds).
    pub fn observe(&mut self, now: u64, open: u64, refused_total: u64) {
        let open = open.min(u64::from(u16::MAX)) as u16;
        let new = refused_total.saturating_sub(self.refused_total);
        // A counter that went back (a fresh datapath) starts over.
        let new = if refused_total < self.refused_total { refused_total } else { new };
        self.refused_total = refused_total;
        if open == 0 && new == 0 && self.minutes.slots.is_empty() {
            return; // nothing yet: no rings
        }
        let add = |s: &mut Slot| {
            s.peak = s.peak.max(open);
            s.refused = s.refused.saturating_add(new.min(u64::from(u16::MAX)) as u16);
        };
        add(self.minutes.at((now / 60) as u32));
        add(self.hours.at((now / 3600) as u32));
    }

    /// The highest peak within `window` before `now`: per minute up to 24 h, per hour beyond.
    pub fn peak(&self, now: u64, window: Duration) -> Peak {
        self.slots(now, window).into_iter().filter(|(_, s)| s.peak > 0).max_by_key(|(at, s)| (s.peak, *at)).map_or(Peak::default(), |(at, s)| Peak { open: u32::from(s.peak), at })
    }

    /// The minutes (up to 24 h) or hours of `window` before `now`: (Unix seconds, slot).
    pub fn slots(&self, now: u64, window: Duration) -> Vec<(u64, Slot)> {
        let (ring, unit) = if window <= Duration::from_secs(MINUTES as u64 * 60) { (&self.minutes, 60) } else { (&self.hours, 3600) };
        let n = window.as_secs().div_ceil(unit).max(1) as u32;
        ring.window((now / unit) as u32, n).map(|(u, s)| (u64::from(u) * unit, s)).collect()
    }
}

/// Every backend's history, by `service/address`.
#[derive(Debug, Default)]
pub struct History {
    pub path: PathBuf,
    /// By `service/address`, in the order first seen; a series is never removed, so its index
    /// is a handle the daemon keeps per backend (no lookup each evaluation).
    series: Vec<(String, Series)>,
    index: HashMap<String, usize>,
    pub saved: Option<std::time::Instant>,
}

/// Writes `bytes` beside `path` and renames the file over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read_u32(r: &mut impl std::io::Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl History {
    /// The history in `path`, or an empty one (a file that cannot be read is moved aside to
    /// `PATH.corrupt` with a warning).
    pub fn load(path: &Path) -> Self {
        let mut h = Self { path: path.to_owned(), ..Self::default() };
        match std::fs::read(path) {
            Ok(bytes) => match Self::decode(&bytes) {
                Ok(series) => {
                    for (k, s) in series {
                        h.insert(k, s);
                    }
                }
                Err(e) => {
                    let aside = path.with_extension("corrupt");
                    tracing::warn!("{}: unreadable load history ({e}); moved aside to {} and starting a new one", path.display(), aside.display());
                    let _ = std::fs::rename(path, &aside);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{}: cannot read the load history ({e}); starting a new one", path.display()),
        }
        h
    }

    fn decode(bytes: &[u8]) -> std::io::Result<Vec<(String, Series)>> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut r = bytes;
        let mut magic = [0; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(bad("not a Sluice load history"));
        }
        let n = read_u32(&mut r)?;
        let mut out = Vec::new();
        for _ in 0..n {
            let len = read_u32(&mut r)? as usize;
            if len > 1024 || len > r.len() {
                return Err(bad("a key too long"));
            }
            let key = String::from_utf8(r[..len].to_vec()).map_err(|_| bad("a key not UTF-8"))?;
            r = &r[len..];
            let mut refused = [0; 8];
            r.read_exact(&mut refused)?;
            let mut s = Series { refused_total: u64::from_le_bytes(refused), ..Series::default() };
            for ring in [&mut s.minutes, &mut s.hours] {
                ring.last = read_u32(&mut r)?;
                let n = read_u32(&mut r)?;
                if n != 0 && n != ring.len {
                    return Err(bad("a ring of another length"));
                }
                for _ in 0..n {
                    let v = read_u32(&mut r)?;
                    ring.slots.push(Slot { peak: (v & 0xffff) as u16, refused: (v >> 16) as u16 });
                }
            }
            out.push((key, s));
        }
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(out)
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.series.len() * (8 + 4 * (MINUTES + HOURS + 4) + 40));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.series.len() as u32).to_le_bytes());
        for (k, s) in &self.series {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&s.refused_total.to_le_bytes());
            for ring in [&s.minutes, &s.hours] {
                out.extend_from_slice(&ring.last.to_le_bytes());
                out.extend_from_slice(&(ring.slots.len() as u32).to_le_bytes());
                for slot in &ring.slots {
                    out.extend_from_slice(&(u32::from(slot.peak) | (u32::from(slot.refused) << 16)).to_le_bytes());
                }
            }
        }
        out
    }

    /// Writes the history beside its file and renames it over (a crash leaves the old one).
    pub fn save(&mut self) -> std::io::Result<()> {
        write_atomically(&self.path, &self.encode())?;
        self.saved = Some(std::time::Instant::now());
        Ok(())
    }

    /// Saves if the last save is older than [`SAVE_EVERY`], on a thread of its own (the caller
    /// holds the daemon's state: only the encoding happens under it); a failure is logged,
    /// never fatal.
    pub fn save_if_due(&mut self) {
        if self.saved.is_some_and(|t| t.elapsed() < SAVE_EVERY) {
            return;
        }
        self.saved = Some(std::time::Instant::now());
        let (bytes, path) = (self.encode(), self.path.clone());
        std::thread::spawn(move || {
            if let Err(e) = write_atomically(&path, &bytes) {
                tracing::warn!("saving the load history to {}: {e}", path.display());
            }
        });
    }

    /// Inserts or replaces the series of `key`; returns its handle.
    pub fn insert(&mut self, key: String, series: Series) -> usize {
        if let Some(&i) = self.index.get(&key) {
            self.series[i].1 = series;
            return i;
        }
        self.series.push((key.clone(), series));
        self.index.insert(key, self.series.len() - 1);
        self.series.len() - 1
    }

    /// The handle of `key`'s series (a new, empty one if it has none).
    pub fn handle(&mut self, key: &str) -> usize {
        match self.index.get(key) {
            Some(&i) => i,
            None => self.insert(key.to_owned(), Series::default()),
        }
    }

    /// Records a sample in the series of `handle` (from [`History::handle`]).
    pub fn observe_at(&mut self, handle: usize, now: u64, open: u64, refused_total: u64) {
        self.series[handle].1.observe(now, open, refused_total);
    }

    #[cfg(test)]
    pub fn observe(&mut self, key: &str, now: u64, open: u64, refused_total: u64) {
        let h = self.handle(key);
        self.observe_at(h, now, open, refused_total);
    }

    pub fn get(&self, key: &str) -> Option<&Series> {
        self.index.get(key).map(|&i| &self.series[i].1)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    pub fn peak(&self, key: &str, now: u64, window: Duration) -> Peak {
        self.get(key).map_or(Peak::default(), |s| s.peak(now, window))
    }

    /// A service's peak load in `window`: per minute (or hour), its backends' peaks summed.
    pub fn service_peak(&self, keys: &[String], now: u64, window: Duration) -> Peak {
        let mut sums: BTreeMap<u64, u32> = BTreeMap::new();
        for k in keys {
            if let Some(s) = self.get(k) {
                for (at, slot) in s.slots(now, window) {
                    *sums.entry(at).or_default() += u32::from(slot.peak);
                }
            }
        }
        sums.into_iter().filter(|(_, v)| *v > 0).max_by_key(|(at, v)| (*v, *at)).map_or(Peak::default(), |(at, open)| Peak { open, at })
    }
}

/// `HH:MM UTC` of a Unix time (today's clock; the date when not within the last day).
pub fn clock(unix: u64, now: u64) -> String {
    let (h, m) = ((unix / 3600) % 24, (unix / 60) % 60);
    if now.saturating_sub(unix) < 86_400 {
        format!("{h:02}:{m:02} UTC")
    } else {
        format!("{} days ago at {h:02}:{m:02} UTC", now.saturating_sub(unix) / 86_400)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_per_minute_and_hour_roll_over_and_survive_a_round_trip() {
        let mut s = Series::default();
        let t0 = 1_700_000_000 / 60 * 60;
        s.observe(t0, 80, 0);
        s.observe(t0 + 10, 191, 5);
        s.observe(t0 + 70, 40, 7);
        assert_eq!(s.peak(t0 + 70, Duration::from_hours(1)), Peak { open: 191, at: t0 });
        assert_eq!(s.slots(t0 + 70, Duration::from_mins(2)).iter().map(|(_, x)| (x.peak, x.refused)).collect::<Vec<_>>(), vec![(191, 5), (40, 2)]);
        // A day and more later, the minutes are gone, the hours are not.
        let later = t0 + 25 * 3600;
        s.observe(later, 3, 7);
        assert_eq!(s.peak(later, Duration::from_hours(24)).open, 3);
        assert_eq!(s.peak(later, Duration::from_hours(720)).open, 191);
        let mut h = History { path: std::env::temp_dir().join(format!("sluice-history-test-{}", std::process::id())), ..History::default() };
        h.insert("web/10.0.0.11".into(), s.clone());
        h.save().expect("save");
        let back = History::load(&h.path);
        assert_eq!(back.get("web/10.0.0.11"), Some(&s));
        // A corrupt file is moved aside; an empty history starts.
        std::fs::write(&h.path, b"SLUICEH1garbage").expect("write");
        assert!(History::load(&h.path).is_empty());
        assert!(h.path.with_extension("corrupt").exists());
        let _ = std::fs::remove_file(h.path.with_extension("corrupt"));
        // The size stated in the module's comment and the README: 8.6 KB a backend with load,
        // next to nothing for one that never had any.
        assert_eq!(h.encode().len() - MAGIC.len() - 4 - "web/10.0.0.11".len(), 8668);
        let mut idle = Series::default();
        idle.observe(t0, 0, 0);
        assert!(idle.minutes.slots.is_empty() && idle.hours.slots.is_empty());
    }

    #[test]
    fn a_service_peak_sums_its_backends_per_minute() {
        let mut h = History::default();
        let t0 = 1_700_000_000 / 60 * 60;
        h.observe("web/a", t0, 50, 0);
        h.observe("web/b", t0, 30, 0);
        h.observe("web/a", t0 + 60, 60, 0);
        h.observe("web/b", t0 + 60, 5, 0);
        let p = h.service_peak(&["web/a".into(), "web/b".into()], t0 + 60, Duration::from_hours(1));
        assert_eq!(p, Peak { open: 80, at: t0 });
    }
}
