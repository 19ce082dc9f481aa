//! Host-side library target of the eBPF crate. It is empty on purpose: lb-userspace lists this
//! crate as a build-dependency so that edits to the XDP programs rebuild it (aya-build only
//! rebuilds when a dependency changes). The programs themselves are in `main.rs`.
#![no_std]
