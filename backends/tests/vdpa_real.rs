//! VdpaNet on a real /dev/vhost-vdpa-* device (e.g. vdpa_sim_net:
//! `modprobe vdpa_sim_net vhost_vdpa; vdpa dev add name vdpa0 mgmtdev vdpasim_net`).
//! Skipped, with the reason printed, when the machine has none: this one is
//! not required even with SVQ_RELAY_REQUIRE_PEERS, since no CI machine kind
//! of this project has vDPA hardware or the simulator modules.

use std::path::PathBuf;

use backends::vdpa::VdpaNet;
use backends::DeviceBackend;
use backends::NetCtrlState;

fn devices() -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vhost-vdpa-"))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[test]
fn real_device_negotiates_and_runs() {
    let Some(path) = devices().into_iter().next() else {
        println!("skipping: no /dev/vhost-vdpa-* device");
        return;
    };
    let mut net = match VdpaNet::open(&path, 1) {
        Ok(n) => n,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    println!(
        "{}: features {:#x}, backend features {:#x}, range {:?}, ring size {}",
        path.display(),
        net.device_features(),
        net.backend_features(),
        net.iova_range(),
        net.max_queue_size()
    );
    let mut mac = [0u8; 6];
    net.get_config(0, &mut mac).unwrap();
    let f = net.device_features() & ((1 << 32) | (1 << 5) | (1 << 16));
    net.set_features(f).unwrap();
    net.set_status(4).unwrap();
    assert_eq!(net.status() & 0xf, 0xf);
    if net.control_queue().is_some() {
        net.apply_net_state(&NetCtrlState {
            mac: Some([0x02, 0, 0, 0, 0, 1]),
            ..NetCtrlState::default()
        })
        .unwrap();
    }
    match net.suspend() {
        Ok(()) => {
            println!("vring bases after suspend: {:?}", net.vring_base(0));
            let _ = net.resume();
        }
        Err(e) => println!("suspend: {e}"),
    }
    net.set_status(0).unwrap();
}
