//! Every target at 10^4 cases with a fixed seed, through the real binary
//! (debug build: overflow checks and debug assertions on), and a replay of
//! a saved input. The long runs are scripts/fuzz.sh.

use std::path::PathBuf;
use std::process::Command;

const CASES: u64 = 10_000;
const SEED: u64 = 1;

fn out_dir(target: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-smoke-{target}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("out dir");
    d
}

fn fuzz(target: &str) {
    let out = out_dir(target);
    let o = Command::new(env!("CARGO_BIN_EXE_svq-fuzz"))
        .args([
            target,
            "--cases",
            &CASES.to_string(),
            "--seed",
            &SEED.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run svq-fuzz");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let last = stdout.lines().last().unwrap_or("");
    assert_eq!(
        last,
        format!("{target}: {CASES} cases, 0 failures"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(o.status.success(), "exit {:?}", o.status);
    let saved: Vec<_> = std::fs::read_dir(&out).expect("read out dir").collect();
    assert!(saved.is_empty(), "no failing input saved, found {saved:?}");
}

#[test]
fn iova() {
    fuzz("iova");
}

#[test]
fn guest_ring() {
    fuzz("guest-ring");
}

#[test]
fn device_used() {
    fuzz("device-used");
}

#[test]
fn vhost_user() {
    fuzz("vhost-user");
}

#[test]
fn qmp() {
    fuzz("qmp");
}

#[test]
fn device_state() {
    fuzz("device-state");
}

#[test]
fn a_saved_input_replays_and_a_missing_one_is_a_setup_error() {
    let out = out_dir("replay");
    let ok = out.join("empty-vhost-user-stream.bin");
    std::fs::write(&ok, b"").expect("write input");
    let o = Command::new(env!("CARGO_BIN_EXE_svq-fuzz"))
        .args(["vhost-user", "--replay"])
        .arg(&ok)
        .output()
        .expect("run svq-fuzz");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().last(),
        Some("vhost-user: 1 cases, 0 failures")
    );
    assert!(o.status.success());
    // A missing file is a setup error (exit 2), not a pass.
    let o = Command::new(env!("CARGO_BIN_EXE_svq-fuzz"))
        .args(["iova", "--replay"])
        .arg(out.join("no-such-file"))
        .output()
        .expect("run svq-fuzz");
    assert_eq!(o.status.code(), Some(2));
}

/// Inputs that once failed (fuzz/regressions/TARGET/*.bin; the README's
/// Fuzzing section says what each was) replay clean.
#[test]
fn regression_inputs_replay_clean() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut n = 0;
    for target in std::fs::read_dir(&root).expect("fuzz/regressions") {
        let target = target.expect("entry").path();
        let name = target.file_name().unwrap().to_string_lossy().to_string();
        for input in std::fs::read_dir(&target).expect("target dir") {
            let input = input.expect("entry").path();
            let o = Command::new(env!("CARGO_BIN_EXE_svq-fuzz"))
                .args([name.as_str(), "--replay"])
                .arg(&input)
                .output()
                .expect("run svq-fuzz");
            assert_eq!(
                String::from_utf8_lossy(&o.stdout).lines().last(),
                Some(format!("{name}: 1 cases, 0 failures").as_str()),
                "{}:\n{}",
                input.display(),
                String::from_utf8_lossy(&o.stdout)
            );
            n += 1;
        }
    }
    assert!(
        n >= 3,
        "only {n} regression inputs found under {}",
        root.display()
    );
}
