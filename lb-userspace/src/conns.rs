//! The shared open-connection counters (`CONNS`), memory-mapped so userspace changes them with
//! the same atomic instructions the datapath uses. A read-modify-write through the map syscalls
//! would race with CPUs admitting flows and could lose their increments.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use lb_common::Conns;

use crate::Error;

pub struct ConnCounters {
    base: NonNull<AtomicU64>,
    len: usize,
    map_len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for ConnCounters {}
// SAFETY: as above.
unsafe impl Sync for ConnCounters {}

impl ConnCounters {
    /// Maps `CONNS` (an array created with BPF_F_MMAPABLE) read-write.
    pub fn map(data: &MapData) -> Result<Self, Error> {
        let info = data.info().map_err(|e| Error::other("CONNS", e))?;
        let len = info.max_entries() as usize;
        assert_eq!(size_of::<Conns>(), 8, "one u64 per backend");
        let page = 4096;
        let map_len = (len * 8).div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd, shared; the kernel validates the length and flags.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, data.fd().as_fd().as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(Error::other("memory-mapping CONNS", std::io::Error::last_os_error()));
        }
        Ok(Self { base: NonNull::new(p.cast()).expect("mmap returned null"), len, map_len })
    }

    fn slot(&self, id: u32) -> &AtomicU64 {
        assert!((id as usize) < self.len, "backend id {id} out of range");
        // SAFETY: in bounds of the mapping, 8-aligned; only accessed atomically.
        unsafe { &*self.base.as_ptr().add(id as usize) }
    }

    pub fn get(&self, id: u32) -> u64 {
        self.slot(id).load(Ordering::Relaxed)
    }

    /// Gives `n` slots back (GC releasing expired flows). Saturates at 0 rather than wrapping.
    pub fn release(&self, id: u32, n: u64) {
        let _ = self.slot(id).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
    }

    /// Adds a signed correction (reconciliation), atomically with the datapath's changes.
    pub fn correct(&self, id: u32, delta: i64) {
        let s = self.slot(id);
        if delta >= 0 {
            s.fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
        } else {
            let _ = s.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(delta.unsigned_abs())));
        }
    }
}

impl Drop for ConnCounters {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}
