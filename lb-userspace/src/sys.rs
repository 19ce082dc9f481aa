//! Map operations aya 0.14 does not expose for hash maps, as raw `bpf(2)` calls:
//! batched lookup (one syscall for many flows) and lookup-and-delete (the value as it was
//! when the element was removed, so GC releases a slot only if the flow still held it).

use std::{io, os::fd::RawFd};

use aya::Pod;

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a properly laid-out bpf_attr prefix; its size is passed along.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Removes `key` and returns its value at that moment (`None` if it was not there).
pub fn lookup_and_delete<K: Pod, V: Pod>(fd: RawFd, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: the kernel filled the value (V is Pod: any bytes are valid).
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads every element of a hash map, `chunk` at a time, calling `f` on each batch.
pub fn for_each_batch<K: Pod, V: Pod>(fd: RawFd, chunk: usize, mut f: impl FnMut(&[K], &[V])) -> io::Result<()> {
    let mut keys: Vec<K> = vec![K::zeroed(); chunk];
    let mut values: Vec<V> = vec![V::zeroed(); chunk];
    // Hash-map batch tokens are u32 bucket indices.
    let mut token: u32 = 0;
    let mut first = true;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { std::ptr::from_ref(&token) as u64 },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        match r {
            Ok(()) => {}
            // ENOENT: the last batch (possibly with elements).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                f(&keys[..n], &values[..n]);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        f(&keys[..n], &values[..n]);
        token = next;
        first = false;
    }
}

/// `Pod` types that can be zero-initialised for buffers.
pub trait Zeroed: Sized {
    fn zeroed() -> Self;
}

impl<T: Pod> Zeroed for T {
    fn zeroed() -> Self {
        // SAFETY: Pod types are valid for any bytes, zeros included.
        unsafe { std::mem::zeroed() }
    }
}
