//! `sluice-lab`: see the library's documentation (`lib.rs`).

fn main() {
    std::process::exit(sluice_lab::cli::main());
}
