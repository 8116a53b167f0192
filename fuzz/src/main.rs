//! `svq-fuzz TARGET --cases N [--seed S] [--replay FILE]`: feeds svq-relay's
//! own code the inputs a guest, a VMM, an operator and a device control. The
//! last line is always `TARGET: N cases, K failures`; each failing input is
//! written to a file whose name is printed, and `--replay FILE` runs it
//! again.

mod engine;
mod guard;
mod input;
mod mutate;
mod rng;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use targets::TargetName;

#[derive(Parser, Debug)]
#[command(version, about = "Fuzz svq-relay's input handling")]
struct Args {
    /// Which input to fuzz.
    #[arg(value_enum)]
    target: TargetName,
    /// Cases to run.
    #[arg(long, default_value_t = 10_000)]
    cases: u64,
    /// Seed of the run (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Run one saved input instead of fuzzing.
    #[arg(long, value_name = "FILE")]
    replay: Option<PathBuf>,
    /// Where failing inputs are written.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let name = args.target.name();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("svq-fuzz: cannot create {}: {e}", args.out.display());
        return ExitCode::from(2);
    }
    let run = engine::Run {
        name,
        seed,
        out_dir: &args.out,
    };
    guard::install(name, &run.crash_path().to_string_lossy());
    let mut target = match targets::build(args.target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("svq-fuzz: cannot set up {name}: {e}");
            return ExitCode::from(2);
        }
    };
    let summary = match &args.replay {
        Some(file) => match std::fs::read(file) {
            Ok(input) => run.replay(target.as_mut(), &input),
            Err(e) => {
                eprintln!("svq-fuzz: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        },
        None => run.fuzz(target.as_mut(), args.cases),
    };
    println!(
        "{name}: {} cases, {} failures",
        summary.cases, summary.failures
    );
    if summary.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
