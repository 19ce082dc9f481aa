//! Word-sized packet access at any alignment. Packet headers sit at 2-byte alignment (after a
//! 14-byte Ethernet header), so LLVM's BPF backend turns every multi-byte copy out of a
//! packet into byte loops or calls to a byte-wise `memcpy`/`memmove`. x86 has efficient
//! unaligned access and the verifier allows unaligned packet loads and stores there, so these
//! are spelled as single BPF instructions in assembly, which LLVM cannot split.
//! Callers have bounds-checked the bytes with `ptr_at`.

/// Loads 8 bytes at `p` (any alignment) in memory order.
#[inline(always)]
pub unsafe fn ld64(p: *const u8) -> u64 {
    let r: u64;
    // SAFETY: the caller checked that 8 bytes at `p` are in the packet.
    unsafe { core::arch::asm!("{r} = *(u64 *)({p} + 0)", p = in(reg) p, r = lateout(reg) r, options(nostack, readonly)) };
    r
}

/// Loads 4 bytes at `p` (any alignment) in memory order.
#[inline(always)]
pub unsafe fn ld32(p: *const u8) -> u32 {
    let r: u64;
    // SAFETY: as in ld64.
    unsafe { core::arch::asm!("{r} = *(u32 *)({p} + 0)", p = in(reg) p, r = lateout(reg) r, options(nostack, readonly)) };
    r as u32
}

/// An IPv6 address (16 bytes at `p`) as two words in memory order.
#[inline(always)]
pub unsafe fn ld128(p: *const u8) -> [u64; 2] {
    // SAFETY: as in ld64, for 16 bytes.
    unsafe { [ld64(p), ld64(p.add(8))] }
}

/// An IPv4 address (4 bytes at `p`) in the first 4 bytes of a zeroed 16-byte address.
#[inline(always)]
pub unsafe fn ld_v4_mapped(p: *const u8) -> [u64; 2] {
    // Little-endian: the low 32 bits of the first word are the first 4 bytes in memory.
    // SAFETY: as in ld32.
    [u64::from(unsafe { ld32(p) }), 0]
}

/// Stores a 16-byte address given as words into an 8-aligned `[u8; 16]`.
#[inline(always)]
pub fn set_addr(dst: &mut [u8; 16], words: [u64; 2]) {
    let p = core::ptr::from_mut(dst).cast::<[u64; 2]>();
    // SAFETY: every [u8; 16] address field this is used on is 8-aligned (see `Packet`).
    unsafe { p.write(words) };
}

/// Stores 8 bytes at `p` (any alignment) in memory order.
#[inline(always)]
pub unsafe fn st64(p: *mut u8, v: u64) {
    // SAFETY: the caller checked that 8 bytes at `p` are in the packet (or map value).
    unsafe { core::arch::asm!("*(u64 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v, options(nostack)) };
}

#[inline(always)]
pub unsafe fn st32(p: *mut u8, v: u32) {
    // SAFETY: as in st64.
    unsafe { core::arch::asm!("*(u32 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) u64::from(v), options(nostack)) };
}

#[inline(always)]
pub unsafe fn ld16(p: *const u8) -> u16 {
    let r: u64;
    // SAFETY: as in ld64.
    unsafe { core::arch::asm!("{r} = *(u16 *)({p} + 0)", p = in(reg) p, r = lateout(reg) r, options(nostack, readonly)) };
    r as u16
}

#[inline(always)]
pub unsafe fn st16(p: *mut u8, v: u16) {
    // SAFETY: as in st64.
    unsafe { core::arch::asm!("*(u16 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) u64::from(v), options(nostack)) };
}

/// Copies N bytes from `src` to `dst` with word moves (N is a constant: the loop unrolls).
#[inline(always)]
pub unsafe fn copy<const N: usize>(dst: *mut u8, src: *const u8) {
    let mut i = 0;
    // SAFETY: the caller checked N bytes at both ends.
    unsafe {
        while i + 8 <= N {
            st64(dst.add(i), ld64(src.add(i)));
            i += 8;
        }
        if i + 4 <= N {
            st32(dst.add(i), ld32(src.add(i)));
            i += 4;
        }
        if i + 2 <= N {
            st16(dst.add(i), ld16(src.add(i)));
            i += 2;
        }
        if i < N {
            *dst.add(i) = *src.add(i);
        }
    }
}

/// Zeroes N bytes at `dst` with word stores.
#[inline(always)]
pub unsafe fn zero<const N: usize>(dst: *mut u8) {
    let mut i = 0;
    // SAFETY: the caller owns N bytes at `dst`.
    unsafe {
        while i + 8 <= N {
            st64(dst.add(i), 0);
            i += 8;
        }
        while i < N {
            *dst.add(i) = 0;
            i += 1;
        }
    }
}

/// Swaps the frame's destination and source MAC addresses (send it back where it came from).
#[inline(always)]
pub fn swap_macs(ctx: &aya_ebpf::programs::XdpContext) -> Result<(), ()> {
    let eth: *mut [u8; 12] = crate::parse::ptr_at(ctx, 0)?;
    let e = eth.cast::<u8>();
    // SAFETY: ptr_at checked the 12 bytes.
    unsafe {
        let (d_hi, d_lo) = (ld32(e), ld16(e.add(4)));
        let (s_hi, s_lo) = (ld32(e.add(6)), ld16(e.add(10)));
        st32(e, s_hi);
        st16(e.add(4), s_lo);
        st32(e.add(6), d_hi);
        st16(e.add(10), d_lo);
    }
    Ok(())
}
