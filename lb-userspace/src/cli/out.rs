//! Standard output for commands whose output is their result, written so that a reader that
//! goes away (`sluice status | head -5`, `sluice events --follow | grep -m1 …`) ends the
//! command quietly instead of panicking (`println!` panics on EPIPE: "failed printing to
//! stdout: Broken pipe").
//!
//! What a closed stdout does: the rest of the output is dropped, the command finishes what it
//! was doing and exits with its own status (0 for a read that worked; `config check`'s 1 or 2
//! and a failed lab run's 1 still tell the truth); a command that would go on forever (`events
//! --follow`) ends when it sees the reader gone ([`reader_gone`]). Under `set -o pipefail`,
//! `sluice status | head -1` is then a success.
//!
//! Why EPIPE is handled here and SIGPIPE is not reset to its default (what many Rust CLIs do):
//! the same binary is the daemon, and `sluice-lab` drives the daemon's sockets in-process; with
//! SIGPIPE at its default, a write to a socket or a pipe whose peer just went away (a control
//! connection, a webhook, an alert command's stdin, a peer node restarting) would kill the
//! process silently instead of being an error it handles; and a command killed by SIGPIPE
//! exits 141, which fails a `set -o pipefail` script whose `head` had read all it wanted, and
//! hides the status of a check. Only stdout is the reader's to close, so only stdout is
//! treated that way.
//!
//! [`crate::outln!`] for lines, [`crate::out!`] without a newline; the CLI's modules allow no
//! `println!` (`clippy::print_stdout` is denied there), so a new command cannot bring the panic
//! back.

use std::{
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` (and a newline if `newline`) to stdout. Once stdout is closed (EPIPE) the
/// output is dropped; any other write error (a full disk behind a redirection) exits 1 with a
/// message: output that could not be written is never reported as a success.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = try_write(args, newline) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CLOSED.store(true, Ordering::Relaxed);
            return;
        }
        let _ = writeln!(std::io::stderr(), "sluice: error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// Writes to stdout and returns the error: for output that must not end the process (a lab's
/// progress lines while it owns namespaces and daemons to remove).
pub fn try_write(args: std::fmt::Arguments<'_>, newline: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    if newline {
        out.write_all(b"\n")?;
    }
    // Line buffering would hold a last partial line until exit, where its error is lost.
    out.flush()
}

/// Whether stdout's reader is gone: a write failed with EPIPE, or stdout is a pipe whose read
/// end is closed (`poll` reports POLLERR on it), which a command that waits for something to
/// print (`events --follow`) checks without writing.
pub fn reader_gone() -> bool {
    if CLOSED.load(Ordering::Relaxed) {
        return true;
    }
    let mut fd = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&raw mut fd, 1, 0) };
    n > 0 && fd.revents & libc::POLLERR != 0
}

/// `println!` for command output: see the module's documentation.
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::out::write(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::cli::out::write(format_args!($($arg)*), true) };
}

/// `print!` for command output: see the module's documentation.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::out::write(format_args!($($arg)*), false) };
}
