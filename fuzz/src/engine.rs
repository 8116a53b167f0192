//! The loop: generate or mutate an input, run it under the guards, keep the
//! failures. No coverage feedback (stable Rust, no sanitizer runtime):
//! structure comes from each target's generator, variety from mutating a
//! corpus that also keeps some of the mutated inputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::guard;
use crate::mutate::mutate;
use crate::rng::Rng;

/// One kind of input the daemon takes, and what must hold after it.
pub trait Target {
    /// A structurally valid input (a well-formed ring, message stream, ...).
    fn generate(&mut self, rng: &mut Rng) -> Vec<u8>;
    /// Feed one input to the daemon's code. `Err` names a broken invariant.
    fn run(&mut self, input: &[u8]) -> Result<(), String>;
    /// Longest input worth trying.
    fn max_len(&self) -> usize {
        4096
    }
}

const CORPUS: usize = 64;
/// Failing inputs written to disk per run (all are counted).
const MAX_SAVED: u64 = 20;

pub struct Run<'a> {
    pub name: &'a str,
    pub seed: u64,
    pub out_dir: &'a Path,
}

pub struct Summary {
    pub cases: u64,
    pub failures: u64,
}

impl Run<'_> {
    pub fn fuzz(&self, target: &mut dyn Target, cases: u64) -> Summary {
        let mut rng = Rng::new(self.seed);
        let mut corpus: Vec<Vec<u8>> = Vec::new();
        let mut failures = 0;
        let start = Instant::now();
        for case in 0..cases {
            let fresh = corpus.len() < CORPUS || rng.one_in(4);
            let input = if fresh {
                target.generate(&mut rng)
            } else {
                let mut d = rng.pick(&corpus).clone();
                let other = rng.pick(&corpus).clone();
                mutate(&mut rng, &mut d, &other, target.max_len());
                d
            };
            if let Err(why) = self.one(target, &input) {
                failures += 1;
                self.report(case, &why, &input, failures <= MAX_SAVED);
            }
            if corpus.len() < CORPUS {
                corpus.push(input);
            } else if rng.one_in(8) {
                let i = rng.below(CORPUS as u64) as usize;
                corpus[i] = input;
            }
        }
        eprintln!(
            "{}: {cases} cases in {:.1} s (seed {})",
            self.name,
            start.elapsed().as_secs_f64(),
            self.seed
        );
        Summary { cases, failures }
    }

    pub fn replay(&self, target: &mut dyn Target, input: &[u8]) -> Summary {
        let failures = match self.one(target, input) {
            Ok(()) => 0,
            Err(why) => {
                println!("FAIL: {why}");
                1
            }
        };
        Summary { cases: 1, failures }
    }

    fn one(&self, target: &mut dyn Target, input: &[u8]) -> Result<(), String> {
        guard::begin_case(input);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.run(input)));
        guard::end_case();
        // A panic on another thread (a worker) counts for this case too.
        let other = guard::take_panic();
        match r {
            Ok(Ok(())) => other.map_or(Ok(()), Err),
            Ok(Err(why)) => Err(why),
            Err(_) => Err(other.unwrap_or_else(|| "panic".into())),
        }
    }

    fn report(&self, case: u64, why: &str, input: &[u8], save: bool) {
        if !save {
            println!("FAIL case {case}: {why}");
            return;
        }
        let path = self.failure_path(case);
        match std::fs::write(&path, input) {
            Ok(()) => println!("FAIL case {case}: {why}; input in {}", path.display()),
            Err(e) => println!(
                "FAIL case {case}: {why}; cannot save the input to {}: {e}",
                path.display()
            ),
        }
    }

    pub fn failure_path(&self, case: u64) -> PathBuf {
        self.out_dir
            .join(format!("svq-fuzz-{}-{}-{case}.bin", self.name, self.seed))
    }

    pub fn crash_path(&self) -> PathBuf {
        self.out_dir
            .join(format!("svq-fuzz-{}-{}-crash.bin", self.name, self.seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails on inputs holding 0xAA, panics on inputs holding 0xBB.
    struct Picky;

    impl Target for Picky {
        fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
            rng.bytes(4)
        }
        fn run(&mut self, input: &[u8]) -> Result<(), String> {
            assert!(!input.contains(&0xbb), "0xBB");
            match input.contains(&0xaa) {
                true => Err("0xAA".into()),
                false => Ok(()),
            }
        }
    }

    #[test]
    fn failures_are_counted_saved_and_replay() {
        let dir = std::env::temp_dir().join(format!("svq-fuzz-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let run = Run {
            name: "picky",
            seed: 3,
            out_dir: &dir,
        };
        let s = run.fuzz(&mut Picky, 2000);
        assert_eq!(s.cases, 2000);
        assert!(
            s.failures > 0,
            "4 random bytes hold 0xAA or 0xBB often enough"
        );
        let saved: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("read dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(saved.len() as u64, s.failures.min(MAX_SAVED));
        for p in &saved {
            let input = std::fs::read(p).expect("saved input");
            assert!(input.contains(&0xaa) || input.contains(&0xbb), "{p:?}");
            assert_eq!(
                run.replay(&mut Picky, &input).failures,
                1,
                "{p:?} fails again"
            );
        }
        assert_eq!(run.replay(&mut Picky, &[1, 2, 3]).failures, 0);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
