//! What the QMP server sends: the greeting, replies (a return value or an
//! error with QEMU's classes) and events, as typed records serialized to
//! one JSON object per line.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::device::DeviceStatus;

/// QEMU's error classes (qapi/error.json) that this server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }

    pub fn device_not_found(name: &str) -> QmpError {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: format!("Device '{name}' not found"),
        }
    }
}

/// A command's return value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Return {
    /// `{}`: done, nothing to report.
    Empty(Empty),
    /// `query-shadow-vq`.
    Devices(Vec<DeviceStatus>),
}

/// Serializes as `{}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Empty {}

impl Return {
    pub fn empty() -> Return {
        Return::Empty(Empty {})
    }
}

/// The answer to one command line, with the client's `id` echoed back.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Return {
        #[serde(rename = "return")]
        value: Return,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Error {
        error: QmpError,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

impl Reply {
    pub fn new(result: Result<Return, QmpError>, id: Option<Value>) -> Reply {
        match result {
            Ok(value) => Reply::Return { value, id },
            Err(error) => Reply::Error { error, id },
        }
    }

    pub fn error(&self) -> Option<&QmpError> {
        match self {
            Reply::Error { error, .. } => Some(error),
            Reply::Return { .. } => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        }
    }
}

/// The data of SHADOW_VQ_CHANGED.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShadowVqChanged {
    pub name: String,
    pub enabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    pub event: &'static str,
    pub data: ShadowVqChanged,
    pub timestamp: Timestamp,
}

/// SHADOW_VQ_CHANGED for device `name`: its data path is now shadow
/// (`enabled`) or passthrough.
pub fn mode_event(name: &str, enabled: bool) -> Event {
    Event {
        event: "SHADOW_VQ_CHANGED",
        data: ShadowVqChanged {
            name: name.to_string(),
            enabled,
        },
        timestamp: Timestamp::now(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Greeting {
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GreetingBody {
    pub version: Version,
    pub capabilities: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Version {
    pub qemu: VersionTriple,
    pub package: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VersionTriple {
    pub micro: u32,
    pub minor: u32,
    pub major: u32,
}

/// What a client reads first. The version triple is QMP's shape; the
/// package names the daemon.
pub fn greeting() -> Greeting {
    Greeting {
        qmp: GreetingBody {
            version: Version {
                qemu: VersionTriple {
                    micro: 0,
                    minor: 1,
                    major: 0,
                },
                package: concat!("svq-relay ", env!("CARGO_PKG_VERSION")).to_string(),
            },
            capabilities: Vec::new(),
        },
    }
}
