//! Internet checksum helpers (RFC 1071 sums, RFC 1624 incremental updates).

/// Adds `bytes` as big-endian 16-bit words to `acc` (even length; callers pass fixed-size
/// header buffers, so the loop unrolls).
#[inline(always)]
pub fn add(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

/// Folds a running sum into the final one's-complement checksum.
#[inline(always)]
pub fn finish(mut acc: u32) -> u16 {
    acc = (acc & 0xFFFF) + (acc >> 16);
    acc = (acc & 0xFFFF) + (acc >> 16);
    !(acc as u16)
}

/// RFC 1624: the checksum after one 16-bit word of the covered data changed `old` → `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    finish(acc)
}
