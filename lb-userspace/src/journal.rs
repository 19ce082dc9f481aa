//! The event journal: what happened to the load balancer, appended as JSON lines to a file
//! (daemon start/stop/adopt, config changes with their diff, backend state changes, alerts
//! firing and resolved, break-glass limits). Size-capped: past the cap the file is rotated to
//! `FILE.1` (one generation kept). `sluice timeline` renders it as text, JSON, or the markdown
//! "Timeline" section of a postmortem.

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339, UTC.
    pub time: String,
    /// `daemon`, `config`, `backend`, `alert`, `limit`.
    pub kind: String,
    pub summary: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

pub struct Journal {
    path: PathBuf,
    max_bytes: u64,
}

impl Journal {
    pub fn new(path: PathBuf, max_bytes: u64) -> Self {
        Self { path, max_bytes }
    }

    /// The file it appends to (`daemon.journal`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an entry; a journal that cannot be written is logged, never fatal.
    pub fn record(&self, kind: &str, summary: impl Into<String>, details: Vec<String>) {
        let e = Entry { time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(), kind: kind.into(), summary: summary.into(), details };
        if let Err(err) = self.append(&e) {
            tracing::error!(journal = %self.path.display(), "cannot write the journal: {err}");
        }
    }

    fn append(&self, e: &Entry) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        if fs::metadata(&self.path).is_ok_and(|m| m.len() > self.max_bytes) {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            fs::rename(&self.path, old)?;
        }
        let mut f = OpenOptions::new().create(true).append(true).open(&self.path)?;
        let mut line = serde_json::to_string(e).expect("json");
        line.push('\n');
        f.write_all(line.as_bytes())
    }
}

/// Reads entries newer than `since` (from the rotated file too).
pub fn read(path: &Path, since: Duration) -> std::io::Result<Vec<Entry>> {
    let cutoff = SystemTime::now().checked_sub(since).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut rotated = path.to_path_buf().into_os_string();
    rotated.push(".1");
    let mut out = Vec::new();
    for p in [PathBuf::from(rotated), path.to_path_buf()] {
        let Ok(text) = fs::read_to_string(&p) else { continue };
        for line in text.lines() {
            let Ok(e) = serde_json::from_str::<Entry>(line) else { continue };
            if humantime::parse_rfc3339(&e.time).is_ok_and(|t| t >= cutoff) {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// How much of a file's end [`tail`] reads: the last entries, not the whole (up to
/// `daemon.journal_max_bytes`, 10 MiB) file.
const TAIL_BYTES: u64 = 256 * 1024;

/// The last `n` entries, oldest first (from the rotated file too when the current one has
/// fewer), reading at most the last 256 KiB of each file: the status page asks every few
/// seconds. A missing file is no entry.
pub fn tail(path: &Path, n: usize) -> std::io::Result<Vec<Entry>> {
    let mut out = tail_of(path, n)?;
    if out.len() < n {
        let mut rotated = path.to_path_buf().into_os_string();
        rotated.push(".1");
        let mut older = tail_of(Path::new(&rotated), n - out.len())?;
        older.append(&mut out);
        out = older;
    }
    Ok(out)
}

fn tail_of(path: &Path, n: usize) -> std::io::Result<Vec<Entry>> {
    use std::io::{Read as _, Seek as _};
    let mut f = match fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r?,
    };
    let start = f.metadata()?.len().saturating_sub(TAIL_BYTES);
    f.seek(std::io::SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    // Started mid-file: the first line may be the end of one.
    let lines: Vec<&str> = text.lines().skip(usize::from(start > 0)).collect();
    let mut out: Vec<Entry> = lines.iter().rev().filter_map(|l| serde_json::from_str(l).ok()).take(n).collect();
    out.reverse();
    Ok(out)
}

/// The postmortem's "Timeline" section.
pub fn markdown(entries: &[Entry]) -> String {
    let mut s = String::from("## Timeline\n\n");
    for e in entries {
        // "2026-11-24T09:00:03Z" → "2026-11-24 09:00:03 UTC"
        let t = e.time.replace('T', " ").trim_end_matches('Z').to_owned();
        s.push_str(&format!("- **{t} UTC** — {}\n", e.summary));
        for d in &e.details {
            s.push_str(&format!("  - {d}\n"));
        }
    }
    if entries.is_empty() {
        s.push_str("_Nothing recorded in this period._\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_rotate_read_and_render() {
        let dir = std::env::temp_dir().join(format!("sluice-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let j = Journal::new(dir.join("journal.jsonl"), 150);
        j.record("daemon", "Sluice daemon started", vec![]);
        j.record("alert", "FIRING SluiceBackendAtLimit: backend 10.0.0.11 at 100 of 100", vec!["raise max_conns".into()]);
        j.record("config", "config applied", vec!["service \"web\" backend 10.0.0.11: max_conns 100 -> 200".into()]);
        assert!(dir.join("journal.jsonl.1").exists(), "rotated past the cap");
        let all = read(&dir.join("journal.jsonl"), Duration::from_hours(1)).expect("read");
        assert_eq!(all.len(), 3, "both generations read, in order");
        assert_eq!(all[0].summary, "Sluice daemon started");
        let last = tail(&dir.join("journal.jsonl"), 2).expect("tail");
        assert_eq!(last, all[1..], "the last two, oldest first, across the rotation");
        assert_eq!(tail(&dir.join("journal.jsonl"), 10).expect("tail"), all, "no more than there are");
        assert!(tail(&dir.join("nothing.jsonl"), 5).expect("missing file").is_empty());
        let md = markdown(&all);
        assert!(md.starts_with("## Timeline") && md.contains("UTC** — FIRING SluiceBackendAtLimit") && md.contains("  - service \"web\""), "{md}");
        let _ = fs::remove_dir_all(&dir);
    }
}
