//! Framing of PDUs on a byte stream: reading one PDU (BHS, AHS, header
//! digest, data segment, padding, data digest) and writing one.
//!
//! Invariants: nothing is allocated before the lengths are checked against
//! [`WireLimits`] (AHS at most 1020 bytes by construction, data at most the
//! negotiated MaxRecvDataSegmentLength); a digest mismatch or an oversize
//! segment is an error, never a panic; padding is always written as zeros and
//! counted in the data digest.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::pdu::{BHS_LEN, Bhs, Pdu};

/// What the reader accepts and the writer produces on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment accepted from the peer.
    pub max_recv_data_segment_len: u32,
}

impl WireLimits {
    /// Limits during login: no digests, and the login-phase segment cap.
    pub fn login(max_recv: u32) -> Self {
        WireLimits {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_len: max_recv,
        }
    }
}

/// A framing failure; every variant ends the connection (or, for a data
/// digest, rejects the PDU first).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest { bhs: Box<Bhs> },
    #[error("data segment of {len} bytes exceeds the negotiated {max}")]
    DataTooLong { len: usize, max: u32 },
}

/// CRC32C as iSCSI uses it for digests.
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for p in parts {
        d.update(p);
    }
    d.finalize() as u32
}

fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Read one PDU. A clean EOF before the first byte is [`WireError::Closed`].
pub async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &WireLimits,
) -> Result<Pdu, WireError> {
    let mut bhs = Bhs::default();
    // Distinguish a clean close between PDUs from a truncated one.
    let n = r.read(&mut bhs.0).await?;
    if n == 0 {
        return Err(WireError::Closed);
    }
    if n < BHS_LEN {
        r.read_exact(&mut bhs.0[n..]).await?;
    }
    let ahs_len = bhs.total_ahs_len();
    let data_len = bhs.data_segment_len();
    if data_len > limits.max_recv_data_segment_len as usize {
        return Err(WireError::DataTooLong {
            len: data_len,
            max: limits.max_recv_data_segment_len,
        });
    }
    let mut ahs = vec![0u8; ahs_len];
    r.read_exact(&mut ahs).await?;
    if limits.header_digest {
        let want = r.read_u32_le().await?;
        if crc32c(&[&bhs.0, &ahs]) != want {
            return Err(WireError::HeaderDigest);
        }
    }
    let mut data = Bytes::new();
    if data_len > 0 {
        let padded = data_len + pad_len(data_len);
        let mut buf = BytesMut::zeroed(padded);
        r.read_exact(&mut buf).await?;
        if limits.data_digest {
            let want = r.read_u32_le().await?;
            if crc32c(&[&buf]) != want {
                return Err(WireError::DataDigest { bhs: Box::new(bhs) });
            }
        }
        buf.truncate(data_len);
        data = buf.freeze();
    }
    Ok(Pdu { bhs, ahs, data })
}

/// Write one PDU whose data segment is `data` (the `data` field of the PDU
/// is ignored, so large payloads can be passed as slices without a copy).
/// The length fields of the BHS are set here.
pub async fn write_pdu_parts<W: AsyncWrite + Unpin>(
    w: &mut W,
    bhs: &Bhs,
    ahs: &[u8],
    data: &[u8],
    limits: &WireLimits,
) -> std::io::Result<()> {
    let mut bhs = bhs.clone();
    bhs.set_lengths(ahs.len(), data.len());
    let mut head = Vec::with_capacity(BHS_LEN + ahs.len() + 4);
    head.extend_from_slice(&bhs.0);
    head.extend_from_slice(ahs);
    if limits.header_digest {
        let crc = crc32c(&[&bhs.0, ahs]);
        head.extend_from_slice(&crc.to_le_bytes());
    }
    if data.is_empty() {
        return w.write_all(&head).await;
    }
    let pad = [0u8; 4];
    let pad = &pad[..pad_len(data.len())];
    if data.len() <= 8192 {
        head.extend_from_slice(data);
        head.extend_from_slice(pad);
        if limits.data_digest {
            head.extend_from_slice(&crc32c(&[data, pad]).to_le_bytes());
        }
        return w.write_all(&head).await;
    }
    w.write_all(&head).await?;
    w.write_all(data).await?;
    let mut tail = Vec::with_capacity(8);
    tail.extend_from_slice(pad);
    if limits.data_digest {
        tail.extend_from_slice(&crc32c(&[data, pad]).to_le_bytes());
    }
    w.write_all(&tail).await
}

/// Write one PDU with its own data segment.
pub async fn write_pdu<W: AsyncWrite + Unpin>(
    w: &mut W,
    pdu: &Pdu,
    limits: &WireLimits,
) -> std::io::Result<()> {
    write_pdu_parts(w, &pdu.bhs, &pdu.ahs, &pdu.data, limits).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(hd: bool, dd: bool) -> WireLimits {
        WireLimits {
            header_digest: hd,
            data_digest: dd,
            max_recv_data_segment_len: 65536,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[&[0u8; 32]]), 0x8a91_36aa);
    }

    proptest! {
        #[test]
        fn round_trip(op in 0u8..0x3f, data in proptest::collection::vec(any::<u8>(), 0..20000),
                      ahs_words in 0usize..4, hd: bool, dd: bool) {
            let mut bhs = Bhs::default();
            bhs.0[0] = op;
            bhs.set_itt(7);
            let pdu = Pdu { bhs, ahs: vec![0xab; ahs_words * 4], data: Bytes::from(data) };
            let l = limits(hd, dd);
            let out = rt().block_on(async {
                let mut buf = Vec::new();
                write_pdu(&mut buf, &pdu, &l).await.expect("write");
                let len = buf.len();
                prop_assert_eq!(len % 4, 0);
                let mut rd = &buf[..];
                let back = read_pdu(&mut rd, &l).await.expect("read");
                prop_assert!(rd.is_empty());
                Ok(back)
            })?;
            prop_assert_eq!(out.ahs, pdu.ahs);
            prop_assert_eq!(out.data, pdu.data);
            prop_assert_eq!(out.bhs.itt(), 7);
        }

        /// Arbitrary bytes never panic the reader and never make it allocate
        /// past the limit.
        #[test]
        fn hostile_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                      hd: bool, dd: bool) {
            let l = WireLimits { header_digest: hd, data_digest: dd, max_recv_data_segment_len: 512 };
            rt().block_on(async {
                let mut rd = &bytes[..];
                while let Ok(p) = read_pdu(&mut rd, &l).await {
                    assert!(p.data.len() <= 512);
                }
            });
        }

        /// A flipped bit is caught by the digests.
        #[test]
        fn digests_catch_corruption(data in proptest::collection::vec(any::<u8>(), 1..2000),
                                    pos in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let mut bhs = Bhs::default();
            bhs.0[0] = 0x01;
            let pdu = Pdu { bhs, ahs: vec![], data: Bytes::from(data) };
            let l = limits(true, true);
            rt().block_on(async {
                let mut buf = Vec::new();
                write_pdu(&mut buf, &pdu, &l).await.expect("write");
                let i = pos.index(buf.len());
                buf[i] ^= 1 << bit;
                let mut rd = &buf[..];
                if let Ok(p) = read_pdu(&mut rd, &l).await {
                    panic!("corruption at {i} not detected: {p:?}");
                }
            });
        }
    }

    #[test]
    fn oversize_segment_is_refused_before_reading_it() {
        let mut bhs = Bhs::default();
        bhs.set_lengths(0, 1 << 20);
        let l = limits(false, false);
        let r = rt().block_on(async {
            let mut rd = &bhs.0[..];
            read_pdu(&mut rd, &l).await
        });
        assert!(matches!(r, Err(WireError::DataTooLong { .. })));
    }
}
