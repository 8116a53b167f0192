//! One QMP input line as a typed command.
//!
//! The envelope (`execute`, `arguments`, `id`) is checked first, with
//! QEMU's wording for each mistake (qapi/qmp-dispatch.c); the command and
//! its arguments are then a serde enum, and serde's errors are reworded the
//! way QEMU's input visitor words them ("Parameter 'x' is missing", "Invalid
//! parameter type for 'x', expected: boolean"), so a client written against
//! QEMU reads the same messages.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::message::QmpError;

/// The commands this server implements, each with its typed arguments.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    QmpCapabilities(Capabilities),
    EnableShadowVq(EnableShadowVq),
    QueryShadowVq(NoArguments),
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// `qmp_capabilities`: the capabilities to enable (none are offered, so any
/// is refused, as QEMU refuses one its greeting did not list).
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub enable: Vec<String>,
}

#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableShadowVq {
    /// The device (`--name`).
    pub name: String,
    /// Shadow (`true`) or passthrough.
    pub enable: bool,
}

/// A parsed input line.
#[derive(Debug, PartialEq)]
pub struct Request {
    /// The `execute` member as the client wrote it.
    pub execute: String,
    /// The command, or (the envelope being fine) why the command or its
    /// arguments were refused.
    pub command: Result<Command, QmpError>,
    /// The client's `id`, echoed in the reply.
    pub id: Option<Value>,
}

impl Request {
    /// A line of JSON; `Err` when it is not a QMP command envelope at all.
    pub fn parse(line: &str) -> Result<Request, QmpError> {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| QmpError::generic(format!("JSON parse error, {e}")))?;
        let Value::Object(mut obj) = v else {
            return Err(QmpError::generic("QMP input must be a JSON object"));
        };
        let id = obj.remove("id");
        let name = match obj.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        let arguments = match obj.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        if let Some(k) = obj.keys().next() {
            return Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
        Ok(Request {
            command: Command::from_parts(&name, arguments),
            execute: name,
            id,
        })
    }
}

impl Command {
    fn from_parts(name: &str, arguments: Map<String, Value>) -> Result<Command, QmpError> {
        let args = Value::Object(arguments);
        match name {
            "qmp_capabilities" => typed(name, args).map(Command::QmpCapabilities),
            // QEMU's name for the same command.
            "enable-shadow-vq" | "x-vhost-enable-shadow-vq" => {
                typed(name, args).map(Command::EnableShadowVq)
            }
            "query-shadow-vq" => typed(name, args).map(Command::QueryShadowVq),
            _ => Err(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }
}

/// The arguments of `command` as `T`; serde's error (with the path of the
/// argument it is about) reworded as QEMU words it.
fn typed<T: DeserializeOwned>(command: &str, args: Value) -> Result<T, QmpError> {
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        qemu_wording(command, &path, &e.into_inner().to_string())
    })
}

/// serde's message about bad arguments, as QEMU words it. `path` is the
/// argument it is about (`enable`; `.` for the arguments as a whole), `msg`
/// serde's text.
fn qemu_wording(command: &str, path: &str, msg: &str) -> QmpError {
    let quoted = |m: &str| m.split('`').nth(1).map(str::to_string);
    if msg.starts_with("missing field") {
        if let Some(f) = quoted(msg) {
            return QmpError::generic(format!("Parameter '{f}' is missing"));
        }
    }
    if msg.starts_with("unknown field") {
        if let Some(f) = quoted(msg) {
            return QmpError::generic(format!("Parameter '{f}' is unexpected"));
        }
    }
    if let (false, Some(expected)) = (path == ".", msg.split("expected ").nth(1)) {
        let field = path;
        let expected = expected
            .trim_start_matches("a ")
            .trim_start_matches("an ")
            .split_whitespace()
            .next()
            .unwrap_or(expected);
        return QmpError::generic(format!(
            "Invalid parameter type for '{field}', expected: {expected}"
        ));
    }
    QmpError::generic(format!("Invalid arguments for {command}: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(line: &str) -> Result<Command, QmpError> {
        Request::parse(line).and_then(|r| r.command)
    }

    #[test]
    fn commands_and_their_arguments_are_typed() {
        assert_eq!(
            command(
                r#"{"execute":"x-vhost-enable-shadow-vq","arguments":{"name":"n","enable":false}}"#
            ),
            Ok(Command::EnableShadowVq(EnableShadowVq {
                name: "n".into(),
                enable: false
            }))
        );
        assert_eq!(
            command(r#"{"execute":"query-shadow-vq"}"#),
            Ok(Command::QueryShadowVq(NoArguments {}))
        );
        assert_eq!(
            command(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#),
            Ok(Command::QmpCapabilities(Capabilities {
                enable: vec!["oob".into()]
            }))
        );
        let r = Request::parse(r#"{"execute":"qmp_capabilities","id":[1]}"#).unwrap();
        assert_eq!(r.id, Some(serde_json::json!([1])));
    }

    #[test]
    fn mistakes_are_worded_as_qemu_words_them() {
        let desc = |line: &str| command(line).unwrap_err().desc;
        assert_eq!(
            desc(r#"{"execute":"query-shadow-vq","arguments":{"x":1}}"#),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            desc(r#"{"execute":"enable-shadow-vq","arguments":{"name":"n","enable":1}}"#),
            "Invalid parameter type for 'enable', expected: boolean"
        );
        assert_eq!(
            desc(r#"{"execute":"qmp_capabilities","extra":1}"#),
            "QMP input member 'extra' is unexpected"
        );
    }
}
