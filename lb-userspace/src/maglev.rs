//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), built in userspace so the
//! datapath only reads `ring[hash % size]`. Pure functions: the daemon, `explain` and the
//! tests all use the same code, and the same flow hash as the datapath (`lb_common`).
//!
//! Weights: every backend walks its own permutation of the ring; in each round a backend
//! earns `weight` credits and places one entry per `max_weight` credits, so entries are
//! proportional to weight. A backend's permutation depends only on its key (its address),
//! so removing one backend moves little more than its own share of slots, and two nodes with
//! the same backends build the same ring.

use lb_common::{flow_hash, probe_slot, FlowKey, MAX_PROBES, MAX_SPILL};

/// A backend as the ring sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingBackend {
    /// Backend id (slot in `BACKENDS`), what the ring stores. Never 0.
    pub id: u32,
    /// Stable identity that seeds its permutation (e.g. "10.0.0.11").
    pub key: String,
    /// Relative weight; 0 = not in the ring.
    pub weight: u32,
}

/// Whether `n` is prime (ring sizes must be, for the permutations to cover the ring).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= u64::from(n) {
        if u64::from(n) % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    // FNV-1a, then a 64-bit finalizer (splitmix64) for avalanche.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Builds a ring of `size` slots (a prime) holding backend ids; 0 marks an empty slot, which
/// happens only when no backend has weight. Panics if `size` is not prime.
pub fn build(backends: &[RingBackend], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev ring size {size} is not prime");
    let members: Vec<&RingBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    let mut ring = vec![0u32; size as usize];
    if members.is_empty() {
        return ring;
    }
    let m = u64::from(size);
    let perm: Vec<(u64, u64)> = members
        .iter()
        .map(|b| {
            let offset = hash64(0x5ee1_0ff5, b.key.as_bytes()) % m;
            let skip = hash64(0x5ee1_5c1b, b.key.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_w = u64::from(members.iter().map(|b| b.weight).max().unwrap_or(1));
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0u64; members.len()];
    let mut filled = 0u64;
    while filled < m {
        for (i, b) in members.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            while credit[i] >= max_w && filled < m {
                credit[i] -= max_w;
                let (offset, skip) = perm[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if ring[slot] == 0 {
                        ring[slot] = b.id;
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    ring
}

/// The backend the datapath picks first for `key` from `ring` (0 = none): `explain` and the
/// tests predict the datapath with this.
pub fn first_choice(ring: &[u32], key: &FlowKey) -> u32 {
    if ring.is_empty() {
        return 0;
    }
    ring[probe_slot(flow_hash(key), 0, ring.len() as u32) as usize]
}

/// The distinct backends the datapath tries for `key`, in order, with `spill` extra
/// candidates: exactly the datapath's probe sequence (`lb-ebpf/src/admission.rs`).
pub fn candidates(ring: &[u32], key: &FlowKey, spill: u8) -> Vec<u32> {
    let size = ring.len() as u32;
    if size == 0 {
        return Vec::new();
    }
    let hash = flow_hash(key);
    let first = ring[probe_slot(hash, 0, size) as usize];
    if first == 0 {
        return Vec::new();
    }
    let mut out = vec![first];
    let spill = u32::from(spill).min(MAX_SPILL) as usize;
    if spill == 0 {
        return out;
    }
    for i in 1..MAX_PROBES {
        let b = ring[probe_slot(hash, i, size) as usize];
        if b == 0 || out.contains(&b) {
            continue;
        }
        out.push(b);
        if out.len() > spill {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<RingBackend> {
        weights.iter().enumerate().map(|(i, w)| RingBackend { id: i as u32 + 1, key: format!("10.0.1.{}", i + 1), weight: *w }).collect()
    }

    fn shares(ring: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n + 1];
        for id in ring {
            counts[*id as usize] += 1;
        }
        counts[1..].iter().map(|c| *c as f64 / ring.len() as f64).collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(13) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(91));
    }

    #[test]
    fn every_slot_is_filled_and_deterministic() {
        let b = backends(&[1, 1, 1]);
        let ring = build(&b, 65537);
        assert!(ring.iter().all(|id| (1..=3).contains(id)));
        assert_eq!(ring, build(&b, 65537), "same backends, same ring");
        // Order of the backend list does not matter: identity comes from the key.
        let mut rev = b.clone();
        rev.reverse();
        let ring_rev = build(&rev, 65537);
        let differing = ring.iter().zip(&ring_rev).filter(|(a, b)| a != b).count();
        assert!(differing < 65537 / 50, "{differing} slots differ when the list is reordered");
    }

    #[test]
    fn equal_weights_are_balanced_within_1_percent() {
        for n in [2usize, 3, 7, 10, 33] {
            let ring = build(&backends(&vec![1; n]), 65537);
            let want = 1.0 / n as f64;
            for (i, s) in shares(&ring, n).iter().enumerate() {
                assert!((s - want).abs() / want <= 0.01, "n={n} backend {i}: share {s:.5}, want {want:.5}");
            }
        }
    }

    #[test]
    fn weights_are_honoured_within_2_percent() {
        for weights in [vec![1, 2, 3, 4], vec![1, 10], vec![5, 5, 1], vec![100, 1, 1, 1]] {
            let ring = build(&backends(&weights), 65537);
            let total: u32 = weights.iter().sum();
            for (i, s) in shares(&ring, weights.len()).iter().enumerate() {
                let want = f64::from(weights[i]) / f64::from(total);
                assert!((s - want).abs() / want <= 0.02, "weights {weights:?} backend {i}: share {s:.5}, want {want:.5}");
            }
        }
    }

    #[test]
    fn removing_one_of_n_remaps_at_most_1_over_n_plus_1_percent() {
        for n in [3usize, 5, 10, 20] {
            let all = backends(&vec![1; n]);
            let before = build(&all, 65537);
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<RingBackend> = all.iter().filter(|b| b.id != removed as u32 + 1).cloned().collect();
                let after = build(&rest, 65537);
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / 65537.0;
                let bound = 1.0 / n as f64 + 0.01;
                assert!(moved <= bound, "n={n}, removing {removed}: {moved:.4} of slots moved (bound {bound:.4})");
            }
        }
    }

    #[test]
    fn zero_weight_and_empty_rings() {
        assert!(build(&[], 13).iter().all(|id| *id == 0));
        let ring = build(&backends(&[0, 1]), 13);
        assert!(ring.iter().all(|id| *id == 2));
    }

    #[test]
    fn candidates_are_distinct_and_start_with_the_first_choice() {
        let ring = build(&backends(&[1, 1, 1, 1, 1]), 65537);
        for port in 1000..1200u16 {
            let key = FlowKey {
                src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                dst: [10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                sport_be: port.to_be_bytes(),
                dport_be: 80u16.to_be_bytes(),
                proto: 6,
                _pad0: 0,
                _pad1: 0,
            };
            let c = candidates(&ring, &key, 3);
            assert_eq!(c[0], first_choice(&ring, &key));
            // Sorted first: `dedup` only removes adjacent duplicates.
            let mut d = c.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(c.len(), d.len(), "port {port}: a backend twice among {c:?}");
            assert!(c.len() <= 4);
        }
    }
}
