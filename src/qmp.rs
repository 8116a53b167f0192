//! QMP server (QEMU's framing: one JSON object per line, "\r\n" terminated).
//!
//! Each client gets a thread; commands are parsed and dispatched by
//! [`Qmp::handle_line`], which is pure apart from the device calls so it can
//! be tested with a fake device. Events go to every client that finished
//! capabilities negotiation.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::device::{lock, DeviceError, SharedDevice};

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
    fn query(&self) -> Value;
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

    fn query(&self) -> Value {
        lock(self).query()
    }
}

/// The reply to one line and the event it caused, if any.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub reply: Option<Value>,
    pub event: Option<Value>,
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

/// SHADOW_VQ_CHANGED for device `name`.
pub fn mode_event(name: &str, enabled: bool) -> Value {
    json!({"event": "SHADOW_VQ_CHANGED",
           "data": {"name": name, "enabled": enabled},
           "timestamp": timestamp()})
}

fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

pub fn greeting() -> Value {
    json!({"QMP": {
        "version": {"qemu": {"micro": 0, "minor": 1, "major": 0},
                    "package": concat!("svq-relay ", env!("CARGO_PKG_VERSION"))},
        "capabilities": []
    }})
}

struct Client {
    writer: Arc<Mutex<UnixStream>>,
    negotiated: Arc<AtomicBool>,
}

pub struct Qmp {
    devices: Vec<Arc<dyn QmpDevice>>,
    clients: Mutex<Vec<Client>>,
}

/// Argument checks the way QEMU words them.
fn arg_string(args: &Map<String, Value>, name: &str) -> Result<String, Value> {
    match args.get(name) {
        None => Err(error(
            "GenericError",
            format!("Parameter '{name}' is missing"),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(error(
            "GenericError",
            format!("Invalid parameter type for '{name}', expected: string"),
        )),
    }
}

fn arg_bool(args: &Map<String, Value>, name: &str) -> Result<bool, Value> {
    match args.get(name) {
        None => Err(error(
            "GenericError",
            format!("Parameter '{name}' is missing"),
        )),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(error(
            "GenericError",
            format!("Invalid parameter type for '{name}', expected: boolean"),
        )),
    }
}

fn no_extra_args(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), Value> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(error(
            "GenericError",
            format!("Parameter '{k}' is unexpected"),
        )),
        None => Ok(()),
    }
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
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                return Outcome {
                    reply: Some(error("GenericError", format!("JSON parse error, {e}"))),
                    event: None,
                }
            }
        };
        let id = v.get("id").cloned();
        let (mut reply, event) = self.dispatch(negotiated, v);
        if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
            obj.insert("id".into(), id);
        }
        Outcome {
            reply: Some(reply),
            event,
        }
    }

    fn dispatch(&self, negotiated: &mut bool, v: Value) -> (Value, Option<Value>) {
        let Some(obj) = v.as_object() else {
            return (
                error("GenericError", "QMP input must be a JSON object"),
                None,
            );
        };
        let cmd = match obj.get("execute") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return (
                    error(
                        "GenericError",
                        "QMP input member 'execute' must be a string",
                    ),
                    None,
                )
            }
            None => {
                return (
                    error("GenericError", "QMP input lacks member 'execute'"),
                    None,
                )
            }
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => {
                return (
                    error(
                        "GenericError",
                        "QMP input member 'arguments' must be an object",
                    ),
                    None,
                )
            }
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !["execute", "arguments", "id"].contains(&k.as_str()))
        {
            return (
                error(
                    "GenericError",
                    format!("QMP input member '{k}' is unexpected"),
                ),
                None,
            );
        }
        if !*negotiated {
            if cmd == "qmp_capabilities" {
                *negotiated = true;
                return (json!({"return": {}}), None);
            }
            return (
                error(
                    "CommandNotFound",
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ),
                None,
            );
        }
        match cmd {
            "qmp_capabilities" => (
                error(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                ),
                None,
            ),
            "enable-shadow-vq" | "x-vhost-enable-shadow-vq" => self.enable_shadow_vq(args),
            "query-shadow-vq" => match no_extra_args(args, &[]) {
                Err(e) => (e, None),
                Ok(()) => {
                    let list: Vec<Value> = self.devices.iter().map(|d| d.query()).collect();
                    (json!({ "return": list }), None)
                }
            },
            other => (
                error(
                    "CommandNotFound",
                    format!("The command {other} has not been found"),
                ),
                None,
            ),
        }
    }

    fn enable_shadow_vq(&self, args: &Map<String, Value>) -> (Value, Option<Value>) {
        let parsed = (|| {
            let name = arg_string(args, "name")?;
            let enable = arg_bool(args, "enable")?;
            no_extra_args(args, &["name", "enable"])?;
            Ok::<_, Value>((name, enable))
        })();
        let (name, enable) = match parsed {
            Ok(x) => x,
            Err(e) => return (e, None),
        };
        let Some(dev) = self.devices.iter().find(|d| d.name() == name) else {
            return (
                error("DeviceNotFound", format!("Device '{name}' not found")),
                None,
            );
        };
        match dev.set_shadow(enable) {
            Ok(changed) => {
                let event = changed.then(|| {
                    json!({"event": "SHADOW_VQ_CHANGED",
                           "data": {"name": name, "enabled": enable},
                           "timestamp": timestamp()})
                });
                (json!({"return": {}}), event)
            }
            Err(desc) => (error("GenericError", desc), None),
        }
    }

    /// Send an event to every negotiated client.
    pub fn broadcast(&self, event: &Value) {
        let line = format!("{event}\r\n");
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
        let send = |v: &Value| -> bool {
            let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(format!("{v}\r\n").as_bytes()).is_ok()
        };
        if !send(&greeting()) {
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
                    if !send(&error("GenericError", "QMP input line too long")) {
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
                if let Some(err) = r.get("error") {
                    log::info!(target: LOG, "command failed: {err}");
                }
                if !send(r) {
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
        fn query(&self) -> Value {
            json!({"name": "net0", "mode": if *self.shadow.lock().unwrap() {"shadow"} else {"passthrough"}})
        }
    }

    fn qmp(started: bool) -> Arc<Qmp> {
        Qmp::new(vec![Arc::new(Fake {
            started,
            shadow: Mutex::new(false),
        })])
    }

    fn reply(q: &Qmp, neg: &mut bool, line: &str) -> Value {
        q.handle_line(neg, line).reply.unwrap()
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
        assert_eq!(out.reply.unwrap(), json!({"return": {}, "id": "a"}));
        let ev = out.event.unwrap();
        assert_eq!(ev["event"], "SHADOW_VQ_CHANGED");
        assert_eq!(ev["data"], json!({"name": "net0", "enabled": true}));
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
        assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        // Same mode again: success, no event.
        let out = q.handle_line(
            &mut neg,
            r#"{"execute":"x-vhost-enable-shadow-vq","arguments":{"name":"net0","enable":true}}"#,
        );
        assert_eq!(out.reply.unwrap(), json!({"return": {}}));
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
        assert_eq!(read(&mut ar), greeting());
        assert_eq!(read(&mut br), greeting());
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
