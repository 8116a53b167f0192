//! What `query-shadow-vq` reports about a device.

use serde_json::{json, Value};

use super::model::{Device, Running};

fn mode_name(shadow: bool) -> &'static str {
    if shadow {
        "shadow"
    } else {
        "passthrough"
    }
}

impl Device {
    pub fn query(&self) -> Value {
        let queues: Vec<Value> = (0..self.num_queues())
            .map(|q| {
                let v = &self.vrings[q];
                let s = self.stats[q].snapshot();
                let (mode, (avail, used)) = match &v.running {
                    Running::Shadow(_) => ("shadow", (s.avail_idx, s.used_idx)),
                    Running::Passthrough => (
                        "passthrough",
                        self.read_guest_indexes(q)
                            .unwrap_or((s.avail_idx, s.used_idx)),
                    ),
                    Running::Stopped => (mode_name(self.shadow), (v.base, v.used_base)),
                };
                json!({
                    "index": q,
                    "mode": mode,
                    "enabled": v.running.is_running(),
                    "avail_idx": avail,
                    "used_idx": used,
                    "relayed": s.relayed,
                    "in_flight": if matches!(v.running, Running::Shadow(_)) { s.in_flight } else { 0 },
                    "errors": s.errors,
                    "broken": s.broken,
                })
            })
            .collect();
        json!({
            "name": self.name,
            "started": self.is_started(),
            "mode": mode_name(self.shadow),
            "backend": self.backend.kind(),
            "queues": queues,
        })
    }
}
