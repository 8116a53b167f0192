//! `qmp`: bytes on a QMP connection to the daemon's own QMP server
//! (`svq_relay::qmp::Qmp::serve` on a Unix socket), controlling a device
//! that a VMM connection keeps started, so `enable-shadow-vq` really
//! switches its rings.
//!
//! Inputs are lines of JSON and not-JSON: commands with right and wrong
//! argument types, unknown members, ids of every JSON type, deep nesting,
//! strings past the line limit, invalid UTF-8, NUL bytes, lone surrogates,
//! bare values. Each case is a new client that sends the input, then a
//! newline and two sentinel commands. Invariants: the greeting comes first;
//! every line the server writes is a JSON object ended by CRLF with exactly
//! one of `return`/`error`/`event`; every non-blank input line (and every
//! over-long one) gets exactly one reply, in order; the sentinels are
//! answered with their ids and the device is still there; the
//! SHADOW_VQ_CHANGED events toggle the mode one step at a time and end
//! where `query-shadow-vq` says it is.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use svq_relay::qmp::{Qmp, QmpDevice};

use super::vhost_user::Daemon;
use super::vu_client::stay_connected;
use crate::engine::Target;
use crate::rng::Rng;

/// The server's line limit (src/qmp.rs MAX_LINE).
const MAX_LINE: usize = 64 * 1024;
const NAME: &str = "fuzz0";

pub struct QmpTarget {
    path: PathBuf,
    /// The VMM connection that keeps the device started.
    _vmm: UnixStream,
    _d: Daemon,
    shadow: bool,
    case: u64,
}

impl Drop for QmpTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How the server cuts `input` into lines: how many replies it owes.
fn replies_owed(input: &[u8]) -> usize {
    let mut owed = 0;
    let mut rest = input;
    while !rest.is_empty() {
        let window = &rest[..rest.len().min(MAX_LINE)];
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if !String::from_utf8_lossy(&window[..i + 1]).trim().is_empty() {
                    owed += 1;
                }
                rest = &rest[i + 1..];
            }
            None if window.len() == MAX_LINE => {
                // Too long: one error, the rest of the line is dropped.
                owed += 1;
                match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => rest = &rest[i + 1..],
                    None => break,
                }
            }
            None => {
                if !String::from_utf8_lossy(window).trim().is_empty() {
                    owed += 1;
                }
                break;
            }
        }
    }
    owed
}

fn mode_of(query: &Value) -> Result<bool, String> {
    let list = query
        .get("return")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("query-shadow-vq answered {query}"))?;
    let [dev] = &list[..] else {
        return Err(format!("query-shadow-vq lists {} devices", list.len()));
    };
    if dev.get("name").and_then(Value::as_str) != Some(NAME) {
        return Err(format!("query-shadow-vq: {dev}"));
    }
    if dev.get("started") != Some(&Value::Bool(true)) {
        return Err(format!("the device stopped: {dev}"));
    }
    match dev.get("mode").and_then(Value::as_str) {
        Some("shadow") => Ok(true),
        Some("passthrough") => Ok(false),
        _ => Err(format!("query-shadow-vq: mode in {dev}")),
    }
}

impl QmpTarget {
    pub fn new() -> Result<Self, String> {
        let d = Daemon::new()?;
        let (vmm, acks) = stay_connected(&d.dev, &d.sig, &d.fds, &d.bring_up())?;
        if acks.is_empty() {
            return Err("the VMM connection got no answers".into());
        }
        let path = std::env::temp_dir().join(format!("svq-fuzz-qmp-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let qmp = Qmp::new(vec![Arc::new(d.dev.clone()) as Arc<dyn QmpDevice>]);
        std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || qmp.serve(listener))
            .map_err(|e| e.to_string())?;
        let mut t = QmpTarget {
            path,
            _vmm: vmm,
            _d: d,
            shadow: false,
            case: 0,
        };
        t.run(b"")?;
        Ok(t)
    }
}

/// One reply line: a JSON object with exactly one of the QMP keys.
fn parse_line(line: &str) -> Result<Value, String> {
    let body = line
        .strip_suffix("\r\n")
        .ok_or_else(|| format!("line not ended by CRLF: {:?}", trunc(line)))?;
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {:?}", trunc(body)))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("not an object: {}", trunc(body)))?;
    let keys = ["return", "error", "event", "QMP"]
        .iter()
        .filter(|k| obj.contains_key(**k))
        .count();
    if keys != 1 {
        return Err(format!("{keys} QMP keys in {}", trunc(body)));
    }
    if let Some(e) = obj.get("error") {
        let ok = e.get("class").is_some_and(Value::is_string)
            && e.get("desc").is_some_and(Value::is_string);
        if !ok {
            return Err(format!("error without class/desc: {}", trunc(body)));
        }
    }
    Ok(v)
}

fn trunc(s: &str) -> String {
    s.chars().take(200).collect()
}

impl Target for QmpTarget {
    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        if !rng.one_in(4) {
            out.extend_from_slice(b"{\"execute\":\"qmp_capabilities\"}\n");
        }
        let lines = if rng.one_in(3) { 1 } else { 1 + rng.below(8) };
        for _ in 0..lines {
            out.extend(line(rng));
            match rng.below(8) {
                0 => out.extend_from_slice(b"\r\n"),
                1 => {}
                _ => out.push(b'\n'),
            }
        }
        out
    }

    fn run(&mut self, input: &[u8]) -> Result<(), String> {
        self.case += 1;
        let (s1, s2) = (
            format!("svq-fuzz-{}-a", self.case),
            format!("svq-fuzz-{}-b", self.case),
        );
        let mut sent = input.to_vec();
        sent.push(b'\n');
        let sentinels = format!(
            "{{\"execute\":\"qmp_capabilities\",\"id\":\"{s1}\"}}\n\
             {{\"execute\":\"query-shadow-vq\",\"id\":\"{s2}\"}}\n"
        );
        sent.extend_from_slice(sentinels.as_bytes());
        let owed = replies_owed(&sent);

        let stream = UnixStream::connect(&self.path).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let writer = {
            let mut w = stream.try_clone().map_err(|e| e.to_string())?;
            // The server answers while it reads: write on another thread so
            // neither side blocks on a full socket.
            std::thread::spawn(move || {
                let _ = w.write_all(&sent);
            })
        };
        let mut reader = BufReader::new(stream);
        let mut read_line = |what: &str| -> Result<Value, String> {
            let mut buf = Vec::new();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => Err(format!("connection closed while waiting for {what}")),
                Ok(_) => parse_line(
                    std::str::from_utf8(&buf).map_err(|_| "reply is not UTF-8".to_string())?,
                ),
                Err(e) => Err(format!("waiting for {what}: {e}")),
            }
        };
        if read_line("the greeting")?.get("QMP").is_none() {
            return Err("first line is not the greeting".into());
        }
        let mut replies = Vec::new();
        let mut mode = self.shadow;
        while replies.len() < owed {
            let v = read_line("a reply")?;
            if v.get("QMP").is_some() {
                return Err("a second greeting".into());
            }
            if let Some(ev) = v.get("event") {
                let enabled = v.pointer("/data/enabled").and_then(Value::as_bool);
                if ev != "SHADOW_VQ_CHANGED"
                    || v.pointer("/data/name") != Some(&Value::from(NAME))
                    || enabled.is_none()
                {
                    return Err(format!("event {v}"));
                }
                if enabled == Some(mode) {
                    return Err(format!("event says the mode is {mode}, which it was: {v}"));
                }
                mode = !mode;
                continue;
            }
            replies.push(v);
        }
        let _ = writer.join();
        let (Some(b), Some(a)) = (replies.pop(), replies.pop()) else {
            return Err("no replies to the sentinels".into());
        };
        if a.get("id") != Some(&Value::from(s1)) || b.get("id") != Some(&Value::from(s2)) {
            return Err(format!(
                "replies out of step: the sentinels got {a} and {b} ({owed} owed)"
            ));
        }
        let now = mode_of(&b)?;
        if now != mode {
            return Err(format!(
                "events leave the mode at shadow={mode} but the device says shadow={now}"
            ));
        }
        self.shadow = now;
        Ok(())
    }

    fn max_len(&self) -> usize {
        80 * 1024
    }
}

/// One line of input (without its newline).
fn line(rng: &mut Rng) -> Vec<u8> {
    match rng.below(16) {
        0..=4 => {
            let on = rng.one_in(2);
            format!(
                r#"{{"execute":"enable-shadow-vq","arguments":{{"name":"{NAME}","enable":{on}}}}}"#
            )
            .into_bytes()
        }
        5 => {
            // Deep nesting, in the id or bare.
            let n = 1 + rng.below(4000) as usize;
            let (open, close) = if rng.one_in(2) {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            let inner = format!("{}1{}", open.repeat(n), close.repeat(n));
            if rng.one_in(2) {
                format!("{{\"execute\":\"query-shadow-vq\",\"id\":{inner}}}").into_bytes()
            } else {
                inner.into_bytes()
            }
        }
        6 => {
            // A huge string, sometimes past the line limit.
            let n = [
                100,
                4096,
                MAX_LINE - 40,
                MAX_LINE - 1,
                MAX_LINE,
                MAX_LINE + 100,
            ][rng.below(6) as usize];
            let field = if rng.one_in(2) { "name" } else { "id" };
            let s = "x".repeat(n);
            if field == "id" {
                format!("{{\"execute\":\"qmp_capabilities\",\"id\":\"{s}\"}}").into_bytes()
            } else {
                format!(
                    "{{\"execute\":\"enable-shadow-vq\",\"arguments\":{{\"name\":\"{s}\",\"enable\":true}}}}"
                )
                .into_bytes()
            }
        }
        7 => {
            // Invalid UTF-8, NUL bytes, control characters inside a command.
            let mut b = command(rng).to_string().into_bytes();
            let at = rng.below(b.len() as u64 + 1) as usize;
            let junk: &[u8] = [
                &b"\xff\xfe"[..],
                b"\x00",
                b"\xc3",
                b"\xed\xa0\x80",
                b"\r",
                b"\x1b[0m",
            ][rng.below(6) as usize];
            b.splice(at..at, junk.iter().copied());
            b
        }
        8 => {
            // JSON that is not a command.
            [
                &b"1"[..],
                b"[]",
                b"\"execute\"",
                b"null",
                b"{}",
                b"{\"execute\":null}",
                b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"qmp_capabilities\"}",
                b"{\"execute\":\"\\ud800\"}",
                b"{\"execute\":\"query-shadow-vq\",\"id\":\"\\u0000\"}",
                b"{\"execute\":\"enable-shadow-vq\",\"arguments\":{\"name\":\"fuzz0\",\"enable\":true,\"enable\":false}}",
                b"{\"execute\":\"query-shadow-vq\",\"id\":1e999}",
                b"{\"execute\":\"query-shadow-vq\",\"id\":-0.0}",
            ][rng.below(12) as usize]
                .to_vec()
        }
        9 => {
            // Bytes.
            let n = rng.below(64) as usize;
            rng.bytes(n)
                .into_iter()
                .map(|b| if b == b'\n' { b' ' } else { b })
                .collect()
        }
        10 => b"   \t ".to_vec(),
        _ => command(rng).to_string().into_bytes(),
    }
}

/// A command, right or wrong in one place.
fn command(rng: &mut Rng) -> Value {
    use serde_json::json;
    let name = match rng.below(6) {
        0 => json!("nope"),
        1 => json!(5),
        2 => json!(""),
        _ => json!(NAME),
    };
    let enable = match rng.below(8) {
        0 => json!("yes"),
        1 => json!(1),
        2 => Value::Null,
        3 | 4 => json!(false),
        _ => json!(true),
    };
    let execute = match rng.below(12) {
        0 => json!("qmp_capabilities"),
        1 => json!("query-shadow-vq"),
        2 => json!("x-vhost-enable-shadow-vq"),
        3 => json!("quit"),
        4 => json!(["enable-shadow-vq"]),
        _ => json!("enable-shadow-vq"),
    };
    let mut args = serde_json::Map::new();
    if !rng.one_in(8) {
        args.insert("name".into(), name);
    }
    if !rng.one_in(8) {
        args.insert("enable".into(), enable);
    }
    if rng.one_in(10) {
        args.insert("force".into(), json!(true));
    }
    let mut cmd = serde_json::Map::new();
    cmd.insert("execute".into(), execute);
    match rng.below(10) {
        0 => {}
        1 => {
            cmd.insert("arguments".into(), json!([1, 2]));
        }
        2 => {
            cmd.insert("arguments".into(), json!("name=fuzz0"));
        }
        _ => {
            cmd.insert("arguments".into(), Value::Object(args));
        }
    }
    match rng.below(8) {
        0 => {
            cmd.insert("id".into(), json!(rng.below(1000)));
        }
        1 => {
            cmd.insert("id".into(), json!({"nested": [1, "two", null]}));
        }
        2 => {
            cmd.insert("id".into(), json!("a-string-id"));
        }
        3 => {
            cmd.insert("unexpected".into(), json!(1));
        }
        _ => {}
    }
    Value::Object(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_model_counts_like_the_server() {
        assert_eq!(replies_owed(b""), 0);
        assert_eq!(replies_owed(b"\n \r\n\t\n"), 0);
        assert_eq!(replies_owed(b"a\nb"), 2);
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.extend_from_slice(b"\nnext\n");
        assert_eq!(
            replies_owed(&long),
            2,
            "one error for the long line, one for the next"
        );
        let mut exact = vec![b'x'; MAX_LINE - 1];
        exact.push(b'\n');
        assert_eq!(replies_owed(&exact), 1);
    }

    #[test]
    fn a_switch_and_back_through_the_server() {
        let mut t = QmpTarget::new().expect("target");
        let on = br#"{"execute":"qmp_capabilities"}
{"execute":"enable-shadow-vq","arguments":{"name":"fuzz0","enable":true}}"#;
        t.run(on).expect("switch to shadow");
        assert!(t.shadow, "the device is in shadow mode");
        let off = br#"{"execute":"qmp_capabilities"}
{"execute":"enable-shadow-vq","arguments":{"name":"fuzz0","enable":false}}"#;
        t.run(off).expect("switch back");
        assert!(!t.shadow);
    }
}
