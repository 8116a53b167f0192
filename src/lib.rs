//! svq-relay: a vhost-user virtio-net backend that relays the VMM's queues to
//! a device backend, either directly (passthrough) or through shadow
//! virtqueues (see shared/DESIGN.md).

mod arena;
pub mod backend;
pub mod capabilities;
pub mod cli;
pub mod device;
mod devstate;
mod dirty;
pub mod memory;
pub mod migration;
mod netctrl;
mod postcopy;
pub mod protocol;
pub mod qmp;
mod ring;
pub mod server;
pub mod signals;
pub mod stats;
mod status;
mod switch;
pub mod vhost_user;
mod vring;
pub mod worker;

#[cfg(test)]
mod tests;
