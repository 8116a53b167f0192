//! Round trips, one test per kind of bad stream, and a mutation property test.

use proptest::prelude::*;

use crate::migration::stream::*;

use virtio_features::{
    F_RING_PACKED as F_PACKED, F_VERSION_1, NET_F_MAC as F_MAC, NET_F_MQ as F_MQ,
    RING_F_EVENT_IDX as F_EVENT_IDX,
};

fn limits() -> Limits {
    Limits {
        queue_count: 4,
        max_queue_size: 1024,
        features: F_VERSION_1 | F_MAC | F_MQ | F_EVENT_IDX | F_PACKED,
        protocol_features: 0x8_000b,
    }
}

fn sample() -> DeviceState {
    let mut vlans = VlanFilter::default();
    for id in [0, 100, 4095] {
        vlans.set(id, true);
    }
    DeviceState {
        features: Features {
            virtio: F_VERSION_1 | F_MAC | F_MQ | F_EVENT_IDX,
            protocol: 0x8_0003,
        },
        mode: RelayMode::Shadow,
        nic: NicState {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            mtu: 1500,
            queue_pairs: 2,
            rx_mode: RxMode {
                promisc: true,
                allmulti: false,
            },
            vlans,
        },
        vrings: vec![
            VringState {
                size: 256,
                next_avail: 10,
                used_idx: 7,
                enabled: true,
                in_flight: vec![3, 9, 200],
                ..Default::default()
            },
            VringState {
                size: 256,
                next_avail: 5,
                used_idx: 5,
                enabled: true,
                ..Default::default()
            },
            VringState::default(),
            VringState {
                size: 128,
                next_avail: 1,
                used_idx: 65535,
                enabled: false,
                in_flight: vec![127, 0],
                ..Default::default()
            },
        ],
    }
}

/// The records of a stream (test-side parser, trusts the input).
fn records(b: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 6;
    while pos < b.len() {
        let ty = u16::from_le_bytes([b[pos], b[pos + 1]]);
        let inst = u16::from_le_bytes([b[pos + 2], b[pos + 3]]);
        let len = u32::from_le_bytes(b[pos + 4..pos + 8].try_into().unwrap()) as usize;
        out.push((ty, inst, b[pos + 8..pos + 8 + len].to_vec()));
        pos += 8 + len;
    }
    out
}

fn build(version: u16, recs: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"SVQR".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    for (t, i, p) in recs {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&i.to_le_bytes());
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(p);
    }
    b
}

fn sample_records() -> Vec<(u16, u16, Vec<u8>)> {
    records(&sample().to_bytes().unwrap())
}

fn err_of(b: &[u8]) -> String {
    match DeviceState::from_bytes(b, &limits()) {
        Ok(s) => panic!("stream accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_err(b: &[u8], want: &str) {
    let e = err_of(b);
    assert!(e.contains(want), "error {e:?} does not name {want:?}");
}

/// Change the vring record of `queue` with `f(size, avail, used)`.
fn with_vring(recs: &mut [(u16, u16, Vec<u8>)], queue: u16, size: u16, avail: u16, used: u16) {
    let r = recs.iter_mut().find(|r| r.0 == 4 && r.1 == queue).unwrap();
    r.2[0..2].copy_from_slice(&size.to_le_bytes());
    r.2[2..4].copy_from_slice(&avail.to_le_bytes());
    r.2[4..6].copy_from_slice(&used.to_le_bytes());
}

fn inflight_payload(heads: &[u16]) -> Vec<u8> {
    let mut p = (heads.len() as u16).to_le_bytes().to_vec();
    p.extend_from_slice(&[0, 0]);
    for h in heads {
        p.extend_from_slice(&h.to_le_bytes());
    }
    p
}

#[test]
fn round_trip() {
    let s = sample();
    let mut buf = Vec::new();
    s.save(&mut buf).unwrap();
    assert_eq!(&buf[..4], b"SVQR");
    assert_eq!(&buf[4..6], &[1, 0]);
    let back = DeviceState::load(&mut buf.as_slice(), &limits()).unwrap();
    assert_eq!(back, s);
    assert!(back.nic.vlans.contains(4095) && back.nic.vlans.contains(100));
    assert_eq!(back.nic.vlans.ids().count(), 3);
    // Record order does not matter.
    let mut recs = sample_records();
    let end = recs.pop().unwrap();
    recs.reverse();
    recs.push(end);
    assert_eq!(
        DeviceState::from_bytes(&build(1, &recs), &limits()).unwrap(),
        s
    );
}

/// `sample()` with packed rings (positions within the ring, nothing in
/// flight).
fn packed_sample() -> DeviceState {
    let mut s = sample();
    s.features.virtio |= F_PACKED;
    for v in &mut s.vrings {
        v.layout = RingLayout::Packed;
        if v.size != 0 {
            v.next_avail %= v.size;
            v.used_idx %= v.size;
        }
        v.in_flight.clear();
    }
    s
}

#[test]
fn packed_ring_round_trip() {
    let mut s = packed_sample();
    s.vrings[0].avail_wrap = true;
    s.vrings[3].used_wrap = true;
    let b = s.to_bytes().unwrap();
    // Packed rings make it a version 2 stream.
    assert_eq!(&b[4..6], &[2, 0]);
    assert_eq!(DeviceState::from_bytes(&b, &limits()).unwrap(), s);
}

/// Version 1 (what daemons before packed rings write and read) has no
/// packed fields: such a stream still loads, a split-only state is still
/// written as one, and packed fields in it are refused rather than guessed.
#[test]
fn version_1_streams_are_split_rings() {
    let s = sample();
    assert_eq!(&s.to_bytes().unwrap()[4..6], &[1, 0]);
    let recs = sample_records();
    assert_eq!(
        DeviceState::from_bytes(&build(1, &recs), &limits()).unwrap(),
        s
    );
    // The same records under version 2 mean the same.
    assert_eq!(
        DeviceState::from_bytes(&build(2, &recs), &limits()).unwrap(),
        s
    );
    let recs = records(&packed_sample().to_bytes().unwrap());
    assert_err(
        &build(1, &recs),
        "version 1 vring record with packed-ring fields (flags 0x01, layout 1)",
    );
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 4 && r.1 == 2).unwrap().2[6] |= 2;
    assert_err(&build(1, &recs), "queue 2: version 1 vring record");
}

#[test]
fn exact_bytes_of_a_vring_record() {
    let recs = sample_records();
    let r = recs.iter().find(|r| r.0 == 4 && r.1 == 3).unwrap();
    // size 128, avail 1, used 65535, flags 0, split.
    assert_eq!(r.2, vec![128, 0, 1, 0, 0xff, 0xff, 0, 0]);
    let r = recs.iter().find(|r| r.0 == 5 && r.1 == 0).unwrap();
    assert_eq!(r.2, vec![3, 0, 0, 0, 3, 0, 9, 0, 200, 0]);
}

#[test]
fn truncated_header() {
    let b = sample().to_bytes().unwrap();
    assert_err(&b[..3], "truncated header: 3 of 6 bytes");
    assert_err(&[], "truncated header: 0 of 6 bytes");
}

#[test]
fn wrong_magic() {
    let mut b = sample().to_bytes().unwrap();
    b[0] = b'X';
    assert_err(&b, "bad magic [58, 56, 51, 52]");
}

#[test]
fn wrong_version() {
    assert_err(
        &build(7, &sample_records()),
        "unsupported stream version 7 (this daemon reads versions 1 and 2)",
    );
    assert_err(&build(3, &sample_records()), "unsupported stream version 3");
    assert_err(&build(0, &sample_records()), "unsupported stream version 0");
}

#[test]
fn truncated_record() {
    let b = sample().to_bytes().unwrap();
    // Inside the last record header (the end record).
    let e = err_of(&b[..b.len() - 3]);
    assert!(
        e.contains("truncated record at offset") && e.contains("needs 8 bytes, 5 remain"),
        "{e}"
    );
    // Inside a payload: the features record starts at 6, payload 16 bytes.
    let e = err_of(&b[..6 + 8 + 10]);
    assert!(
        e.contains("truncated record at offset 6: needs 24 bytes, 18 remain"),
        "{e}"
    );
}

#[test]
fn oversized_length() {
    let mut recs = sample_records();
    // An in-flight record claiming more than it has, within the type max.
    let mut b = build(1, &recs[..recs.len() - 1]);
    b.extend_from_slice(&5u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1000u32.to_le_bytes());
    b.extend_from_slice(&[0; 10]);
    assert_err(&b, "needs 1008 bytes, 18 remain");
    // Beyond the type's maximum (and beyond what remains): the maximum wins.
    let r = recs.iter_mut().find(|r| r.0 == 5).unwrap();
    r.2 = vec![0; 70000];
    assert_err(
        &build(1, &recs),
        "in-flight record length 70000 exceeds the type's maximum 65540",
    );
    let mut b = build(1, &sample_records()[..1]);
    b.extend_from_slice(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert_err(
        &b,
        "in-flight record length 4294967295 exceeds the type's maximum 65540",
    );
}

#[test]
fn length_beyond_or_below_a_fixed_type() {
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 4).unwrap().2.push(0);
    assert_err(
        &build(1, &recs),
        "vring record length 9 exceeds the type's maximum 8",
    );
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 1).unwrap().2.pop();
    assert_err(&build(1, &recs), "features record length 15, expected 16");
    let mut recs = sample_records();
    recs.last_mut().unwrap().2.push(0);
    assert_err(
        &build(1, &recs),
        "end record length 1 exceeds the type's maximum 0",
    );
    // In-flight count and length disagree.
    let mut recs = sample_records();
    recs.iter_mut()
        .find(|r| r.0 == 5)
        .unwrap()
        .2
        .extend_from_slice(&[0, 0]);
    assert_err(&build(1, &recs), "in-flight record length 12, expected 10");
}

#[test]
fn unknown_type() {
    let mut recs = sample_records();
    recs.insert(1, (0x99, 0, vec![1, 2, 3]));
    assert_err(&build(1, &recs), "unknown record type 0x0099 at offset 30");
}

#[test]
fn duplicate_record() {
    let mut recs = sample_records();
    let v = recs.iter().find(|r| r.0 == 4 && r.1 == 1).unwrap().clone();
    recs.insert(2, v);
    assert_err(&build(1, &recs), "duplicate vring record (instance 1)");
    let mut recs = sample_records();
    recs.insert(0, recs[0].clone());
    assert_err(&build(1, &recs), "duplicate features record (instance 0)");
}

#[test]
fn bad_queue_index() {
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 4 && r.1 == 2).unwrap().1 = 4;
    assert_err(
        &build(1, &recs),
        "vring record instance 4 is invalid: queue index >= queue count 4",
    );
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 5).unwrap().1 = 9;
    assert_err(&build(1, &recs), "in-flight record instance 9 is invalid");
    let mut recs = sample_records();
    recs[0].1 = 1;
    assert_err(&build(1, &recs), "features record instance 1 is invalid");
}

#[test]
fn inconsistent_indexes() {
    let mut recs = sample_records();
    with_vring(&mut recs, 1, 256, 5, 6);
    assert_err(
        &build(1, &recs),
        "queue 1: used idx 6 is ahead of next avail 5",
    );
    let mut recs = sample_records();
    with_vring(&mut recs, 1, 256, 5, 4);
    assert_err(
        &build(1, &recs),
        "queue 1: 0 heads in flight but next avail 5 - used idx 4 = 1",
    );
    let mut recs = sample_records();
    with_vring(&mut recs, 1, 200, 5, 5);
    assert_err(
        &build(1, &recs),
        "queue 1: size 200 (must be a power of two <= 1024)",
    );
    let mut recs = sample_records();
    with_vring(&mut recs, 2, 0, 3, 3);
    assert_err(&build(1, &recs), "queue 2: queue never set up (size 0)");
}

#[test]
fn inconsistent_in_flight() {
    let mut recs = sample_records();
    with_vring(&mut recs, 1, 2, 3, 0);
    recs.insert(1, (5, 1, inflight_payload(&[0, 1, 1])));
    assert_err(
        &build(1, &recs),
        "queue 1: 3 heads in flight exceed the queue size 2",
    );
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 5 && r.1 == 0).unwrap().2 = inflight_payload(&[3, 9, 256]);
    assert_err(
        &build(1, &recs),
        "queue 0: in-flight head 256 >= queue size 256",
    );
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 5 && r.1 == 0).unwrap().2 = inflight_payload(&[3, 9, 3]);
    assert_err(&build(1, &recs), "queue 0: in-flight head 3 listed twice");
}

#[test]
fn layout_must_match_features() {
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 4 && r.1 == 1).unwrap().2[7] = 1;
    assert_err(
        &build(2, &recs),
        "queue 1: packed ring but VIRTIO_F_RING_PACKED not negotiated",
    );
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 4 && r.1 == 1).unwrap().2[7] = 9;
    assert_err(&build(2, &recs), "queue 1: unknown ring layout 9");
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 4 && r.1 == 1).unwrap().2[6] = 0x10;
    assert_err(&build(2, &recs), "queue 1: unknown vring flags 0x10");
}

#[test]
fn missing_end() {
    let recs = sample_records();
    assert_err(
        &build(1, &recs[..recs.len() - 1]),
        "stream ends without an end record",
    );
    assert_err(&build(1, &[]), "stream ends without an end record");
}

#[test]
fn trailing_bytes() {
    let mut b = sample().to_bytes().unwrap();
    b.extend_from_slice(&[0; 5]);
    assert_err(&b, "5 bytes after the end record");
}

#[test]
fn missing_mandatory_records() {
    for (ty, inst, want) in [
        (1u16, 0u16, "missing features record"),
        (2, 0, "missing mode record"),
        (3, 0, "missing nic record"),
        (4, 3, "missing vring (queue 3) record"),
    ] {
        let recs: Vec<_> = sample_records()
            .into_iter()
            .filter(|r| !(r.0 == ty && r.1 == inst))
            .collect();
        assert_err(&build(1, &recs), want);
    }
}

#[test]
fn features_the_device_does_not_offer() {
    let b = sample().to_bytes().unwrap();
    let mut l = limits();
    l.features &= !F_MQ;
    let e = DeviceState::from_bytes(&b, &l).unwrap_err().to_string();
    assert!(
        e.contains("virtio feature bits 0x400000 are not offered"),
        "{e}"
    );
    let mut l = limits();
    l.protocol_features = 0x3;
    let e = DeviceState::from_bytes(&b, &l).unwrap_err().to_string();
    assert!(
        e.contains("protocol feature bits 0x80000 are not offered"),
        "{e}"
    );
}

#[test]
fn bad_nic_and_mode_values() {
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 3).unwrap().2[8] = 3; // queue pairs 3 > 2
    assert_err(&build(1, &recs), "nic queue pairs 3 (the device has 2)");
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 3).unwrap().2[6..8].copy_from_slice(&10u16.to_le_bytes());
    assert_err(&build(1, &recs), "nic MTU 10");
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 3).unwrap().2[10] = 0x80;
    assert_err(&build(1, &recs), "unknown rx mode bits 0x80");
    let mut recs = sample_records();
    recs.iter_mut().find(|r| r.0 == 2).unwrap().2[0] = 2;
    assert_err(&build(1, &recs), "relay mode 2");
}

#[test]
fn too_large_stream() {
    let big = vec![0u8; MAX_STREAM + 10];
    let e = DeviceState::load(&mut big.as_slice(), &limits())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("larger than {MAX_STREAM} bytes")),
        "{e}"
    );
}

proptest! {
    /// Random byte changes, insertions, removals and truncations of a valid
    /// stream never panic; whatever loads is a state that validates and
    /// survives another round trip unchanged.
    #[test]
    fn mutations_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = sample().to_bytes().unwrap();
        for (at, v, kind) in edits {
            if b.is_empty() {
                break;
            }
            let i = at.index(b.len());
            match kind {
                0 | 1 => b[i] = v,
                2 => b.insert(i, v),
                _ => { b.remove(i); }
            }
        }
        if let Some(c) = cut {
            let n = c.index(b.len() + 1);
            b.truncate(n);
        }
        if let Ok(s) = DeviceState::from_bytes(&b, &limits()) {
            prop_assert!(s.validate(&limits()).is_ok());
            let again = DeviceState::from_bytes(&s.to_bytes().unwrap(), &limits()).unwrap();
            prop_assert_eq!(again, s);
        }
    }

    /// Bytes that are mostly valid framing with random payloads.
    #[test]
    fn random_records_never_panic(
        recs in proptest::collection::vec((0u16..8, 0u16..6, proptest::collection::vec(any::<u8>(), 0..40)), 0..12),
    ) {
        let b = build(2, &recs);
        if let Ok(s) = DeviceState::from_bytes(&b, &limits()) {
            prop_assert!(s.validate(&limits()).is_ok());
        }
    }
}
