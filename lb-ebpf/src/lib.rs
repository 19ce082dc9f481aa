//! Host-side library target of the eBPF crate. It is empty on purpose: lb-userspace lists this
//! crate as a build-dependency so that edits to the XDP programs rebuild it (the build script also
//! watches the crate's directory). The programs themselves are in `main.rs`.
#![no_std]
