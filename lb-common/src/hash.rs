//! The hashes both sides compute alike: flows, the service filter, ring probes.

use crate::{FlowKey, ServiceKey};

/// The flow hash, the same function in the datapath and in userspace (`explain`, tests):
/// murmur3's finalizer over the 5-tuple's 32-bit words. Cheap in BPF (no loop, no table) and
/// well mixed, so `hash % ring_size` spreads flows evenly.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    #[inline(always)]
    fn mix(h: u32, k: u32) -> u32 {
        let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
        (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
    }
    // The first nine 32-bit words of the key (addresses, then both ports) in native byte
    // order, read as words: `FlowKey` is 8-aligned, and byte-wise assembly of the words
    // costs ~100 BPF instructions per packet (LLVM's BPF backend cannot merge the loads).
    // SAFETY: FlowKey is repr(C, align(8)), 40 bytes without implicit padding; its first 36
    // bytes are src (16), dst (16), sport_be (2), dport_be (2).
    let w = unsafe { core::ptr::from_ref(key).cast::<[u32; 9]>().read() };
    let mut h: u32 = 0x5175_1ce0; // seed
    h = mix(h, w[0]);
    h = mix(h, w[1]);
    h = mix(h, w[2]);
    h = mix(h, w[3]);
    h = mix(h, w[4]);
    h = mix(h, w[5]);
    h = mix(h, w[6]);
    h = mix(h, w[7]);
    h = mix(h, w[8]);
    h = mix(h, u32::from(key.proto));
    // fmix32
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The bit of `SERVICE_FILTER` a `SERVICES` key sets. The filter is a one-hash Bloom filter
/// in front of the `SERVICES` hash map: the daemon sets a key's bit before inserting the key
/// (and never clears one), so a clear bit proves "not a service" with one array load, without
/// the hash map's lookup call. Multiplicative hashing of the key's five 32-bit words.
#[inline(always)]
pub fn service_filter_bit(key: &ServiceKey) -> u32 {
    // SAFETY: ServiceKey is repr(C, align(4)), 20 bytes without implicit padding.
    let w = unsafe { core::ptr::from_ref(key).cast::<[u32; 5]>().read() };
    let x = w[0] ^ w[1].rotate_left(7) ^ w[2].rotate_left(13) ^ w[3].rotate_left(19) ^ w[4].rotate_left(25);
    x.wrapping_mul(0x9E37_79B1) >> 16
}

/// The ring slot of the `i`-th candidate in a flow's probe sequence: the first is
/// `hash % size`; later ones step by an odd stride derived from the hash, so spill candidates
/// differ per flow (a saturated backend's overflow spreads over the others).
#[inline(always)]
pub fn probe_slot(hash: u32, i: u32, ring_size: u32) -> u32 {
    let stride = (hash >> 16) | 1;
    ((u64::from(hash) + u64::from(i) * u64::from(stride)) % u64::from(ring_size)) as u32
}
