//! Errors a user meets are one clear paragraph and a non-zero exit, never a stack trace.

use std::{os::unix::fs::DirBuilderExt as _, process::Command};

use sluice_tests::{require_root, sluice_bin};

fn sluice(args: &[&str], as_nobody: bool) -> (i32, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]).arg(sluice_bin());
        c
    } else {
        Command::new(sluice_bin())
    };
    let out = cmd.args(args).output().expect("running sluice");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "sluice panicked: {err}");
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn unknown_interface_is_named() {
    require_root();
    let (code, err) = sluice(&["run", "--iface", "no-such-if0", "--pin-dir", "/sys/fs/bpf/sluice-err-test"], false);
    assert_eq!(code, 1);
    assert!(err.contains("no network interface named \"no-such-if0\""), "{err}");
}

#[test]
fn status_without_a_running_datapath_says_how_to_start_it() {
    require_root();
    let (code, err) = sluice(&["status", "--pin-dir", "/sys/fs/bpf/sluice-not-running"], false);
    assert_eq!(code, 1);
    assert!(err.contains("not loaded") && err.contains("sluice run --iface"), "{err}");
}

#[test]
fn pin_dir_off_bpffs_is_refused() {
    require_root();
    let (code, err) = sluice(&["run", "--iface", "lo", "--pin-dir", "/tmp/sluice-not-bpffs/x"], false);
    assert_eq!(code, 1);
    assert!(err.contains("not on a bpf filesystem"), "{err}");
}

#[test]
fn non_root_gets_a_permission_message() {
    require_root(); // to drop privileges with setpriv
    let (code, err) = sluice(&["run", "--iface", "lo", "--pin-dir", "/sys/fs/bpf/sluice-nobody"], true);
    assert_eq!(code, 1);
    assert!(err.contains("needs root"), "{err}");
    // A running datapath's pin directory is 0700: someone else cannot read it.
    let pins = sluice_tests::PinDir::new();
    std::fs::DirBuilder::new().mode(0o700).create(&pins.0).expect("pin dir");
    let (code, err) = sluice(&["status", "--pin-dir", pins.0.to_str().expect("utf-8")], true);
    assert_eq!(code, 1);
    assert!(err.contains("needs root"), "{err}");
}
