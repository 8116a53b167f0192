//! Command line of `svq-vduse-net`, the software NIC served as a VDUSE
//! device: clap parses [`VduseArgs`]; `TryFrom` checks them into the
//! backends crate's [`VduseConfig`].

use clap::Parser;

use backends::sim::{SimConfig, SimMode};
use backends::vduse::VduseConfig;

/// The built-in software NIC as a vDPA device in userspace (VDUSE). Add it
/// to the vDPA bus with `vdpa dev add name NAME mgmtdev vduse`; bound to
/// vhost_vdpa it appears as /dev/vhost-vdpa-N.
#[derive(Parser, Debug, Clone)]
#[command(name = "svq-vduse-net", version, about)]
pub struct VduseArgs {
    /// Device name (/dev/vduse/NAME and the vDPA device name).
    #[arg(long, value_name = "NAME", default_value = "svq-vduse0")]
    pub name: String,
    /// MAC address in the config space.
    #[arg(long, value_name = "MAC", default_value = "52:54:00:12:34:56")]
    pub mac: String,
    #[arg(long, value_name = "BYTES", default_value_t = 1500)]
    pub mtu: u16,
    /// Queue pairs (offered as MQ without a control queue when > 1: Linux
    /// 6.12's VDUSE refuses CTRL_VQ).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Largest ring size (power of two, up to 32768).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// Send TX to this tap interface and RX from it, instead of looping
    /// every TX packet back to RX.
    #[arg(long, value_name = "IFNAME")]
    pub tap: Option<String>,
    /// error | warn | info | debug | trace (RUST_LOG is honoured too).
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VduseArgsError {
    #[error("invalid --mac {0:?}: expected six hex bytes like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("invalid --queues {0}: 1..=32768")]
    BadQueues(u16),
    #[error("invalid --queue-size {0}: a power of two, 1..=32768")]
    BadQueueSize(u16),
    #[error("invalid --tap {0:?}: an interface name of 1 to 15 bytes")]
    BadTap(String),
    #[error("invalid --log-level {0:?}: error, warn, info, debug or trace")]
    BadLogLevel(String),
}

/// What `svq-vduse-net` runs with.
#[derive(Debug, Clone)]
pub struct VduseCommand {
    pub device: VduseConfig,
    pub log_level: log::LevelFilter,
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

impl TryFrom<VduseArgs> for VduseCommand {
    type Error = VduseArgsError;

    fn try_from(a: VduseArgs) -> Result<Self, VduseArgsError> {
        let log_level = a
            .log_level
            .parse::<log::LevelFilter>()
            .ok()
            .filter(|l| *l != log::LevelFilter::Off)
            .ok_or_else(|| VduseArgsError::BadLogLevel(a.log_level.clone()))?;
        let mac = parse_mac(&a.mac).ok_or_else(|| VduseArgsError::BadMac(a.mac.clone()))?;
        if a.queues == 0 || a.queues > 0x8000 {
            return Err(VduseArgsError::BadQueues(a.queues));
        }
        if a.queue_size == 0 || !a.queue_size.is_power_of_two() || a.queue_size > 32768 {
            return Err(VduseArgsError::BadQueueSize(a.queue_size));
        }
        let mode = match a.tap {
            None => SimMode::Loopback,
            Some(t) if !t.is_empty() && t.len() < libc::IFNAMSIZ && !t.contains(['/', ' ']) => {
                SimMode::Tap(t)
            }
            Some(t) => return Err(VduseArgsError::BadTap(t)),
        };
        Ok(VduseCommand {
            device: VduseConfig {
                name: a.name,
                sim: SimConfig {
                    queue_pairs: a.queues,
                    max_queue_size: a.queue_size,
                    mac,
                    mtu: a.mtu,
                    mode,
                },
            },
            log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VduseCommand, VduseArgsError> {
        let mut v = vec!["svq-vduse-net"];
        v.extend_from_slice(args);
        VduseCommand::try_from(VduseArgs::try_parse_from(v).unwrap())
    }

    #[test]
    fn defaults_are_one_looped_back_pair() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.device.name, "svq-vduse0");
        assert_eq!(c.device.sim.queue_pairs, 1);
        assert_eq!(c.device.sim.max_queue_size, 256);
        assert_eq!(c.device.sim.mode, SimMode::Loopback);
        assert_eq!(c.device.sim.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(c.log_level, log::LevelFilter::Warn);
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        assert_eq!(
            parse(&["--mac", "52:54:00:12:34"]).unwrap_err(),
            VduseArgsError::BadMac("52:54:00:12:34".into())
        );
        assert_eq!(
            parse(&["--queue-size", "100"]).unwrap_err(),
            VduseArgsError::BadQueueSize(100)
        );
        assert_eq!(
            parse(&["--queues", "0"]).unwrap_err(),
            VduseArgsError::BadQueues(0)
        );
        assert_eq!(
            parse(&["--tap", "a/b"]).unwrap_err(),
            VduseArgsError::BadTap("a/b".into())
        );
        assert!(parse(&["--log-level", "loud"])
            .unwrap_err()
            .to_string()
            .contains("loud"));
        let t = parse(&["--tap", "svq0", "--mac", "02:00:00:00:00:01"]).unwrap();
        assert_eq!(t.device.sim.mode, SimMode::Tap("svq0".into()));
        assert_eq!(t.device.sim.mac, [2, 0, 0, 0, 0, 1]);
    }
}
