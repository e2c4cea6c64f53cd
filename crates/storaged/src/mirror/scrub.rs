//! Scrub of a mirrored slab, one range at a time: every current copy's
//! data is read back against its own per-block checksums, and the copies'
//! checksums are compared with each other. A block that fails its checksum
//! is rewritten from a copy whose block is good; copies that hold
//! different data are made equal to the first readable copy (this node's
//! when it holds one), as `reconcile` does after an unclean stop.
//!
//! The caller pauses the volume's I/O around each range, so no client
//! write lands between the comparison and the repair.

use super::{EPOCH_RETRIES, MirrorVolume, Outcome, SlabView, io};
use block_api::BlockError;
use replication::{Request, Response};

/// What the scrub of one range found and did, in 4 KiB blocks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Findings {
    /// Blocks whose data failed its checksum on some copy.
    pub bad: u64,
    /// Blocks where readable copies held different data.
    pub mismatched: u64,
    /// Bad or mismatched blocks rewritten from a good copy.
    pub repaired: u64,
    /// Bad blocks with no good copy to repair them from.
    pub unrepaired: u64,
}

impl MirrorVolume {
    /// Scrubs `[offset, offset + len)` of a slab (block aligned, at most
    /// one read's length).
    pub async fn scrub_range(
        &self,
        slab: u64,
        offset: u64,
        len: u64,
    ) -> Result<Findings, BlockError> {
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            let Some(s) = self.slab_view(&view, slab) else {
                return Ok(Findings::default());
            };
            match self.scrub_at(&s, slab, offset, len).await? {
                Some(f) => return Ok(f),
                None => self.newer_than(s.epoch, slab).await,
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch during the scrub",
            self.name
        )))
    }

    /// One attempt at one epoch; `None` when the slab changed epoch.
    async fn scrub_at(
        &self,
        s: &SlabView,
        slab: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Findings>, BlockError> {
        let bs = block_api::BLOCK_SIZE as u64;
        let epoch = s.epoch;
        let order = self.read_order(s);
        let mut f = Findings::default();
        // 1. Each copy's data against its own checksums.
        let mut readable = Vec::new();
        let mut bad = Vec::new();
        for r in &order {
            match self.call(r, self.read_req(slab, epoch, offset, len)).await {
                Outcome::Done(Response::Data(_)) => readable.push(r.clone()),
                Outcome::BadData(_) => bad.push(r.clone()),
                Outcome::Stale => return Ok(None),
                Outcome::Done(_) => return Err(io("scrub: unexpected reply to a read")),
                Outcome::Failed(m) => {
                    return Err(io(format!("scrub: copy on node {}: {m}", r.node)));
                }
            }
        }
        for b in &bad {
            // Find the bad blocks one by one and rewrite each from a copy
            // that reads it well.
            for k in 0..len / bs {
                let at = offset + k * bs;
                match self.call(b, self.read_req(slab, epoch, at, bs)).await {
                    Outcome::BadData(_) => {}
                    Outcome::Stale => return Ok(None),
                    _ => continue,
                }
                f.bad += 1;
                let mut fixed = false;
                for g in &readable {
                    let Outcome::Done(Response::Data(good)) =
                        self.call(g, self.read_req(slab, epoch, at, bs)).await
                    else {
                        continue;
                    };
                    let w = Request::Write {
                        volume: self.id,
                        slab,
                        epoch,
                        offset: at,
                        data: good,
                        fua: true,
                    };
                    if let Outcome::Done(_) = self.call(b, w).await {
                        fixed = true;
                        break;
                    }
                }
                if fixed {
                    f.repaired += 1;
                    tracing::warn!(volume = %self.name, slab, node = b.node, offset = at, "scrub: bad block rewritten from a good copy");
                } else {
                    f.unrepaired += 1;
                    tracing::error!(volume = %self.name, slab, node = b.node, offset = at, "scrub: bad block and no good copy of it");
                }
            }
        }
        if f.unrepaired > 0 {
            // Comparing copies needs every block readable somewhere.
            return Ok(Some(f));
        }
        // 2. The copies against each other (all readable now).
        let blocks = (len / bs) as u32;
        let mut sums = Vec::new();
        for r in &order {
            sums.push(
                self.checksums(r, slab, epoch, offset, blocks, "scrub")
                    .await?,
            );
        }
        let (Some(src), Some(base)) = (order.first(), sums.first()) else {
            return Ok(Some(f));
        };
        for (r, theirs) in order.iter().zip(&sums).skip(1) {
            let n = self
                .copy_differing(src, base, r, theirs, slab, epoch, offset)
                .await?;
            if n > 0 {
                tracing::warn!(volume = %self.name, slab, node = r.node, offset, blocks = n, from = src.node, "scrub: copies differed; rewritten from the first copy");
            }
            f.mismatched += n;
            f.repaired += n;
        }
        Ok(Some(f))
    }

    fn read_req(&self, slab: u64, epoch: u64, offset: u64, len: u64) -> Request {
        Request::Read {
            volume: self.id,
            slab,
            epoch,
            offset,
            len: len as u32,
        }
    }
}
