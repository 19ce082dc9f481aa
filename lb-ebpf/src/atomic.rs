//! Atomic read-modify-write on map values. `bpfel-unknown-none` declares no atomic support to
//! Rust, so `core::sync::atomic`'s RMW methods do not exist there; the compiler intrinsics do,
//! and LLVM lowers them to BPF atomic instructions (`BPF_ATOMIC | BPF_FETCH`, cpu v3).

use core::intrinsics::{atomic_xadd, atomic_xchg, atomic_xsub, AtomicOrdering};

/// `*p += v`, returning the previous value, atomically across CPUs.
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: the caller passes a valid, aligned pointer into a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) }
}

/// `*p -= v`, returning the previous value, atomically across CPUs.
#[inline(always)]
pub unsafe fn fetch_sub(p: *mut u64, v: u64) -> u64 {
    // SAFETY: as in fetch_add.
    unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) }
}

/// `*p = v`, returning the previous value, atomically across CPUs.
#[inline(always)]
pub unsafe fn swap(p: *mut u64, v: u64) -> u64 {
    // SAFETY: as in fetch_add.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(p, v) }
}
