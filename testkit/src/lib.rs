//! What the workspace's tests share, so each exists once:
//!
//! - the real `svq-relay` process ([`daemon`]), a test VMM that negotiates
//!   like QEMU ([`vmm`]) with memfd guest memory ([`mem`]) and an
//!   independent split-ring virtio-net driver ([`ring`], [`net`],
//!   [`packet`]), a QMP client ([`qmp`]), raw vhost-user messages ([`raw`]),
//!   migration helpers ([`migrate`]) and the switching scenario
//!   ([`scenario`]);
//! - the peers nobody here wrote: DPDK testpmd ([`testpmd`]) and QEMU with a
//!   Linux guest ([`qemu`]), and the one rule for a peer a machine lacks
//!   ([`peers`]);
//! - the fake vDPA kernel the vdpa backend is tested against
//!   ([`vdpa_fake`]).
//!
//! The driver and the fakes deliberately share no code with the crates
//! under test.
#![allow(clippy::new_without_default)]

pub mod daemon;
pub mod mem;
pub mod migrate;
pub mod net;
pub mod packed_ring;
pub mod packet;
pub mod peers;
pub mod qemu;
pub mod qmp;
pub mod raw;
pub mod ring;
pub mod scenario;
pub mod testpmd;
pub mod vdpa_fake;
pub mod vmm;

pub use daemon::Daemon;
pub use net::{pump, DriverOpts, NetPair, Until};
pub use qmp::Qmp;
pub use vmm::{Vmm, VmmConfig};
