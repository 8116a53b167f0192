//! svq-relay: a vhost-user virtio-net backend that relays the VMM's queues to
//! a device backend, either directly (passthrough) or through shadow
//! virtqueues (see shared/DESIGN.md).

pub mod backend;
pub mod capabilities;
pub mod cli;
pub mod device;
pub mod memory;
pub mod migration;
pub mod protocol;
pub mod qmp;
pub mod server;
pub mod signals;
pub mod stats;
pub mod vduse_cli;
pub mod vhost_user;
pub mod worker;
