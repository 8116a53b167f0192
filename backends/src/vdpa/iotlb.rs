//! IOTLB messages to the kernel: mapping regions in an address space,
//! batching (IOTLB_BATCH), and replaying every mapping after a reset
//! without IOTLB_PERSIST.

use super::cvq::CVQ_MEM_SIZE;
use super::dma::{invalidate_msg, update_msg};
use super::sys::{backend_bits, IotlbKind, IotlbMsg};
use super::{ctx, VdpaNet, LOG};
use crate::{DmaRegion, Result};

impl VdpaNet {
    /// Maps several regions in one IOTLB batch: all or nothing.
    pub fn dma_map_all(&mut self, regions: Vec<DmaRegion>) -> Result<()> {
        if regions.is_empty() {
            return Ok(());
        }
        for (i, r) in regions.iter().enumerate() {
            self.dma.check_new(r, self.range, &regions[..i])?;
        }
        self.map_regions(0, &regions)?;
        for r in regions {
            self.dma.insert(r);
        }
        Ok(())
    }

    /// After a reset without IOTLB_PERSIST the parent driver may have
    /// dropped its translations while the kernel still lists them: remove
    /// and re-add every mapping. The control queue page is re-mapped when
    /// the queue starts again.
    pub(super) fn replay_mappings(&mut self) -> Result<()> {
        if let Some(asid) = self.cvq.as_ref().and_then(|c| c.mapped_asid) {
            let msg = [invalidate_msg(
                asid,
                self.cvq_iova_or_zero(),
                CVQ_MEM_SIZE as u64,
            )];
            self.send_iotlb(asid, &msg).1?;
            if let Some(c) = self.cvq.as_mut() {
                c.mapped_asid = None;
            }
        }
        let regions: Vec<DmaRegion> = self.dma.regions().cloned().collect();
        if regions.is_empty() {
            return Ok(());
        }
        let inval: Vec<IotlbMsg> = regions
            .iter()
            .map(|r| invalidate_msg(0, r.iova, r.size()))
            .collect();
        self.send_iotlb(0, &inval).1?;
        self.map_regions(0, &regions)
    }

    /// Sends `msgs` in `asid`, inside one batch when the device takes
    /// batches. Returns how many of `msgs` the kernel accepted and the
    /// first error (a failed BATCH_END included).
    pub(super) fn send_iotlb(&self, asid: u32, msgs: &[IotlbMsg]) -> (usize, Result<()>) {
        let batch = self.has_backend(backend_bits::IOTLB_BATCH);
        if batch {
            if let Err(e) = self
                .dev
                .send_iotlb(&IotlbMsg::batch(IotlbKind::BatchBegin, asid))
            {
                return (0, Err(ctx("IOTLB BATCH_BEGIN")(e)));
            }
        }
        let mut sent = 0;
        let mut res = Ok(());
        for m in msgs {
            let op = match m.kind {
                IotlbKind::Update => "IOTLB UPDATE",
                _ => "IOTLB INVALIDATE",
            };
            if let Err(e) = self.dev.send_iotlb(m) {
                res = Err(ctx(op)(e));
                break;
            }
            // One line per mapping change: rare (memory tables, shadow
            // areas), and what an operator compares with the device's view.
            log::info!(
                target: LOG,
                "{op} asid {} {:#x}..={:#x}",
                m.asid,
                m.iova,
                m.iova.saturating_add(m.size.saturating_sub(1))
            );
            sent += 1;
        }
        if batch {
            // Devices that apply a batch at its end report failures here.
            if let Err(e) = self
                .dev
                .send_iotlb(&IotlbMsg::batch(IotlbKind::BatchEnd, asid))
            {
                if res.is_ok() {
                    res = Err(ctx("IOTLB BATCH_END")(e));
                }
            }
        }
        (sent, res)
    }

    /// Maps `regions` in `asid`; on failure the kernel is told to forget the
    /// ones it accepted, so its table matches ours.
    pub(super) fn map_regions(&self, asid: u32, regions: &[DmaRegion]) -> Result<()> {
        let msgs: Vec<IotlbMsg> = regions.iter().map(|r| update_msg(asid, r)).collect();
        let (sent, res) = self.send_iotlb(asid, &msgs);
        if let Err(e) = res {
            let undo: Vec<IotlbMsg> = regions[..sent]
                .iter()
                .map(|r| invalidate_msg(asid, r.iova, r.size()))
                .collect();
            if !undo.is_empty() {
                if let (_, Err(u)) = self.send_iotlb(asid, &undo) {
                    log::error!(target: LOG, "undoing a failed map: {u}");
                }
            }
            return Err(e);
        }
        Ok(())
    }
}
