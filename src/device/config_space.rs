//! The virtio-net config space (GET/SET_CONFIG), read from and written to
//! the device behind the relay.

use super::error::{DeviceError, Result};
use super::model::Device;

impl Device {
    pub fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let max = self.backend.config_size();
        let end = u64::from(offset) + u64::from(size);
        if end > max as u64 {
            return Err(DeviceError::BadConfig { offset, size, max });
        }
        let mut buf = vec![0u8; size as usize];
        self.backend.get_config(offset, &mut buf)?;
        Ok(buf)
    }

    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let max = self.backend.config_size();
        if u64::from(offset) + data.len() as u64 > max as u64 {
            return Err(DeviceError::BadConfig {
                offset,
                size: data.len() as u32,
                max,
            });
        }
        self.backend.set_config(offset, data)?;
        let backend = &self.backend;
        let mac_written = self.net_ctrl.config_written(offset, data, || {
            let mut m = [0u8; 6];
            backend.get_config(0, &mut m).ok().map(|()| m)
        });
        if mac_written {
            self.sync_net_ctrl();
        }
        Ok(())
    }
}
