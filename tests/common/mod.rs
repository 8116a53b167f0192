//! Shared harness of the end-to-end tests: the daemon process, a test VMM
//! (vhost-user frontend + memfd guest memory + an independent split-ring
//! virtio-net driver), and a QMP client.
#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod mem;
pub mod migrate;
pub mod net;
pub mod packet;
pub mod peers;
pub mod qemu;
pub mod qmp;
pub mod raw;
pub mod ring;
pub mod scenario;
pub mod vmm;

pub use daemon::Daemon;
pub use net::{pump, DriverOpts, NetPair, Until};
pub use qmp::Qmp;
pub use vmm::{Vmm, VmmConfig};
