//! `sluice config check FILE`: lint a config file without touching anything.
//! Exit status: 0 clean, 1 warnings only, 2 errors (the file would be refused).

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    config::{self, Finding, Severity},
    outln,
};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate a config file: errors and warnings, each naming the key and the reason.
    Check {
        file: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a config file to the running daemon: show the diff, validate, apply atomically.
    Apply {
        file: PathBuf,
        /// Only show what would change, and the guard's verdict.
        #[arg(long)]
        dry_run: bool,
        /// Apply it although the guard refuses it (a change that lowers what a service admits
        /// below its load); journaled as forced.
        #[arg(long)]
        force: bool,
    },
    /// Review the running config against the load: per backend its limit, open connections,
    /// peaks (1 h, 24 h, 30 d), headroom and a suggested max_conns; per service its capacity,
    /// peak load and N-1 margin (its largest backend failed).
    Review {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct Report<'a> {
    file: &'a std::path::Path,
    ok: bool,
    findings: &'a [Finding],
}

pub fn run(cmd: &Command, socket: &std::path::Path) -> i32 {
    let (file, json) = match cmd {
        Command::Check { file, json } => (file, json),
        Command::Apply { file, dry_run, force } => return apply(socket, file, *dry_run, *force),
        Command::Review { json } => return review(socket, *json),
    };
    let findings = match config::load(file) {
        Ok((_, warnings)) => warnings,
        Err(rejected) => rejected.findings,
    };
    let errors = findings.iter().any(|f| f.severity == Severity::Error);
    if *json {
        let report = Report { file, ok: !errors, findings: &findings };
        outln!("{}", serde_json::to_string_pretty(&report).expect("serializable"));
    } else {
        for f in &findings {
            outln!("{}: {f}", file.display());
        }
        let (e, w) = findings.iter().fold((0, 0), |(e, w), f| match f.severity {
            Severity::Error => (e + 1, w),
            Severity::Warning => (e, w + 1),
        });
        outln!("{}: {e} error(s), {w} warning(s){}", file.display(), if errors { "; it would be refused" } else { "" });
    }
    if errors {
        2
    } else {
        i32::from(!findings.is_empty())
    }
}

fn review(socket: &std::path::Path, json: bool) -> i32 {
    let v = match crate::client::block_on(crate::client::Client::new(socket).review()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            return 2;
        }
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return 0;
    }
    outln!("{:<10} {:<18} {:>9} {:>6} {:>8} {:>8} {:>8} {:>9} {:>10}", "SERVICE", "BACKEND", "MAX_CONNS", "OPEN", "PEAK 1H", "PEAK 24H", "PEAK 30D", "HEADROOM", "SUGGESTED");
    let mut flagged = 0;
    for s in &v.services {
        for b in &s.backends {
            flagged += usize::from(!b.flag.is_empty());
            outln!(
                "{:<10} {:<18} {:>9} {:>6} {:>8} {:>8} {:>8} {:>9} {:>10}{}",
                s.name,
                b.address.to_string(),
                b.max_conns,
                b.open,
                b.peak_1h.open,
                b.peak_24h.open,
                b.peak_30d.open,
                b.headroom,
                b.suggested,
                if b.flag.is_empty() { String::new() } else { format!("  {}", b.flag) }
            );
        }
        outln!(
            "  service \"{}\": admits {}, peak load {} (24 h); N-1 (without its largest backend) admits {}: {}",
            s.name,
            s.capacity,
            s.peak_24h.open,
            s.n_minus_1,
            s.n_minus_1_verdict
        );
    }
    outln!("{flagged} backend(s) flagged; suggested max_conns = peak (30 d) × {} rounded up", v.headroom);
    0
}

fn apply(socket: &std::path::Path, file: &std::path::Path, dry_run: bool, force: bool) -> i32 {
    // The daemon reads the file itself: send an absolute path.
    let path = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
    let req = crate::api::ApplyRequest { path: Some(path), toml: None, dry_run, force };
    match crate::client::block_on(crate::client::Client::new(socket).apply(&req)) {
        Ok(v) => {
            super::ctl::print_changes(&v);
            0
        }
        Err(e) => {
            eprintln!("sluice: error: {e}");
            2
        }
    }
}
