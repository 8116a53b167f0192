//! The vhost-user back-end protocol toward the VMM, owned by this daemon:
//! framing and file descriptors (`wire`), typed requests with their payload
//! checks (`request`), and the per-connection negotiation state and reply
//! rules (`session`). The device model plugs in through
//! `session::RequestHandler`.
//!
//! The message structs are the vhost crate's (`vhost::vhost_user::message`);
//! its dispatcher is not used: it refuses orders real frontends send (QEMU
//! enables rings before SET_FEATURES) and cannot route SET_STATUS.

pub mod request;
pub mod session;
pub mod wire;

pub use session::{HandlerError, HandlerResult, RequestHandler, Session, SessionError};

#[cfg(test)]
mod tests;
