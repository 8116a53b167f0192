//! The `svq-relay` binary: arguments into a `Config`, logging set up, then
//! the server (or `--print-capabilities`); every failure is one message a
//! person can act on and a non-zero exit.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use svq_relay::cli::{capabilities_json, Args, Command, Config};

fn die(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "svq-relay: error: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's first line, without its own "error: " prefix.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return die(first.trim_start_matches("error: "));
        }
    };
    let cfg = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => return die(e),
    };
    env_logger::Builder::new()
        .filter_level(cfg.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_micros()
        .init();
    match cfg.command {
        Command::PrintCapabilities => {
            println!(
                "{}",
                svq_relay::capabilities::with_migration(&capabilities_json())
            );
            ExitCode::SUCCESS
        }
        Command::Run(run) => match svq_relay::server::run(run) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => die(e),
        },
    }
}
