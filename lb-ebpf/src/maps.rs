//! The balancer's maps. Each is BTF-described (`#[btf_map]`) so `bpftool map dump` prints
//! field names. Names are the constants in `lb_common::maps`.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use lb_common::{Counter, Stat};

/// Packets and bytes by outcome, per CPU (no atomics on the hot path).
/// Writer: datapath. Reader: `sluice status`, the daemon (sums over CPUs).
#[btf_map]
static STATS: PerCpuArray<Counter, { Stat::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(stat: Stat, bytes: u64) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the per-CPU slot is only touched by this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
