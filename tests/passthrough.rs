//! Passthrough (--shadow off): the guest rings go straight to the sim device.
//! Every frame sent on TX 2k+1 comes back byte for byte on RX 2k.

use testkit::scenario::loopback;
use testkit::DriverOpts;

#[test]
fn passthrough_one_pair() {
    loopback("off", 1, DriverOpts::default(), 2000);
}

#[test]
fn passthrough_four_pairs() {
    loopback("off", 4, DriverOpts::default(), 1000);
}

#[test]
fn passthrough_one_pair_without_mrg_rxbuf() {
    loopback("off", 1, DriverOpts::no_mrg(), 500);
}

#[test]
fn passthrough_event_idx_indirect_merged_rx_buffers() {
    loopback("off", 2, DriverOpts::all_features(), 1500);
}

#[test]
fn passthrough_event_idx_without_mrg_rxbuf() {
    loopback(
        "off",
        1,
        DriverOpts {
            event_idx: true,
            ..DriverOpts::no_mrg()
        },
        1000,
    );
}

#[test]
fn passthrough_long_chains() {
    loopback(
        "off",
        1,
        DriverOpts {
            indirect: true,
            tx_segs: 40,
            rx_segs: 24,
            ..Default::default()
        },
        300,
    );
}

/// EVENT_IDX with interrupts requested only every 16 completions.
#[test]
fn passthrough_batched_interrupts() {
    loopback(
        "off",
        2,
        DriverOpts {
            event_idx: true,
            irq_batch: 16,
            ..Default::default()
        },
        1000,
    );
}
