//! Tap mode of the sim against a real host tap interface. Skips (with the
//! reason printed) where /dev/net/tun or AF_PACKET is not available.

mod sim_driver;
mod tap_socket;

use std::process::Command;
use std::time::Instant;

use backends::sim::SimMode;
use backends::DeviceBackend;
use sim_driver::*;
use tap_socket::{frame, PacketSocket};

const RX: usize = 0;
const TX: usize = 1;

fn tap_rig(tag: &str, pairs: u16, features: u64) -> Option<(Rig, String)> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        println!("SKIP: cannot open /dev/net/tun: {e}");
        return None;
    }
    let ifname = format!("svqs{tag}{}", std::process::id() % 100_000);
    let rig = std::panic::catch_unwind(|| {
        Rig::with_mode(pairs, features, 64, SimMode::Tap(ifname.clone()))
    });
    let Ok(rig) = rig else {
        println!("SKIP: cannot create tap {ifname}");
        return None;
    };
    assert_eq!(rig.sim.kind(), "tap");
    // Keep IPv6 chatter (router solicitations) off the test interface.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
    match Command::new("ip")
        .args(["link", "set", "dev", &ifname, "up"])
        .status()
    {
        Ok(s) if s.success() => Some((rig, ifname)),
        other => {
            println!("SKIP: cannot bring {ifname} up: {other:?}");
            None
        }
    }
}

#[test]
fn tap_carries_frames_both_ways() {
    let Some((mut rig, ifname)) = tap_rig("a", 1, F_VERSION_1 | F_MRG_RXBUF) else {
        return;
    };
    let sock = match PacketSocket::open(&ifname) {
        Ok(s) => s,
        Err(e) => {
            println!("SKIP: AF_PACKET on {ifname}: {e}");
            return;
        }
    };

    // TX -> tap.
    for (len, seed) in [(64usize, 1u8), (1514, 2)] {
        let f = frame(len, seed);
        let mut pkt = vec![0u8; HDR];
        pkt.extend_from_slice(&f);
        let h = rig.queues[TX].add_tx(&pkt, 2);
        rig.queues[TX].submit(&[h]);
        assert_eq!(rig.queues[TX].wait_used(1), vec![(h, 0)]);
        sock.expect(&f);
    }

    // tap -> RX: post buffers first, then send from the host side.
    let heads: Vec<u16> = (0..16).map(|_| rig.queues[RX].add_rx(1, 2048)).collect();
    rig.queues[RX].submit(&heads);
    for (len, seed) in [(64usize, 3u8), (1514, 4)] {
        let f = frame(len, seed);
        sock.send(&f);
        let mut want = vec![0u8; HDR];
        want[10] = 1; // num_buffers
        want.extend_from_slice(&f);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "frame never reached RX");
            let (id, len) = rig.queues[RX].wait_used(1)[0];
            let got = rig.queues[RX].read_rx(id, len, 2048);
            if got == want {
                break;
            }
        }
    }
    assert!(rig.sim.queue_stats(RX).unwrap().packets >= 2);
    assert_eq!(rig.sim.queue_stats(TX).unwrap().packets, 2);
}

#[test]
fn tap_frames_wait_for_rx_buffers() {
    let Some((mut rig, ifname)) = tap_rig("b", 1, F_VERSION_1) else {
        return;
    };
    let sock = match PacketSocket::open(&ifname) {
        Ok(s) => s,
        Err(e) => {
            println!("SKIP: AF_PACKET on {ifname}: {e}");
            return;
        }
    };
    let f = frame(200, 9);
    sock.send(&f);
    std::thread::sleep(std::time::Duration::from_millis(30));
    rig.sync(RX);
    assert_eq!(rig.queues[RX].used_idx(), 0);
    let heads: Vec<u16> = (0..8).map(|_| rig.queues[RX].add_rx(1, 2048)).collect();
    rig.queues[RX].submit(&heads);
    let mut want = vec![0u8; HDR];
    want[10] = 1;
    want.extend_from_slice(&f);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "frame never reached RX");
        let (id, len) = rig.queues[RX].wait_used(1)[0];
        if rig.queues[RX].read_rx(id, len, 2048) == want {
            break;
        }
    }
}

#[test]
fn multi_queue_tap_opens_one_queue_per_pair() {
    let Some((rig, ifname)) = tap_rig("c", 2, F_VERSION_1 | F_MQ) else {
        return;
    };
    assert_eq!(rig.sim.num_queues(), 4);
    let out = Command::new("ip")
        .args(["-d", "link", "show", &ifname])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("multi_queue"), "{text}");
}
