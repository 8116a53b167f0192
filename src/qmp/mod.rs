//! QMP server (QEMU's framing: one JSON object per line, "\r\n" terminated).
//!
//! Each client gets a thread; commands are parsed (`command.rs`: the
//! envelope, then typed arguments through serde) and dispatched by
//! [`Qmp::handle_line`], which is pure apart from the device calls so it can
//! be tested with a fake device. Replies and events are typed records
//! (`message.rs`). Events go to every client that finished capabilities
//! negotiation.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::device::{lock, DeviceError, DeviceStatus, SharedDevice};

mod command;
mod message;

pub use command::{Capabilities, Command, EnableShadowVq, NoArguments, Request};
pub use message::{greeting, mode_event, ErrorClass, Event, QmpError, Reply, Return};

const LOG: &str = "qmp";

/// Longest command line accepted; a client sending more is disconnected.
const MAX_LINE: u64 = 64 * 1024;
/// Most clients served at once.
const MAX_CLIENTS: usize = 64;

/// What QMP needs from a device.
pub trait QmpDevice: Send + Sync {
    fn name(&self) -> String;
    /// Switch the data path; Ok(true) if the mode changed. Errors are the
    /// GenericError description.
    fn set_shadow(&self, enable: bool) -> Result<bool, String>;
    fn query(&self) -> DeviceStatus;
}

impl QmpDevice for SharedDevice {
    fn name(&self) -> String {
        lock(self).name().to_string()
    }

    fn set_shadow(&self, enable: bool) -> Result<bool, String> {
        lock(self).set_shadow(enable).map_err(|e| match e {
            DeviceError::NotStarted => "Device is not started".to_string(),
            e => e.to_string(),
        })
    }

    fn query(&self) -> DeviceStatus {
        lock(self).query()
    }
}

/// The reply to one line and the event it caused, if any.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub reply: Option<Reply>,
    pub event: Option<Event>,
}

struct Client {
    writer: Arc<Mutex<UnixStream>>,
    negotiated: Arc<AtomicBool>,
}

pub struct Qmp {
    devices: Vec<Arc<dyn QmpDevice>>,
    clients: Mutex<Vec<Client>>,
}

impl Qmp {
    pub fn new(devices: Vec<Arc<dyn QmpDevice>>) -> Arc<Self> {
        Arc::new(Qmp {
            devices,
            clients: Mutex::new(Vec::new()),
        })
    }

    /// Handle one input line for a client whose negotiation state is
    /// `negotiated`.
    pub fn handle_line(&self, negotiated: &mut bool, line: &str) -> Outcome {
        let line = line.trim();
        if line.is_empty() {
            return Outcome::default();
        }
        let (result, id, event) = match Request::parse(line) {
            Err(e) => (Err(e), None, None),
            Ok(Request {
                command,
                execute,
                id,
            }) => {
                let (result, event) = if !*negotiated && execute != "qmp_capabilities" {
                    // Before negotiation every other command is refused alike.
                    (Err(negotiation_first()), None)
                } else {
                    match command {
                        Ok(c) => self.execute(negotiated, c),
                        Err(e) => (Err(e), None),
                    }
                };
                (result, id, event)
            }
        };
        Outcome {
            reply: Some(Reply::new(result, id)),
            event,
        }
    }

    /// A command of a client that negotiated (or `qmp_capabilities`).
    fn execute(
        &self,
        negotiated: &mut bool,
        command: Command,
    ) -> (Result<Return, QmpError>, Option<Event>) {
        match command {
            Command::QmpCapabilities(caps) if !*negotiated => match caps.enable.first() {
                Some(c) => (
                    Err(QmpError::generic(format!("Capability '{c}' not available"))),
                    None,
                ),
                None => {
                    *negotiated = true;
                    (Ok(Return::empty()), None)
                }
            },
            Command::QmpCapabilities(_) => (
                Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                )),
                None,
            ),
            Command::EnableShadowVq(args) => self.enable_shadow_vq(args),
            Command::QueryShadowVq(_) => {
                let list = self.devices.iter().map(|d| d.query()).collect();
                (Ok(Return::Devices(list)), None)
            }
        }
    }

    fn enable_shadow_vq(&self, args: EnableShadowVq) -> (Result<Return, QmpError>, Option<Event>) {
        let EnableShadowVq { name, enable } = args;
        let Some(dev) = self.devices.iter().find(|d| d.name() == name) else {
            return (Err(QmpError::device_not_found(&name)), None);
        };
        match dev.set_shadow(enable) {
            Ok(changed) => (
                Ok(Return::empty()),
                changed.then(|| mode_event(&name, enable)),
            ),
            Err(desc) => (Err(QmpError::generic(desc)), None),
        }
    }

    /// Send an event to every negotiated client.
    pub fn broadcast(&self, event: &Event) {
        let line = format!("{}\r\n", to_line(event));
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for c in clients.iter() {
            if c.negotiated.load(Ordering::Acquire) {
                let mut w = c.writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = w.write_all(line.as_bytes());
            }
        }
    }

    /// Accept clients forever (on the calling thread).
    pub fn serve(self: &Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let n = self.clients.lock().unwrap_or_else(|e| e.into_inner()).len();
                    if n >= MAX_CLIENTS {
                        log::warn!(target: LOG, "too many QMP clients; refusing one");
                        continue;
                    }
                    let me = self.clone();
                    if let Err(e) = std::thread::Builder::new()
                        .name("qmp-client".into())
                        .spawn(move || me.client(stream))
                    {
                        log::error!(target: LOG, "cannot start a QMP client thread: {e}");
                    }
                }
                Err(e) => {
                    log::warn!(target: LOG, "accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn client(self: Arc<Self>, stream: UnixStream) {
        // A client that stops reading must not block events to others.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let Ok(wstream) = stream.try_clone() else {
            return;
        };
        let writer = Arc::new(Mutex::new(wstream));
        let flag = Arc::new(AtomicBool::new(false));
        let send = |line: String| -> bool {
            let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(format!("{line}\r\n").as_bytes()).is_ok()
        };
        if !send(to_line(&greeting())) {
            return;
        }
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Client {
                writer: writer.clone(),
                negotiated: flag.clone(),
            });
        let mut reader = BufReader::new(stream);
        let mut negotiated = false;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(n) if n as u64 == MAX_LINE && !buf.ends_with(b"\n") => {
                    // Answer, drop the rest of the line, keep the session.
                    log::warn!(target: LOG, "QMP line longer than {MAX_LINE} bytes refused");
                    let too_long =
                        Reply::new(Err(QmpError::generic("QMP input line too long")), None);
                    if !send(to_line(&too_long)) {
                        break;
                    }
                    if !skip_line(&mut reader) {
                        break;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(_) => break,
            }
            let line = String::from_utf8_lossy(&buf);
            let out = self.handle_line(&mut negotiated, &line);
            flag.store(negotiated, Ordering::Release);
            if let Some(r) = &out.reply {
                if let Some(err) = r.error() {
                    log::info!(target: LOG, "command failed: {:?}: {}", err.class, err.desc);
                }
                if !send(to_line(r)) {
                    break;
                }
            }
            if let Some(ev) = &out.event {
                self.broadcast(ev);
            }
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|c| !Arc::ptr_eq(&c.writer, &writer));
    }
}

/// One message as the line QMP sends (serializing these types cannot fail:
/// no maps with non-string keys, no floats).
fn to_line(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn negotiation_first() -> QmpError {
    QmpError::command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'")
}

/// Discard input up to and including the next newline; false at EOF/error.
fn skip_line(reader: &mut impl BufRead) -> bool {
    loop {
        let (consume, done) = match reader.fill_buf() {
            Ok([]) | Err(_) => return false,
            Ok(avail) => match avail.iter().position(|&b| b == b'\n') {
                Some(pos) => (pos + 1, true),
                None => (avail.len(), false),
            },
        };
        reader.consume(consume);
        if done {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Mode;
    use serde_json::{json, Value};

    struct Fake {
        started: bool,
        shadow: Mutex<bool>,
    }

    impl QmpDevice for Fake {
        fn name(&self) -> String {
            "net0".into()
        }
        fn set_shadow(&self, enable: bool) -> Result<bool, String> {
            if !self.started {
                return Err("Device is not started".into());
            }
            let mut s = self.shadow.lock().unwrap();
            let changed = *s != enable;
            *s = enable;
            Ok(changed)
        }
        fn query(&self) -> DeviceStatus {
            let shadow = *self.shadow.lock().unwrap();
            DeviceStatus {
                name: "net0".into(),
                started: self.started,
                mode: if shadow {
                    Mode::Shadow
                } else {
                    Mode::Passthrough
                },
                backend: "fake".into(),
                packed: false,
                in_order: false,
                queues: Vec::new(),
            }
        }
    }

    fn qmp(started: bool) -> Arc<Qmp> {
        Qmp::new(vec![Arc::new(Fake {
            started,
            shadow: Mutex::new(false),
        })])
    }

    fn reply(q: &Qmp, neg: &mut bool, line: &str) -> Value {
        serde_json::to_value(q.handle_line(neg, line).reply.unwrap()).unwrap()
    }

    fn value(v: &impl Serialize) -> Value {
        serde_json::to_value(v).unwrap()
    }

    fn class(v: &Value) -> &str {
        v["error"]["class"].as_str().unwrap_or("")
    }

    fn desc(v: &Value) -> &str {
        v["error"]["desc"].as_str().unwrap_or("")
    }

    #[test]
    fn negotiation_first() {
        let q = qmp(true);
        let mut neg = false;
        let r = reply(&q, &mut neg, r#"{"execute":"query-shadow-vq"}"#);
        assert_eq!(class(&r), "CommandNotFound");
        assert_eq!(
            desc(&r),
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        assert!(!neg);
        let r = reply(&q, &mut neg, r#"{"execute":"qmp_capabilities","id":7}"#);
        assert_eq!(r, json!({"return": {}, "id": 7}));
        assert!(neg);
        let r = reply(&q, &mut neg, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(class(&r), "CommandNotFound");
    }

    #[test]
    fn enable_and_event() {
        let q = qmp(true);
        let mut neg = true;
        let out = q.handle_line(
            &mut neg,
            r#"{"execute":"enable-shadow-vq","arguments":{"name":"net0","enable":true},"id":"a"}"#,
        );
        assert_eq!(value(&out.reply.unwrap()), json!({"return": {}, "id": "a"}));
        let ev = value(&out.event.unwrap());
        assert_eq!(ev["event"], "SHADOW_VQ_CHANGED");
        assert_eq!(ev["data"], json!({"name": "net0", "enabled": true}));
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
        assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        // Same mode again: success, no event.
        let out = q.handle_line(
            &mut neg,
            r#"{"execute":"x-vhost-enable-shadow-vq","arguments":{"name":"net0","enable":true}}"#,
        );
        assert_eq!(value(&out.reply.unwrap()), json!({"return": {}}));
        assert!(out.event.is_none());
        let r = reply(&q, &mut neg, r#"{"execute":"query-shadow-vq"}"#);
        assert_eq!(r["return"][0]["mode"], "shadow");
    }

    #[test]
    fn errors_keep_the_session() {
        let q = qmp(true);
        let mut neg = true;
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"{"execute":"enable-shadow-vq","arguments":{"name":"nope","enable":true}}"#,
                "DeviceNotFound",
                "Device 'nope' not found",
            ),
            (
                r#"{"execute":"enable-shadow-vq","arguments":{"name":"net0"}}"#,
                "GenericError",
                "Parameter 'enable' is missing",
            ),
            (
                r#"{"execute":"enable-shadow-vq","arguments":{"enable":true}}"#,
                "GenericError",
                "Parameter 'name' is missing",
            ),
            (
                r#"{"execute":"enable-shadow-vq","arguments":{"name":"net0","enable":"yes"}}"#,
                "GenericError",
                "Invalid parameter type for 'enable', expected: boolean",
            ),
            (
                r#"{"execute":"enable-shadow-vq","arguments":{"name":1,"enable":true}}"#,
                "GenericError",
                "Invalid parameter type for 'name', expected: string",
            ),
            (
                r#"{"execute":"enable-shadow-vq","arguments":{"name":"net0","enable":true,"x":1}}"#,
                "GenericError",
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"execute":"enable-shadow-vq"}"#,
                "GenericError",
                "Parameter 'name' is missing",
            ),
            (
                r#"{"execute":"foo"}"#,
                "CommandNotFound",
                "The command foo has not been found",
            ),
            (
                r#"{"execute":42}"#,
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
            (
                r#"{"arguments":{}}"#,
                "GenericError",
                "QMP input lacks member 'execute'",
            ),
            (
                r#"[1,2]"#,
                "GenericError",
                "QMP input must be a JSON object",
            ),
            (
                r#"{"execute":"query-shadow-vq","arguments":[]}"#,
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
        ];
        for (line, cls, d) in cases {
            let r = reply(&q, &mut neg, line);
            assert_eq!((class(&r), desc(&r)), (*cls, *d), "{line}");
        }
        let r = reply(&q, &mut neg, "{\"execute\": ");
        assert_eq!(class(&r), "GenericError");
        assert!(desc(&r).starts_with("JSON parse error, "), "{r}");
        assert!(q.handle_line(&mut neg, "  \r\n").reply.is_none());
        // Still usable.
        let r = reply(
            &q,
            &mut neg,
            r#"{"execute":"query-shadow-vq","id":{"x":[1]}}"#,
        );
        assert_eq!(r["id"], json!({"x": [1]}));
        assert!(r["return"].is_array());
    }

    #[test]
    fn not_started() {
        let q = qmp(false);
        let mut neg = true;
        let r = reply(
            &q,
            &mut neg,
            r#"{"execute":"enable-shadow-vq","arguments":{"name":"net0","enable":true}}"#,
        );
        assert_eq!(
            r,
            json!({"error": {"class": "GenericError", "desc": "Device is not started"}})
        );
    }

    #[test]
    fn socket_session_with_event_to_other_client() {
        let dir = std::env::temp_dir().join(format!("svq-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("q.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let q = qmp(true);
        let qs = q.clone();
        std::thread::spawn(move || qs.serve(listener));
        let open = || {
            let s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let r = BufReader::new(s.try_clone().unwrap());
            (s, r)
        };
        let read = |r: &mut BufReader<UnixStream>| -> Value {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert!(l.ends_with("\r\n"), "{l:?}");
            serde_json::from_str(&l).unwrap()
        };
        let (mut a, mut ar) = open();
        let (mut b, mut br) = open();
        assert_eq!(read(&mut ar), value(&greeting()));
        assert_eq!(read(&mut br), value(&greeting()));
        for (s, r) in [(&mut a, &mut ar), (&mut b, &mut br)] {
            s.write_all(b"{\"execute\":\"qmp_capabilities\"}\r\n")
                .unwrap();
            assert_eq!(read(r), json!({"return": {}}));
        }
        a.write_all(b"garbage\n{\"execute\":\"enable-shadow-vq\",\"arguments\":{\"name\":\"net0\",\"enable\":true}}\n")
            .unwrap();
        assert_eq!(class(&read(&mut ar)), "GenericError");
        assert_eq!(read(&mut ar), json!({"return": {}}));
        assert_eq!(read(&mut ar)["event"], "SHADOW_VQ_CHANGED");
        assert_eq!(read(&mut br)["event"], "SHADOW_VQ_CHANGED");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
