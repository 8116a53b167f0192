//! One module per kind of input; each builds its own harness once and runs
//! many cases against it.

mod device_state;
mod guest_ring;
mod iova;
mod qmp;
mod ring_env;
mod vhost_user;
mod vu_client;

use crate::engine::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetName {
    /// The SVQ's guest side: descriptor tables, avail rings, indirect tables.
    GuestRing,
    /// The SVQ's device side: used entries a device writes.
    DeviceUsed,
    /// vhost-user message streams through the daemon's dispatcher.
    VhostUser,
    /// QMP lines through the daemon's QMP server.
    Qmp,
    /// SVQR device-state streams loaded over vhost-user.
    DeviceState,
    /// Map/unmap/translate sequences against a model of the IOVA tree.
    Iova,
}

impl TargetName {
    pub fn name(self) -> &'static str {
        match self {
            TargetName::GuestRing => "guest-ring",
            TargetName::DeviceUsed => "device-used",
            TargetName::VhostUser => "vhost-user",
            TargetName::Qmp => "qmp",
            TargetName::DeviceState => "device-state",
            TargetName::Iova => "iova",
        }
    }
}

pub fn build(t: TargetName) -> Result<Box<dyn Target>, String> {
    Ok(match t {
        TargetName::GuestRing => Box::new(guest_ring::GuestRingTarget::new(false)?),
        TargetName::DeviceUsed => Box::new(guest_ring::GuestRingTarget::new(true)?),
        TargetName::VhostUser => Box::new(vhost_user::VhostUserTarget::new()?),
        TargetName::Qmp => Box::new(qmp::QmpTarget::new()?),
        TargetName::DeviceState => Box::new(device_state::DeviceStateTarget::new()?),
        TargetName::Iova => Box::new(iova::IovaTarget),
    })
}
