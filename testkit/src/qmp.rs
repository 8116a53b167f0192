//! A minimal QMP client (QEMU framing: one JSON object per line).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const QMP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub greeting: Value,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects and reads the greeting (no capabilities negotiation).
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect QMP {}: {e}", path.display()));
        s.set_read_timeout(Some(QMP_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(QMP_TIMEOUT)).unwrap();
        let writer = s.try_clone().unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            greeting: Value::Null,
            events: VecDeque::new(),
        };
        q.greeting = q.read_msg().expect("QMP greeting");
        assert!(
            q.greeting.get("QMP").is_some(),
            "bad greeting {}",
            q.greeting
        );
        q
    }

    /// Connects and negotiates capabilities.
    pub fn connect_ready(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        let r = q.execute("qmp_capabilities", None);
        assert_eq!(r.get("return"), Some(&json!({})), "qmp_capabilities: {r}");
        q
    }

    /// Another handle on the socket, for writing from a second thread.
    pub fn writer_clone(&self) -> UnixStream {
        self.writer.try_clone().expect("clone QMP socket")
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write QMP");
    }

    /// Next JSON message, Err on EOF/timeout/bad JSON.
    pub fn read_msg(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("read QMP: {e}"))?;
            if n == 0 {
                return Err("QMP connection closed".into());
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        serde_json::from_str(line.trim()).map_err(|e| format!("bad JSON from daemon {line:?}: {e}"))
    }

    /// Next message that is not an event (events are queued).
    pub fn read_response(&mut self) -> Value {
        loop {
            let m = self.read_msg().expect("QMP response");
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return m;
            }
        }
    }

    /// Sends a command, returns the whole response object ({"return"} or {"error"}).
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).unwrap();
        line.extend_from_slice(b"\r\n");
        self.send_raw(&line);
        self.read_response()
    }

    /// Sends a command and returns its "return" value; panics on an error.
    pub fn execute_ok(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let r = self.execute(cmd, args);
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{cmd} failed: {r}"),
        }
    }

    pub fn enable_shadow(&mut self, name: &str, enable: bool) -> Value {
        self.execute(
            "enable-shadow-vq",
            Some(json!({ "name": name, "enable": enable })),
        )
    }

    /// The query-shadow-vq entry of device `name`.
    pub fn query(&mut self, name: &str) -> Value {
        let r = self.execute_ok("query-shadow-vq", None);
        r.as_array()
            .unwrap_or_else(|| panic!("query-shadow-vq returned {r}"))
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("device {name} not in {r}"))
            .clone()
    }

    /// Waits (bounded) for an event called `name`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            let m = self.read_msg();
            self.reader
                .get_ref()
                .set_read_timeout(Some(QMP_TIMEOUT))
                .unwrap();
            match m {
                Ok(m) if m.get("event").is_some() => self.events.push_back(m),
                Ok(m) => panic!("unexpected QMP message while waiting for {name}: {m}"),
                Err(_) => return None,
            }
        }
    }

    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}

/// Per-queue entry `index` of a query-shadow-vq device entry.
pub fn queue_info(dev: &Value, index: u64) -> &Value {
    dev["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no queues in {dev}"))
        .iter()
        .find(|q| q["index"] == index)
        .unwrap_or_else(|| panic!("queue {index} missing in {dev}"))
}

/// A u64 field of a JSON object, with a message naming it.
pub fn u64_field(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("field {key} missing or not a number in {v}"))
}

/// Checks a queue entry of query-shadow-vq against the driver's ring while
/// traffic is quiescent. TX: the relay saw exactly what the driver published.
/// RX: the relay may not have taken every posted buffer yet, but what it
/// took and did not complete is its in-flight count.
pub fn quiescent_queue(
    qi: &Value,
    ring: &crate::ring::SplitRing,
    is_tx: bool,
) -> Result<(), String> {
    let avail = u64_field(qi, "avail_idx") as u16;
    let used = u64_field(qi, "used_idx") as u16;
    let in_flight = u64_field(qi, "in_flight");
    let fail = |what: String| Err(format!("{what}: {qi}"));
    if used != ring.last_used {
        return fail(format!(
            "used_idx {used} vs the driver's {}",
            ring.last_used
        ));
    }
    if avail.wrapping_sub(used) as u64 != in_flight {
        return fail(format!(
            "avail_idx {avail} - used_idx {used} vs in_flight {in_flight}"
        ));
    }
    if is_tx {
        if avail != ring.avail_idx {
            return fail(format!(
                "TX avail_idx {avail} vs published {}",
                ring.avail_idx
            ));
        }
        if in_flight != 0 {
            return fail("TX in flight while quiescent".into());
        }
    } else if in_flight > ring.num_inflight() as u64 {
        return fail(format!(
            "RX in_flight {in_flight} > {} buffers posted",
            ring.num_inflight()
        ));
    }
    Ok(())
}

pub fn check_quiescent_queue(qi: &Value, ring: &crate::ring::SplitRing, is_tx: bool) {
    if let Err(e) = quiescent_queue(qi, ring, is_tx) {
        panic!("{e}");
    }
}

/// The daemon publishes a queue's counters once its worker finished a batch,
/// which can be just after the guest already saw the completions: re-query
/// (bounded) until `check` passes, and fail with its last complaint.
pub fn query_until(q: &mut Qmp, name: &str, check: impl Fn(&Value) -> Result<(), String>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let dev = q.query(name);
        match check(&dev) {
            Ok(()) => return dev,
            Err(e) if Instant::now() >= deadline => panic!("{e}\n(device: {dev})"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
