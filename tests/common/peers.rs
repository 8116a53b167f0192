//! Real peers the tests drive (DPDK testpmd) and the CI rule for them.

/// The testpmd binary from Debian's `dpdk-dev`.
pub const TESTPMD: &str = "dpdk-testpmd";

pub fn testpmd_installed() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(TESTPMD).is_file()))
        .unwrap_or(false)
}

/// True when testpmd can be used. Otherwise the calling test should return:
/// it prints why it skips, unless SVQ_RELAY_REQUIRE_PEERS is set (CI), where
/// a missing peer fails the test instead.
pub fn testpmd_or_skip() -> bool {
    if testpmd_installed() {
        return true;
    }
    missing_peer("dpdk-testpmd not installed");
    false
}

/// The one rule for a peer a test cannot have: print why it skips, or,
/// with SVQ_RELAY_REQUIRE_PEERS set (CI), fail.
pub fn missing_peer(why: &str) {
    assert!(
        std::env::var_os("SVQ_RELAY_REQUIRE_PEERS").is_none(),
        "{why}, but SVQ_RELAY_REQUIRE_PEERS is set"
    );
    eprintln!("skipping: {why}");
}
