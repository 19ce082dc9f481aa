//! `sluice config check FILE`: lint a config file without touching anything.
//! Exit status: 0 clean, 1 warnings only, 2 errors (the file would be refused).

use std::path::PathBuf;

use serde::Serialize;

use crate::config::{self, Finding, Severity};

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
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
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
        Command::Apply { file, dry_run } => return apply(socket, file, *dry_run),
    };
    let findings = match config::load(file) {
        Ok((_, warnings)) => warnings,
        Err(rejected) => rejected.findings,
    };
    let errors = findings.iter().any(|f| f.severity == Severity::Error);
    if *json {
        let report = Report { file, ok: !errors, findings: &findings };
        println!("{}", serde_json::to_string_pretty(&report).expect("serializable"));
    } else {
        for f in &findings {
            println!("{}: {f}", file.display());
        }
        let (e, w) = findings.iter().fold((0, 0), |(e, w), f| match f.severity {
            Severity::Error => (e + 1, w),
            Severity::Warning => (e, w + 1),
        });
        println!("{}: {e} error(s), {w} warning(s){}", file.display(), if errors { "; it would be refused" } else { "" });
    }
    if errors {
        2
    } else {
        i32::from(!findings.is_empty())
    }
}

fn apply(socket: &std::path::Path, file: &std::path::Path, dry_run: bool) -> i32 {
    // The daemon reads the file itself: send an absolute path.
    let path = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
    let body = serde_json::json!({ "path": path, "dry_run": dry_run });
    match crate::client::block_on(crate::client::ok(socket, hyper::Method::POST, "/v1/config/apply", Some(&body))) {
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
