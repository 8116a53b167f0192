//! Byte-level mutations of a valid input: what turns a well-formed ring or
//! message into one that is off by a bit, a boundary value, a missing or a
//! repeated field.

use crate::rng::Rng;

/// Values at the edges that validation code gets wrong.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    0xfff,
    0x1000,
    0x1001,
];

/// Apply 1..=4 random mutations to `data` (which may come back empty or
/// longer, bounded by `max_len`).
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], max_len: usize) {
    let n = 1 + rng.below(4);
    for _ in 0..n {
        mutate_once(rng, data, other);
    }
    data.truncate(max_len);
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    if data.is_empty() {
        let n = 1 + rng.below(16) as usize;
        data.extend(rng.bytes(n));
        return;
    }
    let len = data.len();
    let at = rng.below(len as u64) as usize;
    match rng.below(9) {
        // Flip one bit.
        0 => data[at] ^= 1 << rng.below(8),
        // A random byte.
        1 => data[at] = rng.next_u64() as u8,
        // An interesting value of width 1, 2, 4 or 8, either endianness.
        2 => {
            let w = 1usize << rng.below(4);
            let v = *rng.pick(INTERESTING);
            let b = if rng.one_in(4) {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            let src = if rng.one_in(4) { &b[8 - w..] } else { &b[..w] };
            for (i, &x) in src.iter().enumerate() {
                if let Some(d) = data.get_mut(at + i) {
                    *d = x;
                }
            }
        }
        // Add or subtract a small number from a 16-bit field.
        3 => {
            if at + 1 < len {
                let v = u16::from_le_bytes([data[at], data[at + 1]]);
                let d = rng.range(1, 16) as u16;
                let v = if rng.one_in(2) {
                    v.wrapping_add(d)
                } else {
                    v.wrapping_sub(d)
                };
                data[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        // Delete a block.
        4 => {
            let n = (1 + rng.below(16) as usize).min(len - at);
            data.drain(at..at + n);
        }
        // Insert random bytes.
        5 => {
            let n = 1 + rng.below(16) as usize;
            let b = rng.bytes(n);
            data.splice(at..at, b);
        }
        // Duplicate a block (repeated records and messages).
        6 => {
            let n = (1 + rng.below(64) as usize).min(len - at);
            let block = data[at..at + n].to_vec();
            let to = rng.below(data.len() as u64 + 1) as usize;
            data.splice(to..to, block);
        }
        // Splice in a piece of another input of the corpus.
        7 => {
            if !other.is_empty() {
                let from = rng.below(other.len() as u64) as usize;
                let n = (1 + rng.below(64) as usize).min(other.len() - from);
                let to = rng.below(len as u64) as usize;
                let end = (to + n).min(len);
                data.splice(to..end, other[from..from + n].iter().copied());
            }
        }
        // Truncate.
        _ => data.truncate(at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_the_input_and_respect_the_bound() {
        let mut rng = Rng::new(1);
        let orig: Vec<u8> = (0..64).collect();
        let mut changed = 0;
        for _ in 0..1000 {
            let mut d = orig.clone();
            mutate(&mut rng, &mut d, &orig, 80);
            assert!(d.len() <= 80);
            if d != orig {
                changed += 1;
            }
        }
        // Some mutations are no-ops (a splice of identical bytes), most not.
        assert!(changed > 900, "only {changed} of 1000 mutated");
    }
}
