//! Live migration building blocks (DESIGN.md "Live migration"): the dirty
//! log, the device-state machine and record stream, the state transfer over
//! the VMM's pipe, the in-flight region and the postcopy support check.
//!
//! Nothing here talks to the socket or the device model; `WIRING.md` says
//! where the daemon calls what.

pub mod control;
pub mod dirty_log;
pub mod inflight_region;
pub mod inflight_region_packed;
mod mapping;
pub mod region_hook;
pub mod state_machine;
pub mod stream;
pub mod transfer;
pub mod userfaultfd;

pub use mapping::MapError;

#[cfg(test)]
mod tests;
