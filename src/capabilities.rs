//! What `--print-capabilities` adds to the CLI's `{"type": "net"}`: the
//! migration support, and why postcopy is not offered.

use serde_json::{json, Value};

/// `base` (the CLI's JSON object) plus `"migration"` and `"postcopy"`.
pub fn with_migration(base: &str) -> String {
    let mut v: Value = serde_json::from_str(base).unwrap_or_else(|_| json!({"type": "net"}));
    let postcopy = match crate::migration::postcopy::offer() {
        Ok(_) => json!({"supported": true}),
        Err(reason) => json!({"supported": false, "reason": reason}),
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "migration".into(),
            json!({
                "dirty-log": true,
                "device-state": true,
                "inflight-shmfd": true,
            }),
        );
        obj.insert("postcopy".into(), postcopy);
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_postcopy() {
        let v: serde_json::Value =
            serde_json::from_str(&super::with_migration(r#"{"type":"net"}"#)).unwrap();
        assert_eq!(v["type"], "net");
        let p = &v["postcopy"];
        assert!(p["supported"] == true || p["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
}
