//! Passthrough (--shadow off): the guest rings go straight to the sim
//! device; every frame sent on TX 2k+1 comes back byte for byte on RX 2k.

mod common;

#[test]
fn passthrough_one_pair() {
    common::scenario::loopback("off", 1, true, 2000);
}

#[test]
fn passthrough_four_pairs() {
    common::scenario::loopback("off", 4, true, 1000);
}

#[test]
fn passthrough_one_pair_without_mrg_rxbuf() {
    common::scenario::loopback("off", 1, false, 500);
}
