//! Opening the device backend named on the command line.

use backends::sim::{SimConfig, SimMode, SimNet};
use backends::vdpa::VdpaNet;
use backends::vhost_user::{VhostUserNet, VhostUserOptions};
use backends::{BackendError, DeviceBackend};

use crate::cli::BackendSpec;

/// Locally administered MAC of the software NIC (QEMU's default prefix).
const SIM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SIM_MTU: u16 = 1500;

/// Opens (or connects to) the device. Fails when the device cannot be
/// reached now: the daemon reports that at start instead of accepting a VMM
/// it cannot serve. Once open, a vhost-user device that goes away is
/// reconnected by the backend itself.
pub fn open(
    spec: &BackendSpec,
    queue_pairs: u16,
    max_queue_size: u16,
) -> Result<Box<dyn DeviceBackend>, BackendError> {
    let mode = match spec {
        BackendSpec::SimLoopback => SimMode::Loopback,
        BackendSpec::Tap(ifname) => SimMode::Tap(ifname.clone()),
        BackendSpec::VhostUser { path, listen } => {
            let dev = VhostUserNet::connect_with(
                path,
                VhostUserOptions {
                    queue_pairs,
                    // The synthesized config space (devices without the
                    // CONFIG protocol feature, e.g. DPDK) gets a stable MAC.
                    mac: Some(SIM_MAC),
                    mtu: SIM_MTU,
                    max_queue_size,
                    listen: *listen,
                    ..VhostUserOptions::default()
                },
            )?;
            return Ok(Box::new(dev));
        }
        BackendSpec::Vdpa(path) => return Ok(Box::new(VdpaNet::open(path, queue_pairs)?)),
    };
    let sim = SimNet::new(SimConfig {
        queue_pairs,
        max_queue_size,
        mac: SIM_MAC,
        mtu: SIM_MTU,
        mode,
    })?;
    Ok(Box::new(sim))
}
