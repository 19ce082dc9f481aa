//! `sluice completions SHELL` and `sluice man DIR` (hidden): shell completions and man pages,
//! both generated from the real clap definitions ([`super::Cli`] through `CommandFactory`), so
//! they can never describe a command line the binary does not accept. `cargo xtask package`
//! runs both to fill the Debian package.

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

use super::Cli;
use crate::{out, Error};

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Where to write the pages (created if missing).
    pub dir: PathBuf,
}

/// The completion script for `shell`, on stdout. Installed by the package (bash:
/// /usr/share/bash-completion/completions/sluice, zsh: /usr/share/zsh/vendor-completions/_sluice,
/// fish: /usr/share/fish/vendor_completions.d/sluice.fish); by hand e.g.
/// `sluice completions bash > ~/.local/share/bash-completion/completions/sluice`.
pub fn completions(a: &CompletionsArgs) {
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut Cli::command(), "sluice", &mut buf);
    out!("{}", String::from_utf8_lossy(&buf));
}

/// sluice(8)'s own sections after those clap_mangen renders: where things are.
const FILES_SECTION: &str = r".SH FILES
.TP
\fI/etc/sluice/sluice.toml\fR
The daemon's config (\fBsluice config check\fR lints it; \fBsystemctl reload sluice\fR applies it).
.TP
\fI/run/sluice/sluice.sock\fR
The control socket the commands talk to (root only; \fIdaemon.read_socket\fR adds a read\-only one).
.TP
\fI/var/lib/sluice/\fR
The journal (\fBsluice timeline\fR) and the load history (\fBsluice history\fR).
.TP
\fI/sys/fs/bpf/sluice/\fR
The pinned maps of the datapath, which keeps forwarding when the daemon stops (\fBsluice detach\fR removes it).
.TP
\fI/usr/share/sluice/\fR
BIRD, Prometheus, Alertmanager and Grafana files; \fI/usr/share/doc/sluice/RUNBOOK.md\fR says what to do for each alert.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBbpftool\fR(8), \fBbird\fR(8)
";

/// Man pages in section 8 (system administration): `sluice.8`, and one per subcommand, nested
/// ones included (`sluice-backend-set-limit.8`). Returns the files written.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn page(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            page(sub, dir, written)?;
        }
        let top = cmd.get_name() == "sluice";
        // No date: the same sources give the same pages (a reproducible package).
        let man = clap_mangen::Man::new(cmd).section("8").manual("System Manager's Manual");
        let path = dir.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text)?;
        if top {
            text.extend_from_slice(FILES_SECTION.as_bytes());
        }
        std::fs::write(&path, text)?;
        written.push(path);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    // As clap_mangen::generate_to: `help` is no command of its own, and building the command
    // gives each subcommand its display name (`sluice-backend-add`), which names its page.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    page(cmd, dir, &mut written)?;
    Ok(written)
}

pub fn man(a: &ManArgs) -> Result<(), Error> {
    let written = write_man_pages(&a.dir).map_err(|e| Error::other(format!("writing man pages to {}", a.dir.display()), e))?;
    for p in written {
        crate::outln!("{}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_for_the_command_and_each_subcommand() {
        let dir = std::env::temp_dir().join(format!("sluice-man-test-{}", std::process::id()));
        let written = write_man_pages(&dir).expect("man pages");
        let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        for want in ["sluice.8", "sluice-status.8", "sluice-completions.8", "sluice-backend-set-limit.8", "sluice-config-review.8"] {
            assert!(names.iter().any(|n| n == want), "{want} not among {names:?}");
        }
        assert!(!names.iter().any(|n| n == "sluice-man.8" || n.contains("help")), "hidden and help commands get no page: {names:?}");
        let top = std::fs::read_to_string(dir.join("sluice.8")).expect("sluice.8");
        assert!(top.starts_with(".ie") || top.contains(".TH sluice 8"), "{top}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sluice", &mut buf);
            let text = String::from_utf8(buf).expect("utf-8");
            assert!(text.contains("status") && text.contains("set-limit") && text.contains("completions"), "{shell}: {text}");
        }
    }
}
