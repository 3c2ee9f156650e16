//! `dnsfence match` as users and scripts call it (shared/spec/interfaces.md).

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn dnsfence(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dnsfence");
    // With names as arguments dnsfence does not read stdin and may exit before this write:
    // a broken pipe then is expected, not an error of the test.
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing stdin: {e}"
        );
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[test]
fn name_from_stdin_matches() {
    let out = dnsfence(&["match", "--pattern", "*.cilium.io"], "sub.cilium.io\n");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "sub.cilium.io\tmatch\n");
}

#[test]
fn names_from_arguments_in_order_echoed_as_given() {
    let out = dnsfence(
        &[
            "match",
            "--pattern",
            "*.cilium.io",
            "--pattern",
            "api.stripe.com",
            "cilium.io",
            "A.Cilium.IO.",
            "API.stripe.com",
            "a.b.cilium.io",
        ],
        "ignored.cilium.io\n",
    );
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        "cilium.io\tnomatch\nA.Cilium.IO.\tmatch\nAPI.stripe.com\tmatch\na.b.cilium.io\tnomatch\n"
    );
}

#[test]
fn empty_line_is_the_empty_name() {
    let out = dnsfence(&["match", "--pattern", "*"], "\nexample.com\n\n");
    assert_eq!(text(&out.stdout), "\tmatch\nexample.com\tmatch\n\tmatch\n");
    let out = dnsfence(&["match", "--pattern", "*.com"], "\nbad..com\n");
    assert_eq!(text(&out.stdout), "\tnomatch\nbad..com\tnomatch\n");
}

#[test]
fn invalid_pattern_exits_2_with_one_line() {
    let out = dnsfence(&["match", "--pattern", "a..b", "x"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("a..b") && err.contains("empty label"), "{err}");
}

#[test]
fn patterns_file_skips_comments_and_reports_line() {
    let dir = std::env::temp_dir().join(format!("dnsfence-match-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.txt");
    std::fs::write(
        &good,
        "# allow list\n\n  **.s3.amazonaws.com  \napi.stripe.com\n",
    )
    .unwrap();
    let out = dnsfence(
        &["match", "--patterns-file", good.to_str().unwrap()],
        "b.x.s3.amazonaws.com\ns3.amazonaws.com\napi.stripe.com\n",
    );
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        "b.x.s3.amazonaws.com\tmatch\ns3.amazonaws.com\tnomatch\napi.stripe.com\tmatch\n"
    );

    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "ok.com\n# c\nbad/name.com\n").unwrap();
    let out = dnsfence(
        &["match", "--patterns-file", bad.to_str().unwrap(), "ok.com"],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.txt:3") && err.contains("bad/name.com"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
