//! The report: required JSON fields, the human form, and timed scenario actions.

mod common;

use std::time::Duration;

use common::{UpstreamProcess, query_file, run_json, run_loadgen, temp_dir, u};

#[test]
fn json_carries_every_required_field() {
    let upstream = UpstreamProcess::start(&[]);
    let queries = query_file(
        "fields",
        "ok.example A\nservfail-a.example A\nrefused-b.example AAAA\nnxdomain-c.example A\n",
    );
    let server = upstream.addr.to_string();
    let report = run_json(
        &[
            "--server",
            &server,
            "--queries",
            queries.to_str().unwrap(),
            "--rate",
            "400",
            "--duration",
            "1",
            "--sockets",
            "4",
        ],
        Duration::from_secs(10),
    );
    for key in ["sent", "answered", "timeouts"] {
        assert!(report[key].is_u64(), "{key}: {report}");
    }
    assert!(report["qps"].is_number());
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_us"][key].is_u64(), "latency_us.{key}");
    }
    let rcodes = &report["rcodes"];
    for key in ["NOERROR", "SERVFAIL", "REFUSED", "NXDOMAIN"] {
        assert_eq!(rcodes[key].as_u64(), Some(100), "rcodes.{key}: {rcodes}");
    }
    let timeline = report["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 1);
    for key in ["sent", "answered", "timeouts", "p99_us"] {
        assert!(timeline[0][key].is_u64(), "timeline.{key}");
    }
    assert_eq!(u(&report, "sent"), 400);
    assert_eq!(u(&report, "answered"), 400);
    assert!(report["events"].as_array().unwrap().is_empty());
    assert!(report["cpu_us_per_query"].is_number());
    assert!(u(&report["latency_us"], "p50") <= u(&report["latency_us"], "max"));
    assert_eq!(upstream.terminate(), Some(0));
}

#[test]
fn timed_actions_run_at_their_second_and_are_reported() {
    let upstream = UpstreamProcess::start(&[]);
    let dir = temp_dir("scenario");
    let marker = dir.join("touched");
    let scenario = dir.join("scenario.txt");
    std::fs::write(&scenario, "# comment\n0.5 exit 3\n").unwrap();
    let queries = query_file("scenario", "a.example A\n");
    let server = upstream.addr.to_string();
    let at = format!("1:touch {}", marker.display());
    let args = [
        "--server",
        &server,
        "--queries",
        queries.to_str().unwrap(),
        "--rate",
        "200",
        "--duration",
        "2",
        "--at",
        &at,
        "--scenario",
        scenario.to_str().unwrap(),
    ];
    let report = run_json(&args, Duration::from_secs(10));
    assert!(marker.exists(), "the --at command did not run");
    let events = report["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["command"], "exit 3");
    assert_eq!(events[0]["exit"], 3);
    let t0 = events[0]["t_s"].as_f64().unwrap();
    assert!((0.5..0.8).contains(&t0), "{events:?}");
    assert_eq!(events[1]["command"], at.split_once(':').unwrap().1);
    assert_eq!(events[1]["exit"], 0);
    let t1 = events[1]["t_s"].as_f64().unwrap();
    assert!((1.0..1.3).contains(&t1), "{events:?}");

    // The human form marks the event on its second's row.
    std::fs::remove_file(&marker).unwrap();
    let (code, text) = run_loadgen(&args, Duration::from_secs(10));
    assert_eq!(code, Some(0));
    let row = text
        .lines()
        .find(|l| l.contains("touch"))
        .unwrap_or_else(|| panic!("no event marker in:\n{text}"));
    assert!(row.trim_start().starts_with("1 "), "{row}");
    assert!(row.contains("(exit 0)"), "{row}");
    assert!(text.contains("sent 400"), "{text}");
    assert!(marker.exists());
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(upstream.terminate(), Some(0));
}

#[test]
fn bad_arguments_fail_cleanly() {
    let queries = query_file("bad", "a.example BOGUS\n");
    let (code, out) = run_loadgen(
        &[
            "--server",
            "127.0.0.1:9",
            "--queries",
            queries.to_str().unwrap(),
            "--rate",
            "10",
            "--duration",
            "1",
        ],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "{out}");
    let (code, _) = run_loadgen(&["--rate", "10"], Duration::from_secs(5));
    assert_eq!(code, Some(2));
}
