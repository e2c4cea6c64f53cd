//! Reading and damaging the bytes of a node's disk files directly, for
//! tests of checksums, read repair and scrub.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Calls `each` with the offset and bytes of every 4 KiB block of `path`.
fn scan(path: &Path, mut each: impl FnMut(u64, &[u8])) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf);
        for (k, b) in buf[..n].chunks_exact(4096).enumerate() {
            each(at + k as u64 * 4096, b);
        }
        if n < buf.len() {
            return;
        }
        at += n as u64;
    }
}

/// Offsets in `path` of the 4 KiB blocks that hold exactly `block`.
pub fn find_block(path: &Path, block: &[u8]) -> Vec<u64> {
    let mut hits = Vec::new();
    scan(path, |at, b| {
        if b == block {
            hits.push(at);
        }
    });
    hits
}

/// Offsets in `path` of the 4 KiB blocks that start with `prefix`, with
/// the little-endian u64 that follows it (one pass over the file).
pub fn find_tagged_blocks(path: &Path, prefix: &[u8]) -> Vec<(u64, u64)> {
    let mut hits = Vec::new();
    scan(path, |at, b| {
        if let Some(tag) = b.strip_prefix(prefix).and_then(|t| t.get(..8)) {
            let tag = u64::from_le_bytes(tag.try_into().unwrap_or_default());
            hits.push((at, tag));
        }
    });
    hits
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

/// The 4 KiB at `offset` of `path` as on disk (not from the page cache).
pub fn read_block(path: &Path, offset: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("open disk");
    // SAFETY: plain advice on our own descriptor.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            offset as i64,
            4096,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut b = vec![0u8; 4096];
    f.read_exact(&mut b).expect("read block");
    b
}

/// Flips bit 4 of the byte at `offset` of `path`, durably.
pub fn flip_byte(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open disk");
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.read_exact(&mut b).expect("read byte");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&[b[0] ^ 0x10]).expect("flip");
    f.sync_all().expect("fsync");
}
