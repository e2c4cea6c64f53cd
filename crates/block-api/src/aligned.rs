//! A heap buffer aligned to [`BLOCK_SIZE`](crate::BLOCK_SIZE), so it can go to
//! an `O_DIRECT` file descriptor without a copy.
//!
//! Invariants: the allocation is always a power-of-two multiple of 4096
//! bytes and 4096-aligned; `len` (the bytes in use) may be anything up to
//! the capacity; every byte was initialised when first allocated.
//!
//! Dropped buffers of up to [`POOL_BUF_MAX`] bytes go to a small per-size
//! free list instead of back to the allocator: large allocations are mmap'd
//! by the allocator, and faulting in and zeroing fresh pages for every 1 MiB
//! request cost more than the I/O path itself. The pool holds at most
//! [`POOL_BYTES_MAX`] bytes per size class.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::Mutex;

const ALIGN: usize = crate::BLOCK_SIZE;
/// Largest buffer kept for reuse.
pub const POOL_BUF_MAX: usize = 32 << 20;
/// Bytes kept per size class at most.
pub const POOL_BYTES_MAX: usize = 64 << 20;
/// Size classes: 4 KiB << 0 ..= 4 KiB << 13 (32 MiB).
const CLASSES: usize = 14;

struct FreeList(Vec<NonNull<u8>>);
// SAFETY: the pointers are unowned allocations only the pool hands out.
unsafe impl Send for FreeList {}

static POOL: [Mutex<FreeList>; CLASSES] = [const { Mutex::new(FreeList(Vec::new())) }; CLASSES];

fn class_of(cap: usize) -> usize {
    (cap / ALIGN).trailing_zeros() as usize
}

fn capacity_for(len: usize) -> usize {
    len.div_ceil(ALIGN).max(1).next_power_of_two() * ALIGN
}

fn pool_take(cap: usize) -> Option<NonNull<u8>> {
    if cap > POOL_BUF_MAX {
        return None;
    }
    POOL[class_of(cap)]
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .pop()
}

/// Keep `ptr` for reuse; false when the class is full (caller frees it).
fn pool_give(ptr: NonNull<u8>, cap: usize) -> bool {
    if cap > POOL_BUF_MAX {
        return false;
    }
    let mut l = POOL[class_of(cap)]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if (l.0.len() + 1) * cap > POOL_BYTES_MAX {
        return false;
    }
    l.0.push(ptr);
    true
}

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let (mut b, pooled) = Self::take(len);
        if pooled {
            b.as_mut_slice().fill(0);
        }
        b
    }

    /// A buffer of `len` bytes whose contents are unspecified (zeros, or
    /// bytes this process put in an earlier buffer): for callers that
    /// overwrite all of it, such as a disk read or a socket read, and must
    /// never hand it out when that fails.
    pub fn for_overwrite(len: usize) -> Self {
        Self::take(len).0
    }

    /// A buffer from the pool (true) or freshly zeroed from the allocator.
    fn take(len: usize) -> (Self, bool) {
        let cap = capacity_for(len);
        if let Some(ptr) = pool_take(cap) {
            return (AlignedBuf { ptr, cap, len }, true);
        }
        let layout = Layout::from_size_align(cap, ALIGN).expect("aligned layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        (AlignedBuf { ptr, cap, len }, false)
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::for_overwrite(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the bytes in use. Growing exposes bytes left by earlier use,
    /// zero when the buffer is fresh.
    ///
    /// # Panics
    /// When `len` exceeds the capacity (a programming error).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "AlignedBuf::set_len {len} > capacity {}",
            self.cap
        );
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if pool_give(self.ptr, self.cap) {
            return;
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("aligned layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf(len={}, cap={})", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_block_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "len {len} not aligned");
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len && b.capacity().is_multiple_of(ALIGN));
            assert!(b.iter().all(|&x| x == 0), "len {len} not zeroed");
        }
    }

    #[test]
    fn reused_buffers_are_zeroed_again() {
        for len in [4096, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            b.fill(0xee);
            drop(b);
            let b = AlignedBuf::zeroed(len);
            assert!(
                b.iter().all(|&x| x == 0),
                "a reused {len}-byte buffer kept old bytes"
            );
        }
    }

    #[test]
    fn from_slice_copies_bytes() {
        let b = AlignedBuf::from_slice(b"hello");
        assert_eq!(&b[..], b"hello");
    }
}
