//! What `--print-capabilities` adds to the CLI's `{"type": "net"}`: the
//! vhost-user protocol features offered, the virtio features the relay can
//! carry (always, or on request), the migration
//! support, and why postcopy is not offered.

use serde_json::{json, Value};

/// `base` (the CLI's JSON object) plus `"migration"` and `"postcopy"`.
pub fn with_migration(base: &str) -> String {
    let mut v: Value = serde_json::from_str(base).unwrap_or_else(|_| json!({"type": "net"}));
    let offer = crate::migration::userfaultfd::offer();
    let postcopy = match &offer {
        Ok(_) => json!({"supported": true}),
        Err(reason) => json!({"supported": false, "reason": reason}),
    };
    let offered = crate::device::protocol_features()
        | crate::migration::control::Migration::features_for(offer.is_ok());
    if let Some(obj) = v.as_object_mut() {
        obj.insert("protocol-features".into(), json!(protocol_names(offered)));
        obj.insert("virtio-features".into(), virtio_features_json());
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

/// The virtio features the relay carries when the device offers them: the
/// ones always offered, and the ones offered on request with the option
/// for each (in every mode).
fn virtio_features_json() -> Value {
    use virtio_features as vf;
    let always = [
        (vf::F_VERSION_1, "VERSION_1"),
        (vf::F_ANY_LAYOUT, "ANY_LAYOUT"),
        (vf::NET_F_MAC, "NET_F_MAC"),
        (vf::NET_F_MTU, "NET_F_MTU"),
        (vf::NET_F_STATUS, "NET_F_STATUS"),
        (vf::NET_F_MRG_RXBUF, "NET_F_MRG_RXBUF"),
        (vf::RING_F_EVENT_IDX, "RING_F_EVENT_IDX"),
        (vf::RING_F_INDIRECT_DESC, "RING_F_INDIRECT_DESC"),
        (vf::NET_F_MQ, "NET_F_MQ"),
    ];
    let carried = crate::device::RELAY_FEATURES;
    debug_assert!(always.iter().all(|(b, _)| carried & b != 0));
    json!({
        "always": always.iter().filter(|(b, _)| carried & b != 0).map(|(_, n)| *n).collect::<Vec<_>>(),
        "on-request": {
            "IN_ORDER": "--in-order",
            "RING_PACKED": "--packed",
        },
        // Of those, what `--shadow on` offers even when the device lacks it.
        "without-the-device-under-shadow-on": names(crate::device::SHADOW_TRANSLATED),
    })
}

/// Names of the on-request bits in `f`.
fn names(f: u64) -> Vec<&'static str> {
    use virtio_features as vf;
    [
        (vf::F_IN_ORDER, "IN_ORDER"),
        (vf::F_RING_PACKED, "RING_PACKED"),
    ]
    .into_iter()
    .filter(|(b, _)| f & b != 0)
    .map(|(_, n)| n)
    .collect()
}

/// The specification's names of the bits in `f`, lowest first.
pub fn protocol_names(f: vhost::vhost_user::VhostUserProtocolFeatures) -> Vec<String> {
    f.iter_names().map(|(name, _)| name.to_string()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_postcopy() {
        let v: serde_json::Value =
            serde_json::from_str(&super::with_migration(r#"{"type":"net"}"#)).unwrap();
        assert_eq!(v["type"], "net");
        let vf = &v["virtio-features"];
        assert_eq!(vf["on-request"]["RING_PACKED"], "--packed");
        assert_eq!(vf["on-request"]["IN_ORDER"], "--in-order");
        assert!(vf.get("passthrough-only").is_none());
        assert_eq!(
            vf["without-the-device-under-shadow-on"],
            serde_json::json!(["IN_ORDER", "RING_PACKED"])
        );
        let always: Vec<&str> = vf["always"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert!(always.contains(&"RING_F_EVENT_IDX") && !always.contains(&"RING_PACKED"));
        let p = &v["postcopy"];
        assert!(p["supported"] == true || p["reason"].as_str().is_some_and(|r| !r.is_empty()));
        let names: Vec<&str> = v["protocol-features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        for want in [
            "MQ",
            "REPLY_ACK",
            "STATUS",
            "RESET_DEVICE",
            "LOG_SHMFD",
            "DEVICE_STATE",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(!names.contains(&"CONFIG"), "{names:?}");
        assert_eq!(names.contains(&"PAGEFAULT"), p["supported"] == true);
    }
}
