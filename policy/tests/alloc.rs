//! Snapshot queries allocate nothing: a counting global allocator watches a warm query loop.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use dnsfence_matcher::Name;
use dnsfence_policy::{DnsVerdict, Endpoints, PolicySet, Proto, Snapshot};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn queries_do_not_allocate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let policies = PolicySet::load(&[dir.join("spec-example.yaml")]).unwrap();
    let endpoints = Endpoints::load(&dir.join("spec-example-endpoints.yaml")).unwrap();
    let snapshot = Snapshot::compile(&policies, &endpoints);
    let uploader = snapshot.endpoint_by_name("team-a/uploader").unwrap();
    let other = snapshot.endpoint_by_name("team-a/other").unwrap();
    let kube_dns: SocketAddr = "10.96.0.10:53".parse().unwrap();
    let names: Vec<Name> = ["bbc.co.uk", "api.stripe.com", "x.s3.amazonaws.com", "nope."]
        .iter()
        .map(|n| Name::from_text(n).unwrap())
        .collect();
    let mut rules = snapshot.rule_set();
    let source = "fd00::5".parse().unwrap();

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut allowed = 0;
    for _ in 0..100 {
        for name in &names {
            let ep = snapshot.endpoint_by_ip(source).unwrap();
            assert_eq!(snapshot.endpoint_by_cgroup("/workloads/uploader"), Some(ep));
            if snapshot.dns_verdict(ep, kube_dns, Proto::Udp, name) == DnsVerdict::Allow {
                allowed += 1;
            }
            if snapshot.fqdn_rules(ep, name, &mut rules) {
                allowed += snapshot.rule_ports(rules.as_slice()[0]).len();
            }
            let v = snapshot.dns_verdict(other, kube_dns, Proto::Tcp, name);
            assert_eq!(v, DnsVerdict::Unrestricted);
        }
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(after - before, 0, "queries allocated");
    assert_eq!(uploader, snapshot.endpoint_by_ip(source).unwrap());
    assert_eq!(allowed, 100 * (4 + 2));
}
