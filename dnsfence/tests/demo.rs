//! `dnsfence demo` runs its proof end to end: real processes, real SIGKILLs and SIGTERMs
//! (in eBPF mode as root, as CI runs it).

use std::path::PathBuf;
use std::process::Command;

fn loadgen_next_to_dnsfence() -> PathBuf {
    let dnsfence = PathBuf::from(env!("CARGO_BIN_EXE_dnsfence"));
    let loadgen = dnsfence.with_file_name("dnsfence-loadgen");
    if !loadgen.exists() {
        // `cargo test -p dnsfence` alone does not build the other package's binary.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "dnsfence-loadgen"]);
        if dnsfence.parent().and_then(|p| p.file_name()) == Some("release".as_ref()) {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "building dnsfence-loadgen"
        );
    }
    loadgen
}

#[test]
fn demo_proof_holds_through_crashes_and_graceful_restarts() {
    assert!(loadgen_next_to_dnsfence().exists());
    let out = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(["demo", "--rate", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("proof holds"), "{stdout}");
    for event in [
        "agent killed (SIGKILL)",
        "proxy killed (SIGKILL)",
        "agent stopped (SIGTERM)",
        "proxy stopped (SIGTERM)",
    ] {
        assert!(stdout.contains(event), "{event}: {stdout}");
    }
    assert!(
        stdout.contains("lost on graceful restarts:    0 "),
        "{stdout}"
    );
    assert!(
        stdout.contains("denied names answered else:   0 "),
        "{stdout}"
    );
    assert!(
        stdout.contains("denied names at the upstream: 0 "),
        "{stdout}"
    );
    assert!(
        stdout.contains("every restart served:         yes"),
        "{stdout}"
    );
}
