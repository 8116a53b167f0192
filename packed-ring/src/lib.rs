//! What both sides of a packed ring share (virtio 1.2, 2.8): descriptor
//! flag bits, event suppression values and ring positions with their wrap
//! counter. The SVQ is both sides (device of the guest's ring, driver of
//! the shadow ring) and the software NIC is a device; they use these rules
//! from one place.

use virtio_bindings::bindings::virtio_ring::{
    VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_ENABLE,
};

pub const F_AVAIL: u16 = 1 << VRING_PACKED_DESC_F_AVAIL;
pub const F_USED: u16 = 1 << VRING_PACKED_DESC_F_USED;
pub const EVENT_ENABLE: u16 = VRING_PACKED_EVENT_FLAG_ENABLE as u16;
pub const EVENT_DISABLE: u16 = VRING_PACKED_EVENT_FLAG_DISABLE as u16;
pub const EVENT_DESC: u16 = VRING_PACKED_EVENT_FLAG_DESC as u16;
const WRAP: u16 = 1 << 15;

/// The vhost base (VHOST_SET_VRING_BASE, vhost-user SET_VRING_BASE) of an
/// empty packed ring: avail and used at [`Pos::START`], the avail half in
/// bits 0..=15, the used half in bits 16..=31.
pub const EMPTY_RING_BASE: u32 = (Pos::START.encode() as u32) | (Pos::START.encode() as u32) << 16;

/// A position in a packed ring and the wrap counter it is at. Both wrap
/// counters start at 1 and flip each time the position passes the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub pos: u16,
    pub wrap: bool,
}

impl Pos {
    pub const START: Pos = Pos { pos: 0, wrap: true };

    /// From the vhost-user encoding, `position | wrap << 15`.
    pub fn decode(v: u16) -> Pos {
        Pos {
            pos: v & !WRAP,
            wrap: v & WRAP != 0,
        }
    }

    pub const fn encode(self) -> u16 {
        self.pos | if self.wrap { WRAP } else { 0 }
    }

    /// `n` (at most `size`) slots on.
    #[inline]
    pub fn add(self, n: u16, size: u16) -> Pos {
        let p = u32::from(self.pos) + u32::from(n);
        if p >= u32::from(size) {
            Pos {
                pos: (p - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Pos {
                pos: p as u16,
                wrap: self.wrap,
            }
        }
    }

    /// `n` (at most `size`) slots back.
    pub fn sub(self, n: u16, size: u16) -> Pos {
        if n > self.pos {
            Pos {
                pos: self.pos + size - n,
                wrap: !self.wrap,
            }
        } else {
            Pos {
                pos: self.pos - n,
                wrap: self.wrap,
            }
        }
    }

    /// The position counted over two laps: positions of one lap with wrap
    /// counter 1, then of the next with 0.
    fn lap(self, size: u16) -> u32 {
        u32::from(self.pos) + if self.wrap { 0 } else { u32::from(size) }
    }

    /// Slots from `self` forward to `to` (less than `2 * size`).
    pub fn until(self, to: Pos, size: u16) -> u32 {
        let laps = 2 * u32::from(size);
        (to.lap(size) + laps - self.lap(size)) % laps
    }

    /// The flags that make a descriptor at this position available (as the
    /// driver writes them) or used (as the device writes them).
    #[inline]
    pub fn avail_flags(self) -> u16 {
        if self.wrap {
            F_AVAIL
        } else {
            F_USED
        }
    }

    #[inline]
    pub fn used_flags(self) -> u16 {
        if self.wrap {
            F_AVAIL | F_USED
        } else {
            0
        }
    }

    /// Is a descriptor with `flags` available at this (avail) position?
    #[inline]
    pub fn is_avail(self, flags: u16) -> bool {
        flags & (F_AVAIL | F_USED) == self.avail_flags()
    }

    /// Is a descriptor with `flags` used at this (used) position?
    #[inline]
    pub fn is_used(self, flags: u16) -> bool {
        flags & (F_AVAIL | F_USED) == self.used_flags()
    }
}

/// `vring_need_event` from the virtio spec: has the index moved past `event`
/// when it went from `old` to `new`? (Split rings' EVENT_IDX rule, which
/// the packed DESC mode applies to positions.)
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Does an event suppression structure `(flags, off_wrap)` ask for a
/// notification now that the position moved from `old` to `new` (at most a
/// ring apart)? DESC counts only under EVENT_IDX (otherwise the value is
/// reserved and read as ENABLE); the offset is compared as Linux's
/// `virtqueue_kick_prepare_packed` and QEMU's `vring_packed_need_event` do:
/// an offset with the other wrap counter lies one lap back.
pub fn wants_event(
    flags: u16,
    off_wrap: u16,
    event_idx: bool,
    old: Pos,
    new: Pos,
    size: u16,
) -> bool {
    match flags {
        EVENT_DISABLE => false,
        EVENT_DESC if event_idx => {
            let moved = old.until(new, size) as u16;
            let event = Pos::decode(off_wrap);
            let off = if event.wrap != new.wrap {
                event.pos.wrapping_sub(size)
            } else {
                event.pos
            };
            need_event(off, new.pos, new.pos.wrapping_sub(moved))
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_ring_starts_with_both_wrap_counters_set() {
        assert_eq!(EMPTY_RING_BASE, 0x8000_8000);
    }

    #[test]
    fn positions_wrap_and_flip_the_counter() {
        let p = Pos::START.add(7, 8);
        assert_eq!(p, Pos { pos: 7, wrap: true });
        let q = p.add(3, 8);
        assert_eq!(
            q,
            Pos {
                pos: 2,
                wrap: false
            }
        );
        assert_eq!(q.sub(3, 8), p);
        assert_eq!(p.until(q, 8), 3);
        assert_eq!(q.until(p, 8), 13);
        assert_eq!(Pos::decode(q.encode()), q);
        assert_eq!(Pos::START.encode(), 0x8000);
    }

    #[test]
    fn flags_follow_the_wrap_counter() {
        let a = Pos::START;
        assert!(a.is_avail(F_AVAIL));
        assert!(!a.is_avail(F_AVAIL | F_USED));
        assert!(a.is_used(F_AVAIL | F_USED));
        let b = a.add(8, 8);
        assert!(b.is_avail(F_USED));
        assert!(b.is_used(0));
        assert!(!b.is_used(F_AVAIL | F_USED));
    }

    #[test]
    fn event_offsets_count_in_the_right_lap() {
        let (old, new) = (
            Pos { pos: 6, wrap: true },
            Pos {
                pos: 2,
                wrap: false,
            },
        );
        // Asked at 7 (wrap 1): passed on the way.
        assert!(wants_event(EVENT_DESC, 7 | 0x8000, true, old, new, 8));
        // Asked at 1 (wrap 0): passed after the wrap.
        assert!(wants_event(EVENT_DESC, 1, true, old, new, 8));
        // Asked at 2 (wrap 0): not reached yet.
        assert!(!wants_event(EVENT_DESC, 2, true, old, new, 8));
        // Asked at 5 (wrap 1): before old, already signalled.
        assert!(!wants_event(EVENT_DESC, 5 | 0x8000, true, old, new, 8));
        assert!(wants_event(EVENT_DESC, 2, false, old, new, 8));
        assert!(!wants_event(EVENT_DISABLE, 0, true, old, new, 8));
        assert!(wants_event(EVENT_ENABLE, 0, true, old, new, 8));
    }
}
