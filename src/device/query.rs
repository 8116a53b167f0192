//! What `query-shadow-vq` reports about a device, as typed records (QMP
//! serializes them; tests read the fields).

use serde::Serialize;

use super::model::{Device, Running};

/// The data path a queue runs in (or a stopped queue will start in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Passthrough,
    Shadow,
}

impl Mode {
    fn of(shadow: bool) -> Mode {
        if shadow {
            Mode::Shadow
        } else {
            Mode::Passthrough
        }
    }
}

/// One device in the `query-shadow-vq` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    /// At least one ring runs.
    pub started: bool,
    pub mode: Mode,
    /// The backend kind (`sim`, `vhost-user`, `vdpa`).
    pub backend: String,
    /// The VMM negotiated packed rings (`--packed`): the queues' indexes are
    /// then positions with the wrap counter in bit 15 (in passthrough the
    /// ones last set or read, not read from guest memory).
    pub packed: bool,
    /// The VMM negotiated VIRTIO_F_IN_ORDER (`--in-order`).
    pub in_order: bool,
    pub queues: Vec<QueueStatus>,
}

/// One queue of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueStatus {
    pub index: usize,
    pub mode: Mode,
    /// The ring runs (in either mode).
    pub enabled: bool,
    /// Guest avail and used indexes: the SVQ's in shadow, read from guest
    /// memory in passthrough, where the next start continues when stopped.
    pub avail_idx: u16,
    pub used_idx: u16,
    /// Chains the SVQ relayed since the queue was created.
    pub relayed: u64,
    /// Chains on the device now (shadow only; 0 otherwise).
    pub in_flight: u32,
    /// Bad descriptors or used entries the SVQ refused.
    pub errors: u64,
    /// Why the queue stopped relaying (a bad ring), until it restarts.
    pub broken: Option<String>,
}

impl Device {
    pub fn query(&self) -> DeviceStatus {
        let queues = (0..self.num_queues())
            .map(|q| {
                let v = &self.vrings[q];
                let s = self.stats[q].snapshot();
                let (mode, (avail, used)) = match &v.running {
                    Running::Shadow(_) => (Mode::Shadow, (s.avail_idx, s.used_idx)),
                    Running::Passthrough => (
                        Mode::Passthrough,
                        self.read_guest_indexes(q)
                            .unwrap_or((s.avail_idx, s.used_idx)),
                    ),
                    Running::Stopped => (Mode::of(self.shadow), (v.base, v.used_base)),
                };
                let shadowed = matches!(v.running, Running::Shadow(_));
                QueueStatus {
                    index: q,
                    mode,
                    enabled: v.running.is_running(),
                    avail_idx: avail,
                    used_idx: used,
                    relayed: s.relayed,
                    in_flight: if shadowed { s.in_flight } else { 0 },
                    errors: s.errors,
                    broken: s.broken,
                }
            })
            .collect();
        DeviceStatus {
            name: self.name.clone(),
            started: self.is_started(),
            mode: Mode::of(self.shadow),
            backend: self.backend.kind().to_string(),
            packed: self.packed_negotiated(),
            in_order: self
                .acked_features
                .is_some_and(|f| f & virtio_features::F_IN_ORDER != 0),
            queues,
        }
    }
}
