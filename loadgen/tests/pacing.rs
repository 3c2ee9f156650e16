//! Pacing accuracy: 20k qps for 5 s against the bundled upstream.

mod common;

use std::time::Duration;

use common::{UpstreamProcess, query_file, run_json, u};

#[test]
fn sends_at_the_requested_rate_evenly() {
    let upstream = UpstreamProcess::start(&[]);
    let queries = query_file(
        "pacing",
        "www.example.com A\napi.example.org AAAA\nnxdomain-x.test A\nWWW.Example.NET. A\n",
    );
    let server = upstream.addr.to_string();
    let report = run_json(
        &[
            "--server",
            &server,
            "--queries",
            queries.to_str().unwrap(),
            "--rate",
            "20000",
            "--duration",
            "5",
            "--timeout",
            "500",
        ],
        Duration::from_secs(20),
    );
    let sent = u(&report, "sent");
    assert!(
        (98_000..=102_000).contains(&sent),
        "sent {sent}, expected 100000 +-2%"
    );
    let answered = u(&report, "answered");
    assert!(answered * 100 >= sent * 99, "answered {answered} of {sent}");
    assert_eq!(u(&report, "mismatched"), 0);
    let timeline = report["timeline"].as_array().expect("timeline");
    assert_eq!(timeline.len(), 5, "{timeline:?}");
    for row in timeline {
        let s = u(row, "sent");
        assert!(
            (19_400..=20_600).contains(&s),
            "uneven second: {row} in {timeline:?}"
        );
    }
    assert!(report["rcodes"]["NXDOMAIN"].as_u64().unwrap() > 20_000);
    let qps = report["qps"].as_f64().unwrap();
    assert!((19_000.0..=20_500.0).contains(&qps), "qps {qps}");
    assert_eq!(upstream.terminate(), Some(0));
}
