//! Command line: clap parses [`Args`]; [`Config`] is the validated form the
//! rest of the daemon uses. Every check that can fail on user input lives in
//! `TryFrom<Args>` so a bad argument is one error line and exit code 2.

use std::os::unix::io::RawFd;
use std::path::PathBuf;

use clap::Parser;

use crate::worker::{PollConfig, PollMode, DEFAULT_POLL_BUDGET};

/// vhost-user virtio-net relay with shadow virtqueues.
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "svq-relay", version, about)]
pub struct Args {
    /// Unix socket the VMM connects to (or, with --client, the VMM's socket).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Inherited listening socket file descriptor.
    #[arg(long, value_name = "N")]
    pub fd: Option<i64>,
    /// Connect to a VMM that listens on --socket-path (and reconnect).
    #[arg(long)]
    pub client: bool,
    /// Device backend: sim | sim:loopback | tap:IFNAME | vhost-user:PATH |
    /// vhost-user-server:PATH | vdpa:/dev/vhost-vdpa-N.
    #[arg(long, value_name = "SPEC", default_value = "sim")]
    pub backend: String,
    /// Device id used by QMP.
    #[arg(long, value_name = "ID", default_value = "net0")]
    pub name: String,
    /// QMP Unix socket.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,
    /// Number of queue pairs (1..=16).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u32,
    /// Largest ring size (power of two, 64..=32768).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u32,
    /// Shadow virtqueue policy: off | on | auto.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub shadow: String,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// error | warn | info | debug | trace (RUST_LOG is honoured too).
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: String,
    /// How shadow-mode workers wait for work: off (sleep until a guest kick
    /// or device call), adaptive (poll while traffic flows, sleep after
    /// --poll-budget-us idle), always (poll whenever a queue is shadowed).
    #[arg(long, value_name = "MODE", default_value = "off")]
    pub poll: String,
    /// Idle microseconds before an adaptive worker sleeps (1..=1000000).
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_BUDGET.as_micros() as u64)]
    pub poll_budget_us: u64,
    /// Offer VIRTIO_F_IN_ORDER when the device offers it. Kept in shadow
    /// mode too: used entries go to the guest in its order, and the shadow
    /// ring is in order toward the device.
    #[arg(long)]
    pub in_order: bool,
    /// Offer VIRTIO_F_RING_PACKED when the device offers it (a vhost-user
    /// device or the software NIC). Relayed in passthrough and shadow mode alike: the shadow
    /// rings are packed too, and the INFLIGHT_SHMFD region has the packed
    /// layout (DPDK's).
    #[arg(long)]
    pub packed: bool,
    /// CPUs for the queue-pair workers, e.g. 2,3 or 2-5: worker N runs on
    /// the Nth CPU of the list (round robin when there are fewer CPUs).
    #[arg(long, value_name = "CPUS")]
    pub cpu_affinity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Bind and listen on this path (or connect to it with `client`).
    Path { path: PathBuf, client: bool },
    /// An inherited listening socket.
    Fd(RawFd),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    SimLoopback,
    Tap(String),
    /// A vhost-user device: connect to its socket (`listen: false`), or
    /// listen on the path and let the device connect (`vhost-user-server:`,
    /// DPDK net_vhost `client=1`, OVS-DPDK `dpdkvhostuserclient`).
    VhostUser {
        path: PathBuf,
        listen: bool,
    },
    /// A kernel vhost-vdpa character device.
    Vdpa(PathBuf),
}

impl std::fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendSpec::SimLoopback => f.write_str("sim:loopback"),
            BackendSpec::Tap(ifname) => write!(f, "tap:{ifname}"),
            BackendSpec::VhostUser {
                path,
                listen: false,
            } => write!(f, "vhost-user:{}", path.display()),
            BackendSpec::VhostUser { path, listen: true } => {
                write!(f, "vhost-user-server:{}", path.display())
            }
            BackendSpec::Vdpa(path) => write!(f, "vdpa:{}", path.display()),
        }
    }
}

impl BackendSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::SimLoopback => "sim",
            BackendSpec::Tap(_) => "tap",
            BackendSpec::VhostUser { .. } => "vhost-user",
            BackendSpec::Vdpa(_) => "vdpa",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowPolicy {
    Off,
    On,
    /// Switch on dirty logging; until migration support exists it behaves like
    /// `Off`.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    pub listen: Listen,
    pub backend: BackendSpec,
    pub name: String,
    pub qmp: Option<PathBuf>,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub shadow: ShadowPolicy,
    pub poll: PollConfig,
    /// Worker N is pinned to `worker_cpus[N % len]` (none: not pinned).
    pub worker_cpus: Vec<usize>,
    /// `--in-order`: offer IN_ORDER.
    pub in_order: bool,
    /// `--packed`: offer RING_PACKED.
    pub packed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    PrintCapabilities,
    Run(RunConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub command: Command,
    pub log_level: log::LevelFilter,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("exactly one of --socket-path and --fd is required")]
    ListenChoice,
    #[error("--client needs --socket-path (it cannot be used with --fd)")]
    ClientNeedsPath,
    #[error("--fd {0}: not a valid file descriptor number")]
    BadFd(i64),
    #[error("--backend {0}: a path is required")]
    BackendNoPath(String),
    #[error("--backend {0}: unknown backend (expected sim, sim:loopback, tap:IFNAME, vhost-user:PATH, vhost-user-server:PATH or vdpa:PATH)")]
    BadBackend(String),
    #[error("--backend {0}: tap interface name must be 1..=15 bytes without '/' or spaces")]
    BadTapName(String),
    #[error("--name must not be empty")]
    EmptyName,
    #[error("--queues {0}: must be 1..=16")]
    BadQueues(u32),
    #[error("--queue-size {0}: must be a power of two in 64..=32768")]
    BadQueueSize(u32),
    #[error("--shadow {0}: expected off, on or auto")]
    BadShadow(String),
    #[error("--log-level {0}: expected error, warn, info, debug or trace")]
    BadLogLevel(String),
    #[error("--poll {0}: expected off, adaptive or always")]
    BadPoll(String),
    #[error("--poll-budget-us {0}: must be 1..=1000000")]
    BadPollBudget(u64),
    #[error("--cpu-affinity {0}: expected a CPU list such as 0,2-3 (CPUs below {max})", max = libc::CPU_SETSIZE)]
    BadCpuList(String),
}

/// A CPU list as taskset and the kernel print them: `0,2-3`.
fn parse_cpu_list(spec: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError::BadCpuList(spec.to_string());
    let max = libc::CPU_SETSIZE as usize;
    let mut cpus = Vec::new();
    for part in spec.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: usize = lo.trim().parse().map_err(|_| bad())?;
        let hi: usize = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi || hi >= max {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    Ok(cpus)
}

fn parse_backend(spec: &str) -> Result<BackendSpec, ConfigError> {
    match spec {
        "sim" | "sim:loopback" => return Ok(BackendSpec::SimLoopback),
        _ => {}
    }
    if let Some(ifname) = spec.strip_prefix("tap:") {
        let valid = !ifname.is_empty()
            && ifname.len() < libc::IFNAMSIZ
            && !ifname.contains(['/', ' ', '\0'])
            && ifname != "."
            && ifname != "..";
        return if valid {
            Ok(BackendSpec::Tap(ifname.to_string()))
        } else {
            Err(ConfigError::BadTapName(spec.to_string()))
        };
    }
    let path_of = |rest: &str| {
        if rest.is_empty() || rest.contains('\0') {
            Err(ConfigError::BackendNoPath(spec.to_string()))
        } else {
            Ok(PathBuf::from(rest))
        }
    };
    if let Some(rest) = spec.strip_prefix("vhost-user:") {
        return Ok(BackendSpec::VhostUser {
            path: path_of(rest)?,
            listen: false,
        });
    }
    if let Some(rest) = spec.strip_prefix("vhost-user-server:") {
        return Ok(BackendSpec::VhostUser {
            path: path_of(rest)?,
            listen: true,
        });
    }
    if let Some(rest) = spec.strip_prefix("vdpa:") {
        return Ok(BackendSpec::Vdpa(path_of(rest)?));
    }
    Err(ConfigError::BadBackend(spec.to_string()))
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let log_level = match args.log_level.as_str() {
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            other => return Err(ConfigError::BadLogLevel(other.to_string())),
        };
        if args.print_capabilities {
            return Ok(Config {
                command: Command::PrintCapabilities,
                log_level,
            });
        }
        let listen = match (args.socket_path, args.fd) {
            (Some(path), None) => Listen::Path {
                path,
                client: args.client,
            },
            (None, Some(fd)) => {
                if args.client {
                    return Err(ConfigError::ClientNeedsPath);
                }
                let fd = RawFd::try_from(fd).map_err(|_| ConfigError::BadFd(fd))?;
                if fd < 0 {
                    return Err(ConfigError::BadFd(fd.into()));
                }
                Listen::Fd(fd)
            }
            (None, None) if args.client => return Err(ConfigError::ClientNeedsPath),
            _ => return Err(ConfigError::ListenChoice),
        };
        let backend = parse_backend(&args.backend)?;
        if args.name.is_empty() {
            return Err(ConfigError::EmptyName);
        }
        if !(1..=16).contains(&args.queues) {
            return Err(ConfigError::BadQueues(args.queues));
        }
        if !(64..=32768).contains(&args.queue_size) || !args.queue_size.is_power_of_two() {
            return Err(ConfigError::BadQueueSize(args.queue_size));
        }
        let shadow = match args.shadow.as_str() {
            "off" => ShadowPolicy::Off,
            "on" => ShadowPolicy::On,
            "auto" => ShadowPolicy::Auto,
            other => return Err(ConfigError::BadShadow(other.to_string())),
        };
        let mode = match args.poll.as_str() {
            "off" => PollMode::Off,
            "adaptive" => PollMode::Adaptive,
            "always" => PollMode::Always,
            other => return Err(ConfigError::BadPoll(other.to_string())),
        };
        if !(1..=1_000_000).contains(&args.poll_budget_us) {
            return Err(ConfigError::BadPollBudget(args.poll_budget_us));
        }
        let worker_cpus = match &args.cpu_affinity {
            Some(list) => parse_cpu_list(list)?,
            None => Vec::new(),
        };
        Ok(Config {
            command: Command::Run(RunConfig {
                listen,
                backend,
                name: args.name,
                qmp: args.qmp,
                // Both checked above to fit.
                queue_pairs: args.queues as u16,
                queue_size: args.queue_size as u16,
                shadow,
                poll: PollConfig {
                    mode,
                    budget: std::time::Duration::from_micros(args.poll_budget_us),
                },
                worker_cpus,
                in_order: args.in_order,
                packed: args.packed,
            }),
            log_level,
        })
    }
}

/// `--print-capabilities` output (vhost-user backend program conventions).
pub fn capabilities_json() -> String {
    serde_json::json!({ "type": "net" }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["svq-relay"];
        full.extend_from_slice(argv);
        Config::try_from(Args::try_parse_from(full).expect("clap accepts"))
    }

    fn run(argv: &[&str]) -> RunConfig {
        match parse(argv).unwrap().command {
            Command::Run(r) => r,
            Command::PrintCapabilities => panic!("expected run"),
        }
    }

    #[test]
    fn defaults() {
        let r = run(&["--socket-path", "/tmp/x.sock"]);
        assert_eq!(
            r,
            RunConfig {
                listen: Listen::Path {
                    path: "/tmp/x.sock".into(),
                    client: false
                },
                backend: BackendSpec::SimLoopback,
                name: "net0".into(),
                qmp: None,
                queue_pairs: 1,
                queue_size: 1024,
                shadow: ShadowPolicy::Auto,
                poll: PollConfig {
                    mode: PollMode::Off,
                    budget: std::time::Duration::from_micros(50),
                },
                worker_cpus: vec![],
                in_order: false,
                packed: false,
            }
        );
        assert_eq!(
            parse(&["--socket-path", "/x"]).unwrap().log_level,
            log::LevelFilter::Warn
        );
    }

    #[test]
    fn all_options() {
        let r = run(&[
            "--socket-path",
            "/s",
            "--client",
            "--backend",
            "tap:tap0",
            "--name",
            "eth1",
            "--qmp",
            "/q",
            "--queues",
            "16",
            "--queue-size",
            "64",
            "--shadow",
            "on",
            "--poll",
            "always",
            "--poll-budget-us",
            "200",
            "--cpu-affinity",
            "3,0-1",
        ]);
        assert_eq!(
            r.listen,
            Listen::Path {
                path: "/s".into(),
                client: true
            }
        );
        assert_eq!(r.backend, BackendSpec::Tap("tap0".into()));
        assert_eq!(r.name, "eth1");
        assert_eq!(r.qmp, Some("/q".into()));
        assert_eq!((r.queue_pairs, r.queue_size), (16, 64));
        assert_eq!(r.shadow, ShadowPolicy::On);
        assert_eq!(r.poll.mode, PollMode::Always);
        assert_eq!(r.poll.budget, std::time::Duration::from_micros(200));
        assert_eq!(r.worker_cpus, vec![3, 0, 1]);
        let mode = |m: &str| run(&["--fd", "3", "--poll", m]).poll.mode;
        assert_eq!(mode("off"), PollMode::Off);
        assert_eq!(mode("adaptive"), PollMode::Adaptive);
        assert_eq!(run(&["--fd", "3"]).listen, Listen::Fd(3));
        assert_eq!(
            run(&["--fd", "3", "--backend", "sim:loopback"]).backend,
            BackendSpec::SimLoopback
        );
    }

    #[test]
    fn errors() {
        use ConfigError::*;
        assert_eq!(parse(&[]), Err(ListenChoice));
        assert_eq!(
            parse(&["--socket-path", "/a", "--fd", "3"]),
            Err(ListenChoice)
        );
        assert_eq!(parse(&["--fd", "3", "--client"]), Err(ClientNeedsPath));
        assert_eq!(parse(&["--client"]), Err(ClientNeedsPath));
        assert_eq!(parse(&["--fd=-1"]), Err(BadFd(-1)));
        assert_eq!(parse(&["--fd", "99999999999"]), Err(BadFd(99999999999)));
        let p = |extra: &[&str]| {
            let mut v = vec!["--socket-path", "/a"];
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert_eq!(p(&["--queues", "0"]), Err(BadQueues(0)));
        assert_eq!(p(&["--queues", "17"]), Err(BadQueues(17)));
        assert_eq!(p(&["--queue-size", "100"]), Err(BadQueueSize(100)));
        assert_eq!(p(&["--queue-size", "32"]), Err(BadQueueSize(32)));
        assert_eq!(p(&["--queue-size", "65536"]), Err(BadQueueSize(65536)));
        assert_eq!(p(&["--shadow", "maybe"]), Err(BadShadow("maybe".into())));
        assert!(matches!(
            p(&["--in-order", "--shadow", "on"]),
            Ok(Config {
                command: Command::Run(RunConfig { in_order: true, .. }),
                ..
            })
        ));
        assert!(matches!(
            p(&["--packed", "--shadow", "on"]),
            Ok(Config {
                command: Command::Run(RunConfig { packed: true, .. }),
                ..
            })
        ));
        assert_eq!(p(&["--log-level", "loud"]), Err(BadLogLevel("loud".into())));
        assert_eq!(p(&["--name", ""]), Err(EmptyName));
        assert_eq!(p(&["--poll", "busy"]), Err(BadPoll("busy".into())));
        assert_eq!(p(&["--poll-budget-us", "0"]), Err(BadPollBudget(0)));
        assert_eq!(
            p(&["--poll-budget-us", "1000001"]),
            Err(BadPollBudget(1000001))
        );
        for bad in ["", "a", "1-", "3-1", "1,,2", "-1", "1024"] {
            let arg = format!("--cpu-affinity={bad}");
            assert_eq!(p(&[&arg]), Err(BadCpuList(bad.into())), "{bad:?}");
        }
        assert_eq!(
            p(&["--backend", "vdpa:"]),
            Err(BackendNoPath("vdpa:".into()))
        );
        assert_eq!(
            p(&["--backend", "vhost-user:"]),
            Err(BackendNoPath("vhost-user:".into()))
        );
        assert_eq!(
            p(&["--backend", "vhost-user-server:"]),
            Err(BackendNoPath("vhost-user-server:".into()))
        );
        assert_eq!(p(&["--backend", "foo"]), Err(BadBackend("foo".into())));
        assert_eq!(p(&["--backend", "tap:"]), Err(BadTapName("tap:".into())));
        assert_eq!(
            p(&["--backend", "tap:a/b"]),
            Err(BadTapName("tap:a/b".into()))
        );
        assert_eq!(
            p(&["--backend", "tap:0123456789abcdef"]),
            Err(BadTapName("tap:0123456789abcdef".into()))
        );
    }

    #[test]
    fn device_backends() {
        let b = |spec: &str| run(&["--socket-path", "/s", "--backend", spec]).backend;
        let vu = b("vhost-user:/run/dev.sock");
        assert_eq!(
            vu,
            BackendSpec::VhostUser {
                path: "/run/dev.sock".into(),
                listen: false
            }
        );
        assert_eq!(
            (vu.kind(), vu.to_string().as_str()),
            ("vhost-user", "vhost-user:/run/dev.sock")
        );
        let srv = b("vhost-user-server:rel.sock");
        assert_eq!(
            srv,
            BackendSpec::VhostUser {
                path: "rel.sock".into(),
                listen: true
            }
        );
        assert_eq!(srv.to_string(), "vhost-user-server:rel.sock");
        let vdpa = b("vdpa:/dev/vhost-vdpa-0");
        assert_eq!(vdpa, BackendSpec::Vdpa("/dev/vhost-vdpa-0".into()));
        assert_eq!(
            (vdpa.kind(), vdpa.to_string().as_str()),
            ("vdpa", "vdpa:/dev/vhost-vdpa-0")
        );
    }

    #[test]
    fn print_capabilities_needs_no_socket() {
        assert_eq!(
            parse(&["--print-capabilities"]).unwrap().command,
            Command::PrintCapabilities
        );
        let v: serde_json::Value = serde_json::from_str(&capabilities_json()).unwrap();
        assert_eq!(v, serde_json::json!({"type": "net"}));
    }
}
