//! Shadow mode (--shadow on): every buffer goes through the relay's shadow
//! virtqueues; every frame must still come back byte for byte, and the
//! relay's counters must match what the driver saw.

mod common;

#[test]
fn shadow_one_pair() {
    common::scenario::loopback("on", 1, true, 2000);
}

#[test]
fn shadow_four_pairs() {
    common::scenario::loopback("on", 4, true, 1000);
}

#[test]
fn shadow_one_pair_without_mrg_rxbuf() {
    common::scenario::loopback("on", 1, false, 500);
}
