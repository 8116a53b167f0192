//! Shadow mode (--shadow on): every buffer goes through the relay's shadow
//! virtqueues, and the relay's counters must match what the driver saw.
//! Every frame sent on TX 2k+1 comes back byte for byte on RX 2k.

use testkit::scenario::loopback;
use testkit::DriverOpts;

#[test]
fn shadow_one_pair() {
    loopback("on", 1, DriverOpts::default(), 2000);
}

#[test]
fn shadow_four_pairs() {
    loopback("on", 4, DriverOpts::default(), 1000);
}

#[test]
fn shadow_one_pair_without_mrg_rxbuf() {
    loopback("on", 1, DriverOpts::no_mrg(), 500);
}

#[test]
fn shadow_event_idx_indirect_merged_rx_buffers() {
    loopback("on", 2, DriverOpts::all_features(), 1500);
}

#[test]
fn shadow_event_idx_without_mrg_rxbuf() {
    loopback(
        "on",
        1,
        DriverOpts {
            event_idx: true,
            ..DriverOpts::no_mrg()
        },
        1000,
    );
}

/// Chains of many segments: a TX frame in 40 pieces, RX buffers in 24
/// pieces (the header itself split), half of them through indirect tables
/// longer than the relay would like to put in its shadow ring at once.
#[test]
fn shadow_long_chains() {
    loopback(
        "on",
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

#[test]
fn shadow_long_chains_merged_small_buffers() {
    loopback(
        "on",
        1,
        DriverOpts {
            indirect: true,
            event_idx: true,
            tx_segs: 7,
            rx_segs: 5,
            rx_buf_size: 256,
            ..Default::default()
        },
        300,
    );
}

/// EVENT_IDX with interrupts requested only every 16 completions.
#[test]
fn shadow_batched_interrupts() {
    loopback(
        "on",
        2,
        DriverOpts {
            event_idx: true,
            irq_batch: 16,
            ..Default::default()
        },
        1000,
    );
}
