//! Opening the device backend named on the command line.

use backends::sim::{SimConfig, SimMode, SimNet};
use backends::{BackendError, DeviceBackend};

use crate::cli::BackendSpec;

/// Locally administered MAC of the software NIC (QEMU's default prefix).
const SIM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SIM_MTU: u16 = 1500;

pub fn open(
    spec: &BackendSpec,
    queue_pairs: u16,
    max_queue_size: u16,
) -> Result<Box<dyn DeviceBackend>, BackendError> {
    let mode = match spec {
        BackendSpec::SimLoopback => SimMode::Loopback,
        BackendSpec::Tap(ifname) => SimMode::Tap(ifname.clone()),
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
