//! Test frames: every byte is a function of (queue pair, sequence number), so
//! a received frame can be checked completely and identified.

pub const NET_HDR_LEN: usize = 12;
pub const MIN_FRAME: usize = 60;
pub const MAX_FRAME: usize = 1514;
/// Local experimental ethertype.
pub const ETHERTYPE: u16 = 0x88b5;
const HEADER: usize = 14 + 2 + 4 + 2;

pub fn frame_len(pair: u16, seq: u32) -> usize {
    let span = (MAX_FRAME - MIN_FRAME + 1) as u64;
    MIN_FRAME + ((seq as u64 * 7919 + pair as u64 * 104_729) % span) as usize
}

fn pattern(pair: u16, seq: u32, i: usize) -> u8 {
    (seq as usize)
        .wrapping_mul(31)
        .wrapping_add(i.wrapping_mul(13))
        .wrapping_add(pair as usize * 97) as u8
}

pub fn frame(pair: u16, seq: u32) -> Vec<u8> {
    let len = frame_len(pair, seq);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&pair.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&(len as u16).to_be_bytes());
    for i in HEADER..len {
        f.push(pattern(pair, seq, i));
    }
    f
}

/// Identifies a frame and checks every byte. Err says what is wrong.
pub fn check_frame(f: &[u8]) -> Result<(u16, u32), String> {
    if f.len() < HEADER {
        return Err(format!("frame of {} bytes is too short", f.len()));
    }
    let pair = u16::from_be_bytes([f[14], f[15]]);
    let seq = u32::from_be_bytes([f[16], f[17], f[18], f[19]]);
    let want = frame(pair, seq);
    if f.len() != want.len() {
        return Err(format!(
            "frame pair {} seq {}: length {} != {}",
            pair,
            seq,
            f.len(),
            want.len()
        ));
    }
    if let Some(i) = (0..f.len()).find(|&i| f[i] != want[i]) {
        return Err(format!(
            "frame pair {} seq {}: byte {} is {:#04x}, expected {:#04x}",
            pair, seq, i, f[i], want[i]
        ));
    }
    Ok((pair, seq))
}

/// Checks the virtio_net_hdr_v1 at the start of a received buffer for a
/// plain frame; returns its num_buffers.
pub fn check_rx_hdr(h: &[u8]) -> Result<u16, String> {
    if h.len() < NET_HDR_LEN {
        return Err(format!("rx buffer of {} bytes has no full header", h.len()));
    }
    // flags (no NEEDS_CSUM: we never sent any) and gso_type NONE.
    if h[0] != 0 || h[1] != 0 {
        return Err(format!("rx header flags {:#x} gso_type {:#x}", h[0], h[1]));
    }
    Ok(u16::from_le_bytes([h[10], h[11]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_detect_corruption() {
        for pair in [0u16, 3, 15] {
            for seq in [0u32, 1, 2, 1000, u32::MAX] {
                let mut f = frame(pair, seq);
                assert!(f.len() >= MIN_FRAME && f.len() <= MAX_FRAME);
                assert_eq!(check_frame(&f), Ok((pair, seq)));
                let last = f.len() - 1;
                f[last] ^= 1;
                assert!(check_frame(&f).is_err());
            }
        }
        let lens: std::collections::HashSet<usize> = (0..100).map(|s| frame_len(0, s)).collect();
        assert!(lens.len() > 50, "frame lengths should vary");
    }
}
