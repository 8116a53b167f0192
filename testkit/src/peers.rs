//! The one rule for a peer a machine does not have (testpmd, QEMU and its
//! guest assets): the test prints why it skips, unless
//! `SVQ_RELAY_REQUIRE_PEERS` is set (to anything but `0` or nothing, as
//! `.ci/run` does), where a missing peer fails the test instead.

/// The environment variable that makes every peer mandatory.
pub const REQUIRE_PEERS: &str = "SVQ_RELAY_REQUIRE_PEERS";

/// The testpmd binary from Debian's `dpdk-dev`.
pub const TESTPMD: &str = "dpdk-testpmd";

/// Whether missing peers fail (CI) rather than skip.
pub fn peers_required() -> bool {
    std::env::var_os(REQUIRE_PEERS).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Print why the calling test skips, or fail it when peers are required.
pub fn missing_peer(why: &str) {
    assert!(!peers_required(), "{why}, but {REQUIRE_PEERS} is set");
    eprintln!("skipping: {why}");
}

/// `cmd` is an executable file in a directory of `PATH`.
pub fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

pub fn testpmd_installed() -> bool {
    on_path(TESTPMD)
}

/// True when testpmd can be used; otherwise the calling test returns (see
/// the module rule).
pub fn testpmd_or_skip() -> bool {
    if testpmd_installed() {
        return true;
    }
    missing_peer("dpdk-testpmd not installed");
    false
}
