//! The eBPF datapath against a hostile workload (root; real cgroups, real kernel): what a
//! process inside an enforced endpoint's cgroup can try to get around the egress filter or
//! the redirect, and what an SRE's restart does to the allow entries.
//!
//! Tests marked `#[ignore]` demonstrate open findings of the datapath review (they fail on
//! the code as it is; each says why and what would fix it). Run them with
//! `cargo test -p dnsfence-tests --test datapath_attacks -- --include-ignored`.
use std::net::SocketAddr;
use std::process::Output;

use dnsfence_tests::bpf::{self, EXCLUSIVE, Env, TWO_ENDPOINTS, require_root};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig};

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}, {matchPattern: "*.kept.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}, {matchPattern: "*.kept.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: b}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.other.test"}]
  - toFQDNs: [{matchPattern: "*.other.test"}]
"#;

fn agent_config(env: &Env, upstream: SocketAddr, extra: &[&str]) -> AgentConfig {
    bpf::agent_config(env, upstream, POLICY, TWO_ENDPOINTS, extra)
}

/// The cgroups a (endpoint a), b (endpoint b) and c (no endpoint) below a fresh cgroup root,
/// a local upstream (TTL 300, answers in 127.77/16) and an agent.
fn start(tag: &str) -> (Env, Bundled, Agent) {
    let env = Env::new(tag, &["a", "b", "c"]);
    let upstream = Bundled::start(&["--ttl", "300", "--prefix4", "127.77.0.0/16"]);
    let agent = Agent::start(&agent_config(&env, upstream.addr, &[]));
    (env, upstream, agent)
}

/// Runs a script that moves itself between the cgroups of a (argv[1]) and b (argv[2]).
fn as_a_then_b(env: &Env, script: &str) -> String {
    let a = env.cgroup("a").display().to_string();
    let b = env.cgroup("b").display().to_string();
    python(env, None, script, &[&a, &b])
}

/// Runs a Python snippet inside a client's cgroup (None: outside every client cgroup).
fn python(env: &Env, client: Option<&str>, code: &str, args: &[&str]) -> String {
    let mut all = vec!["-c", code];
    all.extend_from_slice(args);
    let out: Output = env.run_in(client, "python3", &all);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Sends one hand-written TCP segment (flags as given) from a raw socket; prints `sent` or
/// the error's name.
const RAW_TCP: &str = "import socket,struct,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_TCP)\n\
seg=struct.pack('!HHIIBBHHH',4444,int(sys.argv[2]),1,1,5<<4,int(sys.argv[3]),1024,0,0)+b'exfil'\n\
try:\n    s.sendto(seg,(sys.argv[1],0)); print('sent')\n\
except Exception as e:\n    print(type(e).__name__)\n";

/// Sends one hand-written IPv4 packet that is a later fragment (offset 8) of a UDP datagram,
/// through an IP_HDRINCL raw socket.
const RAW_FRAGMENT: &str = "import socket,struct,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
data=b'exfiltrated-data'\n\
ip=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(data),0x1234,1,64,17,0,socket.inet_aton('127.0.0.1'),socket.inet_aton(sys.argv[1]))\n\
try:\n    s.sendto(ip+data,(sys.argv[1],0)); print('sent')\n\
except Exception as e:\n    print(type(e).__name__)\n";

/// Sends one hand-written UDP datagram (a DNS query header) from source port 4444 to
/// argv[1]:argv[2] through a raw socket.
const RAW_UDP: &str = "import socket,struct,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_UDP)\n\
q=struct.pack('!HHHHHH',7,0x100,0,0,0,0)\n\
dg=struct.pack('!HHHH',4444,int(sys.argv[2]),8+len(q),0)+q\n\
try:\n    s.sendto(dg,(sys.argv[1],0)); print('sent')\n\
except Exception as e:\n    print(type(e).__name__)\n";

#[test]
fn raw_sockets_of_an_enforced_endpoint_are_judged_packet_by_packet() {
    if !require_root("datapath_attacks") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let (env, _upstream, agent) = start("raw");
    let allowed = env.resolve("a", "www.allowed.test", "A", &[]).to_string();
    let never = "127.77.250.250";
    let raw = |client, dst: &str, port: &str, flags: &str| {
        python(&env, client, RAW_TCP, &[dst, port, flags])
    };
    // A SYN was always judged; an ACK, ACK|PSH or RST written by hand reached any address
    // (a one-way channel out, two-way with a raw receiver on both ends).
    for flags in ["2", "16", "24", "4"] {
        assert_eq!(
            raw(Some("a"), never, "443", flags),
            "PermissionError",
            "raw TCP flags {flags} to a never-resolved address"
        );
    }
    // Judged like a connection: allowed where the policy allows it, port-aware.
    assert_eq!(raw(Some("a"), &allowed, "443", "16"), "sent");
    assert_eq!(raw(Some("a"), &allowed, "80", "16"), "PermissionError");
    // Later IPv4 fragments carry no ports and passed unjudged: a raw socket can write one.
    assert_eq!(
        python(&env, Some("a"), RAW_FRAGMENT, &[never]),
        "PermissionError"
    );
    // A raw socket writes any source port, so it could record another socket's origin at
    // the proxy: its packets to the proxy record nothing and are judged like the others.
    let proxy_ip = agent.addr.ip().to_string();
    let proxy_port = agent.addr.port().to_string();
    assert_eq!(
        python(&env, Some("a"), RAW_UDP, &[&proxy_ip, &proxy_port]),
        "PermissionError"
    );
    // A raw socket made before its process joined a's cgroup (in c, of no endpoint) is
    // judged by its sender's endpoint: the egress program used to see only the socket's.
    let moved = format!(
        "import os,socket,struct,sys\n{MOVE}\
s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_TCP)\n\
move(sys.argv[1])\n\
try:\n    s.sendto(struct.pack('!HHIIBBHHH',4444,443,1,1,5<<4,16,1024,0,0),(sys.argv[2],0)); print('sent')\n\
except Exception as e:\n    print(type(e).__name__)\n"
    );
    let a = env.cgroup("a").display().to_string();
    assert_eq!(
        python(&env, Some("c"), &moved, &[&a, never]),
        "PermissionError"
    );
    assert_eq!(
        raw(Some("c"), never, "443", "16"),
        "sent",
        "c is no endpoint"
    );
    // Processes of no endpoint are untouched.
    assert_eq!(raw(None, never, "443", "16"), "sent");
    assert_eq!(python(&env, None, RAW_FRAGMENT, &[never]), "sent");
    let skb_denied = agent
        .metric("dnsfence_datapath_events_total")
        .into_iter()
        .find(|(labels, _)| labels == "event=\"skb_denied\"")
        .map(|(_, v)| v);
    assert!(skb_denied >= Some(8.0), "{skb_denied:?}");
}

/// Review finding (fixed): entries restored from the pinned map at start were judged by port
/// spec alone, so an agent restarted with a policy that drops a name (another toFQDNs name
/// keeping 443/TCP open) left the dropped name's addresses reachable until they expired (up
/// to 1.5 × `--max-ttl`). The justifying name now lives beside each entry in the pinned
/// `df_allow_names`, so a restarted agent judges restored entries by name.
#[test]
fn a_restart_with_a_narrower_policy_revokes_restored_entries() {
    if !require_root("datapath_attacks") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let (env, upstream, mut agent) = start("restart");
    let www = SocketAddr::new(env.resolve("a", "www.allowed.test", "A", &[]), 443);
    let _l = std::net::TcpListener::bind(www).expect("listen");
    assert!(!env.denied(Some("a"), www));
    agent.process.signal("KILL");
    agent
        .process
        .wait_timeout(std::time::Duration::from_secs(5));

    let mut narrower = agent_config(&env, upstream.addr, &[]);
    narrower.policy = POLICY.replace(
        "toFQDNs: [{matchPattern: \"*.allowed.test\"}, {matchPattern: \"*.kept.test\"}]",
        "toFQDNs: [{matchPattern: \"*.kept.test\"}]",
    );
    assert_ne!(narrower.policy, POLICY);
    narrower.listen = Some(agent.addr);
    let _agent2 = Agent::start(&narrower);
    assert!(
        env.denied(Some("a"), www),
        "www.allowed.test is no longer a toFQDNs name of a: its address must be closed"
    );
}

/// Moves the calling process into a cgroup, so one script can act as two workloads.
const MOVE: &str = "def move(cg):\n    open(cg + '/cgroup.procs', 'w').write(str(os.getpid()))\n";

/// `df_sock_dst` was an LRU map keyed by socket cookie, shared by every endpoint: a
/// workload (b) creating sockets that send to port 53 (unprivileged, about 3 s of tiny
/// datagrams) evicted the entry of another workload's (a) long-lived resolver socket, whose
/// queries were then judged against the proxy's address instead of the server it asked
/// (REFUSED) and whose answers came back unrestored (from the proxy). The server asked now
/// lives in socket-local storage (`df_sock_srv`).
#[test]
fn another_endpoint_cannot_evict_a_resolver_sockets_redirect_state() {
    if !require_root("datapath_attacks") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let (env, _upstream, _agent) = start("sockdst");
    let script = format!(
        "import os,socket,struct,random,sys\n{MOVE}\
def q(name):\n    return struct.pack('!HHHHHH',random.randrange(65536),0x100,1,0,0,0)+b''.join(bytes([len(l)])+l.encode() for l in name.split('.'))+b'\\0'+struct.pack('!HH',1,1)\n\
move(sys.argv[1])\n\
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2); s.connect(('192.0.2.53',53))\n\
def ask(name):\n    s.send(q(name)); d,a=s.recvfrom(1500); return 'rcode=%d from=%s:%d' % (d[3]&15, a[0], a[1])\n\
before=ask('v1.allowed.test')\n\
move(sys.argv[2])\n\
for i in range(200000):\n    f=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); f.sendto(b'\\0',('192.0.2.53',53)); f.close()\n\
move(sys.argv[1])\n\
print(before, '/', ask('v2.allowed.test'))\n"
    );
    let out = as_a_then_b(&env, &script);
    assert_eq!(
        out, "rcode=0 from=192.0.2.53:53 / rcode=0 from=192.0.2.53:53",
        "a's resolver socket, before and after b's flood"
    );
}

/// `df_origin` is an LRU map (65,536 entries) written at a TCP connection's SYN only. A
/// workload (b) sending from many source ports and loopback addresses evicts the origin of
/// another workload's (a) open TCP connection to the proxy; the proxy looked it up per query,
/// so a's next query on that connection was judged as an unknown source's (REFUSED). A shard
/// now keeps each connection's origin from its first query.
#[test]
fn another_endpoint_cannot_evict_the_origin_of_a_tcp_connection() {
    if !require_root("datapath_attacks") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let (env, _upstream, _agent) = start("origin");
    let script = format!(
        "import os,socket,struct,random,sys\n{MOVE}\
def q(name):\n    m=struct.pack('!HHHHHH',random.randrange(65536),0x100,1,0,0,0)+b''.join(bytes([len(l)])+l.encode() for l in name.split('.'))+b'\\0'+struct.pack('!HH',1,1)\n    return struct.pack('!H',len(m))+m\n\
move(sys.argv[1])\n\
s=socket.create_connection(('192.0.2.53',53),timeout=3)\n\
def ask(name):\n    s.sendall(q(name)); n=struct.unpack('!H',s.recv(2))[0]; d=s.recv(n); return 'rcode=%d' % (d[3]&15)\n\
before=ask('t1.allowed.test')\n\
move(sys.argv[2])\n\
for i in range(120000):\n    f=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); f.bind(('127.0.0.%d' % (2 + i % 4),0)); f.sendto(b'\\0',('192.0.2.53',53)); f.close()\n\
move(sys.argv[1])\n\
print(before, '/', ask('t2.allowed.test'))\n"
    );
    let out = as_a_then_b(&env, &script);
    assert_eq!(
        out, "rcode=0 / rcode=0",
        "a's TCP connection, before and after b's flood"
    );
}

/// Endpoint `a` may resolve `*.allowed.test` and send UDP to the world on port 9999.
const WORLD_UDP_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
  - toEntities: [world]
    toPorts: [{ports: [{port: "9999", protocol: UDP}]}]
"#;

/// One UDP datagram to argv[1]:argv[2] (argv[3]: `lsrr` with an IPv4 loose source route
/// through 127.0.0.99, `ts` with an IPv4 timestamp option, `srh` (`srh0`: with no segment
/// left) with an IPv6 segment routing header through ::1, `tos` from a
/// socket connected there and sent with an IP_TOS control message, else plain); prints
/// `sent` or the error's name.
const UDP_SEND: &str = r#"import socket,struct,sys
host,port,how=sys.argv[1],int(sys.argv[2]),sys.argv[3]
fam=socket.AF_INET6 if ':' in host else socket.AF_INET
s=socket.socket(fam,socket.SOCK_DGRAM)
try:
    if how=='lsrr':
        s.setsockopt(socket.IPPROTO_IP,socket.IP_OPTIONS,bytes([0x83,7,4,127,0,0,99,1]))
    if how=='ts':
        s.setsockopt(socket.IPPROTO_IP,socket.IP_OPTIONS,bytes([0x44,8,5,0,0,0,0,0]))
    if how=='srh':
        srh=bytes([0,4,4,1,1,0,0,0])+bytes(16)+socket.inet_pton(socket.AF_INET6,'::1')
        s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_RTHDR,srh)
    if how=='srh0':
        srh=bytes([0,2,4,0,0,0,0,0])+socket.inet_pton(socket.AF_INET6,'::1')
        s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_RTHDR,srh)
    q=struct.pack('!HHHHHH',7,0x100,0,0,0,0)
    if how=='tos':
        lvl,opt=(socket.IPPROTO_IPV6,socket.IPV6_TCLASS) if fam==socket.AF_INET6 else (socket.IPPROTO_IP,socket.IP_TOS)
        s.connect((host,port)); s.sendmsg([q],[(lvl,opt,struct.pack('i',0x10))])
    else:
        s.sendto(q,(host,port))
    print('sent')
except Exception as e:
    print(type(e).__name__)
"#;

/// Review findings (fixed): a source route (IPv4 options, an IPv6 routing header) sent an
/// enforced endpoint's UDP, and established TCP, to its first hop, which no hook judged; a
/// datagram to 0.0.0.0 reached the node's own services under a `world` rule; and a connected
/// socket's send with a control message (IP_TOS, ECN) was refused, the kernel running the
/// sendmsg hook with a zeroed address.
#[test]
fn source_routes_unspecified_addresses_and_control_messages() {
    if !require_root("datapath_attacks") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("routes", &["a", "b", "c"]);
    let upstream = Bundled::start(&["--ttl", "300", "--prefix4", "127.77.0.0/16"]);
    let _agent = Agent::start(&bpf::agent_config(
        &env,
        upstream.addr,
        WORLD_UDP_POLICY,
        TWO_ENDPOINTS,
        &[],
    ));
    let send = |client, host: &str, port: &str, how: &str| {
        python(&env, client, UDP_SEND, &[host, port, how])
    };
    let dns = bpf::server();
    let (dns_ip, dns_port) = (dns.ip().to_string(), dns.port().to_string());
    // Plain sends: the redirected DNS and the world on 9999 go; the node does not.
    assert_eq!(send(Some("a"), &dns_ip, &dns_port, "plain"), "sent");
    assert_eq!(send(Some("a"), "2001:db8::1", "9999", "plain"), "sent");
    assert_eq!(
        send(Some("a"), "192.0.2.9", "9998", "plain"),
        "PermissionError"
    );
    // 0.0.0.0 and :: are the node, not the world.
    assert_eq!(
        send(Some("a"), "0.0.0.0", "9999", "plain"),
        "PermissionError"
    );
    assert_eq!(send(Some("a"), "::", "9999", "plain"), "PermissionError");
    // A source route's first hop is the packet's destination: refused, whatever the hooks
    // judged (the redirected DNS, a world address).
    assert_eq!(
        send(Some("a"), &dns_ip, &dns_port, "lsrr"),
        "PermissionError"
    );
    assert_eq!(
        send(Some("a"), "2001:db8::1", "9999", "srh"),
        "PermissionError"
    );
    // A segment routing header with no segment left still sends to its segment.
    assert_eq!(
        send(Some("a"), "2001:db8::1", "9999", "srh0"),
        "PermissionError"
    );
    // Options that do not route (a timestamp option; a server echoes its clients' options)
    // pass.
    assert_eq!(send(Some("a"), &dns_ip, &dns_port, "ts"), "sent");
    // A connected socket's send with a control message goes where connect put it.
    assert_eq!(send(Some("a"), &dns_ip, &dns_port, "tos"), "sent");
    assert_eq!(send(Some("a"), "2001:db8::1", "9999", "tos"), "sent");
    // Processes of no endpoint are untouched.
    assert_eq!(send(Some("c"), &dns_ip, &dns_port, "lsrr"), "sent");
    assert_eq!(send(Some("c"), "0.0.0.0", "9999", "plain"), "sent");
}
