//! The sending half of a full-feature connection: one task that owns the
//! socket's write half, numbers status (StatSN), stamps ExpCmdSN/MaxCmdSN,
//! and splits SCSI results into Data-In PDUs.
//!
//! Invariants: StatSN advances by one for each status-bearing PDU, in the
//! order they are written; Data-In PDUs are at most the initiator's
//! MaxRecvDataSegmentLength and a sequence (F bit) at most MaxBurstLength;
//! never more data-in than the command's expected transfer length is sent;
//! every socket write has a timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::error::IscsiError;
use crate::pdu::{Bhs, Pdu, RESERVED_TAG, TargetOp};
use crate::scsi::ScsiResponse;
use crate::scsi::sense::STATUS_GOOD;
use crate::wire::{self, WireLimits};

/// Longest a single socket write may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a PDU's StatSN field is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatMode {
    /// Status-bearing: carries the next StatSN, which then advances.
    Advance,
    /// Carries the next StatSN without advancing it (R2T, unsolicited NOP-In).
    Current,
}

/// A residual to report in a SCSI Response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residual {
    pub overflow: bool,
    pub count: u32,
}

/// A finished SCSI command.
pub struct ScsiDone {
    pub itt: u32,
    pub lun: [u8; 8],
    pub resp: ScsiResponse,
    /// The expected data transfer length when the command was a read.
    pub read_edtl: Option<u32>,
    /// A residual decided by the transport (write length mismatch).
    pub residual: Option<Residual>,
}

pub enum Outgoing {
    Pdu(Pdu, StatMode),
    Scsi(Box<ScsiDone>),
    /// Flush and close the connection.
    Close,
}

/// CmdSN window shared by the connection loop (writer of these values) and
/// the writer task (reader).
#[derive(Debug, Default)]
pub struct Window {
    pub exp_cmd_sn: AtomicU32,
    pub max_cmd_sn: AtomicU32,
}

/// Sizes the writer splits data-in by.
#[derive(Debug, Clone, Copy)]
pub struct DataInLimits {
    pub max_segment: u32,
    pub max_burst: u32,
}

pub struct Writer<W> {
    out: BufWriter<W>,
    stat_sn: u32,
    window: Arc<Window>,
    wire: WireLimits,
    data_in: DataInLimits,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(
        w: W,
        stat_sn: u32,
        window: Arc<Window>,
        wire: WireLimits,
        data_in: DataInLimits,
    ) -> Self {
        Writer {
            out: BufWriter::with_capacity(64 * 1024, w),
            stat_sn,
            window,
            wire,
            data_in,
        }
    }

    fn stamp(&mut self, bhs: &mut Bhs, mode: Option<StatMode>) {
        match mode {
            Some(StatMode::Advance) => {
                bhs.set_stat_sn(self.stat_sn);
                self.stat_sn = self.stat_sn.wrapping_add(1);
            }
            Some(StatMode::Current) => bhs.set_stat_sn(self.stat_sn),
            None => {}
        }
        bhs.set_exp_cmd_sn(self.window.exp_cmd_sn.load(Ordering::Acquire));
        bhs.set_max_cmd_sn(self.window.max_cmd_sn.load(Ordering::Acquire));
    }

    async fn put(&mut self, bhs: &Bhs, data: &[u8]) -> Result<(), IscsiError> {
        tokio::time::timeout(
            WRITE_TIMEOUT,
            wire::write_pdu_parts(&mut self.out, bhs, &[], data, &self.wire),
        )
        .await
        .map_err(|_| IscsiError::Timeout("socket write"))??;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), IscsiError> {
        tokio::time::timeout(WRITE_TIMEOUT, self.out.flush())
            .await
            .map_err(|_| IscsiError::Timeout("socket flush"))??;
        Ok(())
    }

    /// Run until the channel closes or `Close` arrives.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Outgoing>) -> Result<(), IscsiError> {
        while let Some(msg) = rx.recv().await {
            match msg {
                Outgoing::Pdu(mut pdu, mode) => {
                    self.stamp(&mut pdu.bhs, Some(mode));
                    self.put(&pdu.bhs, &pdu.data).await?;
                }
                Outgoing::Scsi(done) => self.scsi(*done).await?,
                Outgoing::Close => {
                    self.flush().await?;
                    let _ = self.out.shutdown().await;
                    return Ok(());
                }
            }
            if rx.is_empty() {
                self.flush().await?;
            }
        }
        self.flush().await
    }

    async fn scsi(&mut self, done: ScsiDone) -> Result<(), IscsiError> {
        let ScsiDone {
            itt,
            lun,
            resp,
            read_edtl,
            residual,
        } = done;
        let data: &[u8] = resp.data_in.as_ref().map_or(&[], |d| d.as_slice());
        let edtl = read_edtl.unwrap_or(0) as usize;
        let mut residual = residual;
        if resp.status == STATUS_GOOD && read_edtl.is_some() {
            if data.len() > edtl {
                residual = Some(Residual {
                    overflow: true,
                    count: (data.len() - edtl) as u32,
                });
            } else if data.len() < edtl {
                residual = Some(Residual {
                    overflow: false,
                    count: (edtl - data.len()) as u32,
                });
            }
        }
        let residual_flags = match residual {
            Some(Residual { overflow: true, .. }) => 0x04,
            Some(Residual {
                overflow: false, ..
            }) => 0x02,
            None => 0,
        };
        let residual_count = residual.map_or(0, |r| r.count);
        let total = data.len().min(edtl);
        if resp.status == STATUS_GOOD && total > 0 {
            let seg = self.data_in.max_segment as usize;
            let burst = self.data_in.max_burst as usize;
            let mut off = 0usize;
            let mut burst_off = 0usize;
            let mut data_sn = 0u32;
            while off < total {
                let n = seg.min(total - off).min(burst - burst_off);
                let last = off + n == total;
                let burst_end = burst_off + n == burst;
                let mut b = Bhs::target(TargetOp::DataIn);
                let mut flags = 0;
                if last || burst_end {
                    flags |= 0x80;
                }
                if last {
                    flags |= 0x01 | residual_flags;
                    b.0[3] = resp.status;
                    b.set_u32_at(44, residual_count);
                }
                b.set_flags(flags);
                b.set_lun_bytes(lun);
                b.set_itt(itt);
                b.set_ttt(RESERVED_TAG);
                b.set_u32_at(36, data_sn);
                b.set_u32_at(40, off as u32);
                self.stamp(&mut b, last.then_some(StatMode::Advance));
                self.put(&b, &data[off..off + n]).await?;
                data_sn = data_sn.wrapping_add(1);
                off += n;
                burst_off = if burst_end { 0 } else { burst_off + n };
            }
            return Ok(());
        }
        let mut b = Bhs::target(TargetOp::ScsiResponse);
        b.set_flags(0x80 | residual_flags);
        b.0[2] = 0; // command completed at target
        b.0[3] = resp.status;
        b.set_itt(itt);
        b.set_u32_at(44, residual_count);
        self.stamp(&mut b, Some(StatMode::Advance));
        let mut seg = Vec::new();
        if let Some(sense) = &resp.sense {
            seg.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            seg.extend_from_slice(sense);
        }
        self.put(&b, &seg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::DataIn;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Data-In splitting: segment and burst limits, DataSN, offsets, the
    /// status on the last PDU only.
    #[test]
    fn splits_data_in() {
        let pdus = rt().block_on(async {
            let (a, mut b) = tokio::io::duplex(1 << 20);
            let w = Writer::new(
                a,
                10,
                Arc::new(Window::default()),
                WireLimits::login(1 << 20),
                DataInLimits {
                    max_segment: 1000,
                    max_burst: 2500,
                },
            );
            let (tx, rx) = mpsc::channel(4);
            let task = tokio::spawn(w.run(rx));
            let resp = ScsiResponse::data(vec![7u8; 6000]);
            let done = ScsiDone {
                itt: 5,
                lun: [0; 8],
                resp,
                read_edtl: Some(5000),
                residual: None,
            };
            tx.send(Outgoing::Scsi(Box::new(done))).await.expect("send");
            tx.send(Outgoing::Close).await.expect("send");
            task.await.expect("join").expect("writer");
            let mut v = Vec::new();
            let l = WireLimits::login(1 << 20);
            while let Ok(p) = wire::read_pdu(&mut b, &l).await {
                v.push(p);
            }
            v
        });
        let sizes: Vec<usize> = pdus.iter().map(|p| p.data.len()).collect();
        assert_eq!(sizes, vec![1000, 1000, 500, 1000, 1000, 500]);
        let finals: Vec<bool> = pdus.iter().map(|p| p.bhs.final_bit()).collect();
        assert_eq!(finals, vec![false, false, true, false, false, true]);
        let last = pdus.last().expect("pdus");
        assert_eq!(last.bhs.flags() & 0x05, 0x05, "S and O bits");
        assert_eq!(last.bhs.u32_at(44), 1000, "overflow residual");
        assert_eq!(last.bhs.u32_at(24), 10, "StatSN");
        assert_eq!(pdus[4].bhs.u32_at(36), 4, "DataSN");
        assert_eq!(pdus[4].bhs.u32_at(40), 3500, "offset");
        let _ = DataIn::Bytes(vec![]);
    }
}
