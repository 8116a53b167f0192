//! The device model: one virtio-net device as the VMM configures it over
//! vhost-user, relayed to a device backend in passthrough or through
//! shadow virtqueues.
//!
//! Every operation runs on the control side under the device lock (the
//! vhost-user handler, QMP); the data path of shadowed queues runs in the
//! queue pairs' workers (`crate::worker`). The state is in `model.rs`;
//! each other file is one concern of the model:
//!
//! | file | what it does |
//! |---|---|
//! | `model.rs` | the `Device` state, its constructor and accessors |
//! | `error.rs` | what an operation can refuse (`DeviceError`) |
//! | `features.rs` | feature negotiation, what the backend is given |
//! | `config_space.rs` | GET/SET_CONFIG |
//! | `guest_mappings.rs` | guest memory into the IOVA tree and the device |
//! | `vring_messages.rs` | the SET_VRING_* / GET_VRING_BASE messages |
//! | `lifecycle.rs` | SET_STATUS, RESET_DEVICE, disconnect |
//! | `rings.rs` | starting and stopping one ring in either mode |
//! | `mode_switch.rs` | switching every running ring between modes |
//! | `logging_policy.rs` | who logs dirty pages while the VMM migrates |
//! | `snapshot.rs` | the device as migration state (save and apply) |
//! | `migration_messages.rs` | device-state transfer, in-flight region, postcopy |
//! | `query.rs` | what `query-shadow-vq` reports |
//!
//! Components with state of their own, which know nothing of `Device`:
//! `shadow_arena.rs` (one memory area for every shadow ring),
//! `nic_control.rs` (the MAC and queue pairs a backend's CVQ is given),
//! `postcopy_session.rs` (the userfaultfd of one postcopy session).

mod config_space;
mod error;
mod features;
mod guest_mappings;
mod lifecycle;
mod logging_policy;
mod migration_messages;
mod mode_switch;
mod model;
mod nic_control;
mod postcopy_session;
mod query;
mod rings;
mod shadow_arena;
mod snapshot;
mod vring_messages;

pub use error::{DeviceError, Result};
pub use features::{protocol_features, RELAY_FEATURES, SHADOW_TRANSLATED};
pub use model::{lock, Device, RingGpas, SharedDevice};
pub use postcopy_session::PostcopyError;
pub use query::{DeviceStatus, Mode, QueueStatus};
pub use shadow_arena::ArenaError;

#[cfg(test)]
mod tests;
