//! Orchestrating the device's control queue: isolating it in an address
//! space of its own, starting it before DRIVER_OK, and sending the NIC
//! control state as commands (the ring itself is `cvq.rs`).

use std::io;

use super::dma::invalidate_msg;
use super::net::{bits, ctrl, status, BACKEND_ACKED};
use super::sys::backend_bits;
use super::{ctx, VdpaNet, CVQ_ASID, LOG};
use crate::{BackendError, NetCtrlState, Result};

impl VdpaNet {
    /// Programs MAC, queue pairs and RX mode through the control queue.
    ///
    /// Before DRIVER_OK the state is remembered and sent right after
    /// DRIVER_OK (also after every reset); after DRIVER_OK the commands that
    /// change something go out now. Only what differs from what the device
    /// has is sent (a device starts with its own MAC, one pair, promiscuous
    /// on, all-multicast off). A field that needs a feature the device lacks
    /// is [`BackendError::Unsupported`] and nothing is sent; a NACK is
    /// [`BackendError::CtrlNack`].
    pub fn apply_net_state(&mut self, state: &NetCtrlState) -> Result<()> {
        if state.queue_pairs == 0 || state.queue_pairs > self.queue_pairs {
            return Err(BackendError::Device(format!(
                "{} queue pairs requested, {} are open",
                state.queue_pairs, self.queue_pairs
            )));
        }
        // What can be negotiated now, or what was (or what a device stopped
        // by a reset gets again at `resume`).
        let have = self
            .negotiated_features()
            .unwrap_or(self.offered & (BACKEND_ACKED | bits::NET_F_MQ));
        let cvq = self.cvq.is_some() && have & bits::NET_F_CTRL_VQ != 0;
        let need = |b: u64| cvq && have & b != 0;
        if state.mac.is_some() && !need(bits::NET_F_CTRL_MAC_ADDR) {
            return Err(BackendError::Unsupported(
                "setting the MAC (VIRTIO_NET_F_CTRL_MAC_ADDR)",
            ));
        }
        if state.queue_pairs > 1 && !need(bits::NET_F_MQ) {
            return Err(BackendError::Unsupported(
                "several queue pairs (VIRTIO_NET_F_MQ with CTRL_VQ)",
            ));
        }
        if (!state.promisc || state.allmulti) && !need(bits::NET_F_CTRL_RX) {
            return Err(BackendError::Unsupported("RX mode (VIRTIO_NET_F_CTRL_RX)"));
        }
        self.wanted = *state;
        if self.status & status::DRIVER_OK != 0 {
            self.sync_net_state()?;
        }
        Ok(())
    }

    pub(super) fn cvq_iova_or_zero(&self) -> u64 {
        self.cvq.as_ref().map_or(0, |c| c.iova)
    }

    /// With IOTLB_ASID, two address spaces and the control queue in a group
    /// of its own, move that group to [`CVQ_ASID`] (QEMU's CVQ isolation
    /// probe). Groups can depend on the features, so this runs after
    /// FEATURES_OK.
    pub(super) fn isolate_cvq(&mut self, cvq_index: u32) -> Result<u32> {
        if !self.has_backend(backend_bits::IOTLB_ASID) {
            return Ok(0);
        }
        let probe = || -> io::Result<Option<u32>> {
            if self.dev.get_as_num()? <= CVQ_ASID || self.dev.get_group_num()? < 2 {
                return Ok(None);
            }
            let group = self.dev.get_vring_group(cvq_index)?;
            for q in 0..cvq_index {
                if self.dev.get_vring_group(q)? == group {
                    return Ok(None);
                }
            }
            Ok(Some(group))
        };
        match probe() {
            Ok(Some(group)) => {
                self.dev
                    .set_group_asid(group, CVQ_ASID)
                    .map_err(ctx("VHOST_VDPA_SET_GROUP_ASID"))?;
                log::debug!(target: LOG, "control queue group {group} in ASID {CVQ_ASID}");
                Ok(CVQ_ASID)
            }
            Ok(None) => Ok(0),
            Err(e) => {
                log::warn!(target: LOG, "control queue isolation probe failed ({e}); sharing ASID 0");
                Ok(0)
            }
        }
    }

    /// Maps the control queue page where its group looks and hands the
    /// ring to the device (before DRIVER_OK).
    pub(super) fn start_cvq(&mut self) -> Result<()> {
        let Some(index) = self.cvq_index else {
            return Ok(());
        };
        let asid = self.cvq_asid;
        let packed = self.packed();
        let Some(cvq) = self.cvq.as_ref() else {
            return Ok(());
        };
        if cvq.mapped_asid != Some(asid) {
            let region = cvq.region();
            if let Some(old) = cvq.mapped_asid {
                let msg = [invalidate_msg(old, region.iova, region.size())];
                self.send_iotlb(old, &msg).1?;
            }
            self.map_regions(asid, std::slice::from_ref(&region))?;
        }
        let Some(cvq) = self.cvq.as_mut() else {
            return Ok(());
        };
        cvq.mapped_asid = Some(asid);
        cvq.reset_ring(packed)?;
        let d = &self.dev;
        d.set_vring_num(index, cvq.num)
            .map_err(ctx("VHOST_SET_VRING_NUM"))?;
        d.set_vring_addr(index, &cvq.addrs())
            .map_err(ctx("VHOST_SET_VRING_ADDR"))?;
        d.set_vring_base(index, cvq.base())
            .map_err(ctx("VHOST_SET_VRING_BASE"))?;
        d.set_vring_kick(index, Some(&cvq.kick))
            .map_err(ctx("VHOST_SET_VRING_KICK"))?;
        d.set_vring_call(index, Some(&cvq.call))
            .map_err(ctx("VHOST_SET_VRING_CALL"))?;
        d.set_vring_enable(index, true)
            .map_err(ctx("VHOST_VDPA_SET_VRING_ENABLE"))?;
        Ok(())
    }

    pub(super) fn command(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<()> {
        let timeout = self.cvq_timeout;
        let cvq = self
            .cvq
            .as_mut()
            .ok_or(BackendError::Unsupported("the control virtqueue"))?;
        cvq.command(class, cmd, data, timeout)
    }

    /// Sends the commands that take the device from `applied` to `wanted`,
    /// in QEMU's restore order (MAC, queue pairs, RX mode).
    pub(super) fn sync_net_state(&mut self) -> Result<()> {
        let f = self.features.unwrap_or(0);
        if f & bits::NET_F_CTRL_VQ == 0 {
            return Ok(());
        }
        let want = self.wanted;
        let mut cur = self.applied.unwrap_or_else(NetCtrlState::after_reset);
        // apply_net_state checked these against the features it knew of; the
        // features negotiated since may lack them.
        let missing = [
            (want.mac.is_some(), bits::NET_F_CTRL_MAC_ADDR, "the MAC"),
            (want.queue_pairs > 1, bits::NET_F_MQ, "the queue pairs"),
            (
                !want.promisc || want.allmulti,
                bits::NET_F_CTRL_RX,
                "the RX mode",
            ),
        ];
        for (needed, bit, what) in missing {
            if needed && f & bit == 0 {
                log::warn!(target: LOG, "cannot program {what}: feature {bit:#x} was not negotiated");
            }
        }
        if let Some(mac) = want.mac {
            if cur.mac != Some(mac) && f & bits::NET_F_CTRL_MAC_ADDR != 0 {
                self.command(ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, &mac)?;
                cur.mac = Some(mac);
                self.applied = Some(cur);
            }
        }
        let pairs = if f & bits::NET_F_MQ != 0 {
            want.queue_pairs
        } else {
            1
        };
        if pairs != cur.queue_pairs {
            self.command(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &pairs.to_le_bytes())?;
            cur.queue_pairs = pairs;
            self.applied = Some(cur);
        }
        if f & bits::NET_F_CTRL_RX != 0 {
            if want.promisc != cur.promisc {
                self.command(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[u8::from(want.promisc)])?;
                cur.promisc = want.promisc;
                self.applied = Some(cur);
            }
            if want.allmulti != cur.allmulti {
                self.command(
                    ctrl::CLASS_RX,
                    ctrl::RX_ALLMULTI,
                    &[u8::from(want.allmulti)],
                )?;
                cur.allmulti = want.allmulti;
            }
        }
        self.applied = Some(cur);
        Ok(())
    }
}
