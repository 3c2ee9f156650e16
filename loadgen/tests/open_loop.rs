//! Open loop: a server that stops answering for 2 s does not slow the sending down, and the
//! stall shows up as timeouts in the seconds it covers.

mod common;

use std::time::Duration;

use common::{UpstreamProcess, query_file, run_json, u};

#[test]
fn stalled_server_shows_as_timeouts_not_as_a_lower_rate() {
    // The upstream's clock starts a little before the load generator's: stall from 1.0 s to
    // 3.0 s of the upstream is roughly seconds 1 and 2 of the run.
    let upstream = UpstreamProcess::start(&["--stall-after", "1", "--stall-for", "2"]);
    let queries = query_file("stall", "a.example A\nb.example AAAA\n");
    let server = upstream.addr.to_string();
    let report = run_json(
        &[
            "--server",
            &server,
            "--queries",
            queries.to_str().unwrap(),
            "--rate",
            "2000",
            "--duration",
            "4",
            "--timeout",
            "400",
        ],
        Duration::from_secs(15),
    );
    let sent = u(&report, "sent");
    assert_eq!(sent, 8000);
    let timeouts = u(&report, "timeouts");
    // About 2 s of 2000 qps (the two clocks are a few ms apart).
    assert!((3_600..=4_400).contains(&timeouts), "timeouts {timeouts}");
    assert_eq!(u(&report, "answered") + timeouts, sent);
    let timeline = report["timeline"].as_array().expect("timeline");
    for row in timeline {
        let s = u(row, "sent");
        assert!(
            (1_950..=2_050).contains(&s),
            "send rate dropped: {timeline:?}"
        );
    }
    assert!(u(&timeline[0], "timeouts") < 200, "{timeline:?}");
    assert!(u(&timeline[1], "timeouts") > 1_700, "{timeline:?}");
    assert!(u(&timeline[2], "timeouts") > 1_700, "{timeline:?}");
    assert!(u(&timeline[3], "answered") > 1_800, "{timeline:?}");
    assert!(report["max_send_lag_us"].as_u64().unwrap() < 200_000);
    assert_eq!(upstream.terminate(), Some(0));
}

#[test]
fn latency_matches_a_known_server_delay() {
    let upstream = UpstreamProcess::start(&["--delay-ms", "100"]);
    let queries = query_file("delay", "a.example A\n");
    let server = upstream.addr.to_string();
    let report = run_json(
        &[
            "--server",
            &server,
            "--queries",
            queries.to_str().unwrap(),
            "--rate",
            "100",
            "--duration",
            "1",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(u(&report, "answered"), 100);
    let latency = &report["latency_us"];
    let p50 = u(latency, "p50");
    assert!((100_000..=115_000).contains(&p50), "{latency}");
    assert!(u(latency, "max") < 200_000, "{latency}");
    assert_eq!(upstream.terminate(), Some(0));
}
