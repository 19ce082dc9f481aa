//! Atomic read-modify-write on map values, as BPF instructions written out in assembly.
//!
//! `bpfel-unknown-none` declares no atomics to Rust, and rustc marks every function
//! `target-cpu=generic` (BPF v1), where LLVM lowers a fetch-add to the old `XADD`, which does
//! not return the previous value, silently. Exact limits need that value, so the fetching
//! forms (BPF v3, kernel ≥ 5.12) are spelled out here.

/// `*p += v`, returning the previous value, atomically across CPUs.
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut v = v;
    // SAFETY: the caller passes a valid, aligned pointer into a map value.
    unsafe {
        core::arch::asm!(
            "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
            p = in(reg) p,
            v = inout(reg) v,
            options(nostack),
        );
    }
    v
}

/// `*p -= v` atomically across CPUs (the previous value is not needed).
#[inline(always)]
pub unsafe fn sub(p: *mut u64, v: u64) {
    // SAFETY: as in fetch_add.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) p,
            v = in(reg) v.wrapping_neg(),
            options(nostack),
        );
    }
}

/// If `*p == old`, `*p = new`; returns the previous value either way, atomically across CPUs
/// (a full barrier, like every BPF atomic with a fetch).
#[inline(always)]
pub unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    // SAFETY: as in fetch_add; BPF's compare-and-swap compares with and returns in r0.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") r0,
            options(nostack),
        );
    }
    r0
}

/// Keeps the compiler from moving memory accesses across this point (LLVM may move plain
/// loads and stores across volatile ones). No instruction: x86 itself keeps loads in order
/// with loads and stores with stores, which is all the flow table's publish/read needs.
#[inline(always)]
pub fn compiler_barrier() {
    // SAFETY: an empty asm block that may touch memory, as far as the compiler knows.
    unsafe { core::arch::asm!("", options(nostack)) };
}
