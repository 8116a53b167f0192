//! The `svq-vduse-net` binary: the software NIC as a VDUSE device. Arguments
//! into a config, the device created, served until SIGTERM/SIGINT, then its
//! counters printed and the device destroyed.

use std::io::Write;
use std::process::ExitCode;

use backends::vduse::VduseDevice;
use clap::Parser;
use svq_relay::vduse_cli::{VduseArgs, VduseCommand};

fn die(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "svq-vduse-net: error: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args = match VduseArgs::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let cmd = match VduseCommand::try_from(args) {
        Ok(c) => c,
        Err(e) => return die(e),
    };
    env_logger::Builder::new()
        .filter_level(cmd.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_micros()
        .init();
    let sig = match svq_relay::signals::install() {
        Ok(s) => s,
        Err(e) => return die(format!("signal setup: {e}")),
    };
    let mut dev = match VduseDevice::create(cmd.device) {
        Ok(d) => d,
        Err(e) => return die(e),
    };
    let name = dev.name().to_string();
    println!("svq-vduse-net: /dev/vduse/{name} ready: add it with `vdpa dev add name {name} mgmtdev vduse`");
    let _ = std::io::stdout().flush();
    let result = dev.server().run(&sig);
    let server = dev.server();
    let s = server.stats();
    println!(
        "svq-vduse-net: {name}: requests {} (failed {}), iotlb updates {}, maps {}, unmaps {}, irqs {}, resets {}",
        s.requests, s.failed, s.iotlb_updates, s.maps, s.unmaps, s.irqs, s.resets
    );
    for q in 0..server.num_queues() {
        if let Some(st) = server.queue_stats(q) {
            let dir = if q % 2 == 0 { "rx" } else { "tx" };
            println!(
                "svq-vduse-net: {name}: queue {q} ({dir}): packets {} bytes {} errors {} dropped {}",
                st.packets, st.bytes, st.errors, st.dropped
            );
        }
    }
    let _ = std::io::stdout().flush();
    drop(dev);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => die(e),
    }
}
