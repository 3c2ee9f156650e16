//! The eBPF datapath's test environment: a cgroup v2 subtree with client cgroups, a bpffs
//! pin directory, blackhole routes for the test DNS servers 192.0.2.53 and 2001:db8::53 (so a DNS query that escaped redirection
//! can never leave the machine), and clients run inside a cgroup (dig, a connect probe).
//!
//! These tests need root (CI runs them as root). Without root they fail with the reason,
//! unless `DNSFENCE_SKIP_ROOT_TESTS=1` is set, in which case they print that they skipped.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use dnsfence_datapath::{Datapath, InstallConfig};
use dnsfence_policy::{Endpoints, PolicySet, Snapshot};

use crate::dns::{DigResult, parse_dig};

/// Where the tests mount their cgroup v2 hierarchy when the host has none mounted there.
const CGROUP2_MOUNT: &str = "/run/dnsfence-test-cgroup2";

/// The DNS server the clients address: TEST-NET-1, blackholed; only redirection answers.
pub fn server() -> SocketAddr {
    "192.0.2.53:53".parse().expect("address")
}

/// Two endpoints of the datapath tests, `a` and `b`, recognised by cgroup only.
pub const TWO_ENDPOINTS: &str = r#"endpoints:
- {name: a, namespace: default, labels: {app: a}, cgroup: a}
- {name: b, namespace: default, labels: {app: b}, cgroup: b}
"#;

/// An agent in eBPF mode on `env`'s pins and cgroup root, with these files and flags.
pub fn agent_config(
    env: &Env,
    upstream: SocketAddr,
    policy: &str,
    endpoints: &str,
    extra: &[&str],
) -> crate::AgentConfig {
    let mut config = crate::AgentConfig::new(crate::IoBackend::Uring, upstream).args(extra);
    config.policy = policy.to_owned();
    config.endpoints = endpoints.to_owned();
    config.bpf = Some((env.pin.clone(), env.cgroup_root.clone()));
    config
}

/// The policy of the agent + proxy datapath tests: endpoint `a` may resolve `*.allowed.test`
/// and reach those names on 443/TCP.
pub const A_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

/// The agent (or with `proxy`, the standalone proxy) of an agent + proxy pair in eBPF mode on
/// `env`: [`A_POLICY`], [`TWO_ENDPOINTS`], the sync socket and state directories under `dir`,
/// both on 127.0.0.1:`port`.
pub fn pair_config(
    env: &Env,
    dir: &crate::TempDir,
    upstream: SocketAddr,
    port: u16,
    proxy: bool,
) -> crate::AgentConfig {
    let socket = dir.path().join("agent.sock");
    let state = dir
        .path()
        .join(if proxy { "proxy-state" } else { "agent-state" });
    let mut c = agent_config(
        env,
        upstream,
        A_POLICY,
        TWO_ENDPOINTS,
        &[
            "--agent-socket",
            socket.to_str().expect("utf-8"),
            "--state-dir",
            state.to_str().expect("utf-8"),
        ],
    );
    c.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    c.proxy = proxy;
    c
}

/// Serialises the datapath tests of one test binary (they share the blackhole route).
pub static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Whether this process may use BPF, cgroups and routes; prints and returns false when the
/// tests are explicitly skipped, panics with the reason otherwise.
pub fn require_root(test: &str) -> bool {
    // SAFETY-free check: /proc/self/status says the effective uid.
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .unwrap_or_default();
    if euid == "0" {
        return true;
    }
    if std::env::var_os("DNSFENCE_SKIP_ROOT_TESTS").is_some() {
        eprintln!("SKIPPED {test}: needs root (DNSFENCE_SKIP_ROOT_TESTS is set)");
        return false;
    }
    panic!(
        "{test} needs root (BPF, cgroups, routes): run as root (CI does), or set \
         DNSFENCE_SKIP_ROOT_TESTS=1 to skip it knowingly"
    );
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

/// A cgroup v2 subtree and a pin directory (removed on drop), and the blackhole routes
/// (kept).
#[derive(Debug)]
pub struct Env {
    /// The agent's `--cgroup-root` (a fresh directory in the cgroup v2 hierarchy).
    pub cgroup_root: PathBuf,
    /// The agent's `--bpf-pin`.
    pub pin: PathBuf,
}

/// A snapshot (numbered `generation`) for endpoint `a` of cgroup `a`: TCP `port` allowed to
/// 127.`net`.9.0/24, and `extra` (YAML of more `spec` keys, e.g. an `egressDeny`) after it.
pub fn cidr_snapshot(net: u32, port: u16, extra: &str, generation: u64) -> Snapshot {
    let text = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: a, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toCIDR: ["127.{net}.9.0/24"]
    toPorts: [{{ports: [{{port: "{port}", protocol: TCP}}]}}]
{extra}"#
    );
    let mut s = compile_a(&text, &dnsfence_policy::cidr::NodeFacts::default());
    s.set_generation(generation);
    s
}

/// `policy` over one endpoint, default/a in cgroup `a`, with `node`'s facts.
pub fn compile_a(policy: &str, node: &dnsfence_policy::cidr::NodeFacts) -> Snapshot {
    let endpoints = "endpoints:\n- {name: a, namespace: default, labels: {app: a}, cgroup: a}\n";
    let p = PolicySet::from_yaml(Path::new("p.yaml"), policy).expect("the test policy");
    let e = Endpoints::from_yaml(Path::new("e.yaml"), endpoints).expect("the test endpoints");
    Snapshot::compile_on(&p, &e, &[], node)
}

impl Env {
    /// The datapath installed at `root` (None: this environment's cgroup root) over this
    /// environment's pins, 1,024 entries in the allow and L3 maps and `cluster_entries` in
    /// the cluster map.
    pub fn install(&self, root: Option<&Path>, cluster_entries: u32) -> Datapath {
        self.install_sized(root, 1024, cluster_entries)
    }

    /// The datapath installed over this environment's pins and cgroup root with `allow_entries`
    /// in the allow map (1,024 in the L3 and cluster maps).
    pub fn install_allow(&self, allow_entries: u32) -> Datapath {
        self.install_sized(None, allow_entries, 1024)
    }

    /// The datapath installed over this environment's pins and cgroup root with
    /// `endpoint_entries` in a new endpoints map (1,024 in the others).
    pub fn install_endpoints(&self, endpoint_entries: u32) -> Datapath {
        self.install_with(None, 1024, 1024, endpoint_entries)
    }

    fn install_sized(&self, root: Option<&Path>, allow_entries: u32, cluster: u32) -> Datapath {
        self.install_with(root, allow_entries, cluster, 65536)
    }

    fn install_with(
        &self,
        root: Option<&Path>,
        allow_entries: u32,
        cluster: u32,
        endpoint_entries: u32,
    ) -> Datapath {
        Datapath::install(&InstallConfig {
            pin_dir: self.pin.clone(),
            cgroup_root: root.unwrap_or(&self.cgroup_root).to_owned(),
            allow_entries,
            l3_entries: 1024,
            cluster_entries: cluster,
            endpoint_entries,
        })
        .expect("install the datapath")
    }

    /// Sets up a subtree with the client cgroups `clients` (created below the root).
    pub fn new(tag: &str, clients: &[&str]) -> Env {
        let mount = Path::new(CGROUP2_MOUNT);
        std::fs::create_dir_all(mount).expect("cgroup2 mount point");
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(CGROUP2_MOUNT));
        if !mounted {
            let out = run("mount", &["-t", "cgroup2", "none", CGROUP2_MOUNT]);
            assert!(out.status.success(), "mount cgroup2: {out:?}");
        }
        // bpffs, as the agent would mount it, so that a test may pin beside it first.
        let bpffs = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
        if !bpffs {
            let out = run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
            assert!(out.status.success(), "mount bpffs: {out:?}");
        }
        let id = format!("dnsfence-{tag}-{}", std::process::id());
        let cgroup_root = mount.join(&id);
        for c in clients {
            std::fs::create_dir_all(cgroup_root.join(c)).expect("client cgroup");
        }
        let pin = PathBuf::from("/sys/fs/bpf").join(&id);
        // Host routes only: the machine's own network may be TEST-NET-1 (CI VMs use
        // 192.0.2.0/24 for eth0), where a /24 blackhole would clash with the link route.
        // They stay after the test: removing them while another test (or process) relies on
        // them could let a query escape to the machine's real network.
        for (family, host) in [("-4", "192.0.2.53"), ("-6", "2001:db8::53")] {
            let out = run("ip", &[family, "route", "replace", "blackhole", host]);
            assert!(out.status.success(), "blackhole route {host}: {out:?}");
        }
        Env { cgroup_root, pin }
    }

    /// The cgroup directory of a client.
    pub fn cgroup(&self, client: &str) -> PathBuf {
        self.cgroup_root.join(client)
    }

    /// Runs `program args...` inside the cgroup of `client` (or outside every client cgroup
    /// with None), returning its output.
    pub fn run_in(
        &self,
        client: Option<&str>,
        program: &str,
        args: &[&str],
    ) -> std::process::Output {
        let procs = match client {
            Some(c) => self.cgroup(c).join("cgroup.procs"),
            None => PathBuf::from("/dev/null"),
        };
        Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(procs)
            .arg(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// dig from inside a client's cgroup.
    pub fn dig(&self, client: Option<&str>, server: SocketAddr, args: &[&str]) -> DigResult {
        let at = format!("@{}", server.ip());
        let port = server.port().to_string();
        let mut all = vec![
            at.as_str(),
            "-p",
            port.as_str(),
            "+time=2",
            "+tries=1",
            "+nocookie",
        ];
        all.extend_from_slice(args);
        let out = self.run_in(client, "dig", &all);
        parse_dig(&String::from_utf8_lossy(&out.stdout))
    }

    /// A TCP connect from inside a client's cgroup: `Ok(())`, or the error's text
    /// (`PermissionError` when the datapath refused it).
    pub fn connect(&self, client: Option<&str>, to: SocketAddr) -> Result<(), String> {
        const PROBE: &str = "import socket,sys\n\
try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n    print('connected')\n\
except Exception as e:\n    print(type(e).__name__, e)\n";
        let ip = to.ip().to_string();
        let port = to.port().to_string();
        let out = self.run_in(client, "python3", &["-c", PROBE, &ip, &port]);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if text == "connected" {
            Ok(())
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Makes `ip` a local address (on `lo`) until the guard drops, so a test can listen on
    /// an address an upstream answered.
    pub fn local_address(&self, ip: std::net::IpAddr) -> LocalAddress {
        let (family, cidr) = match ip {
            std::net::IpAddr::V4(_) => ("-4", format!("{ip}/32")),
            std::net::IpAddr::V6(_) => ("-6", format!("{ip}/128")),
        };
        // `nodad`: an IPv6 address is usable at once (it would otherwise be tentative while
        // duplicate address detection runs, and a bind to it fail with EADDRNOTAVAIL: a
        // fixed 50 ms wait flaked under load).
        let mut args = vec![family, "addr", "add", &cidr, "dev", "lo"];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        let out = run("ip", &args);
        assert!(out.status.success(), "ip addr add {cidr}: {out:?}");
        LocalAddress { family, cidr }
    }

    /// Resolves `name` from inside a client's cgroup through the redirect (dig to
    /// [`server`], `extra` added: `AAAA`, `+tcp`): asserts NOERROR and that the client sees
    /// the server it asked; returns the last address of the answer's `rtype` records.
    pub fn resolve(&self, client: &str, name: &str, rtype: &str, extra: &[&str]) -> IpAddr {
        let mut args = vec![name, rtype];
        args.extend_from_slice(extra);
        let r = self.dig(Some(client), server(), &args);
        assert_eq!(
            r.status, "NOERROR",
            "{client} resolving {name}: {}",
            r.output
        );
        assert!(
            r.output.contains("SERVER: 192.0.2.53#53(192.0.2.53)"),
            "the client sees the server it asked: {}",
            r.output
        );
        r.rdata(rtype)
            .last()
            .unwrap_or_else(|| panic!("no {rtype} record: {}", r.output))
            .parse()
            .expect("address")
    }

    /// An ICMP (IPv4 address) or ICMPv6 message of type `icmp_type` (an echo request: 8, or
    /// 128 for ICMPv6, with an id and sequence) sent from a raw socket inside a client's
    /// cgroup: `Ok(true)` when an echo reply came back, `Ok(false)` when it was sent but no
    /// reply came (within 2 s), or the error's text (`PermissionError` when the datapath
    /// refused it).
    pub fn icmp(
        &self,
        client: Option<&str>,
        to: std::net::IpAddr,
        icmp_type: u8,
    ) -> Result<bool, String> {
        const PROBE: &str = r#"import os, socket, struct, sys, time
v6 = ':' in sys.argv[1]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
ident = os.getpid() & 0xffff
msg = struct.pack('!BBHHH', int(sys.argv[2]), 0, 0, ident, 1) + b'dnsfence'
if not v6:  # the kernel computes the ICMPv6 checksum, not the ICMP one
    x = sum(struct.unpack('!%dH' % (len(msg) // 2), msg))
    x = (x >> 16) + (x & 0xffff)
    x += x >> 16
    msg = msg[:2] + struct.pack('!H', ~x & 0xffff) + msg[4:]
try:
    s.sendto(msg, (sys.argv[1], 0))
except Exception as e:
    print(type(e).__name__, e)
    sys.exit()
s.settimeout(0.2)
end = time.time() + 2
while time.time() < end:
    try:
        data = s.recv(2048)
    except socket.timeout:
        continue
    if not v6:
        data = data[(data[0] & 15) * 4:]
    if data[0] == (129 if v6 else 0) and struct.unpack('!H', data[4:6])[0] == ident:
        print('reply')
        sys.exit()
print('no reply')
"#;
        let ip = to.to_string();
        let t = icmp_type.to_string();
        let out = self.run_in(client, "python3", &["-c", PROBE, &ip, &t]);
        match String::from_utf8_lossy(&out.stdout).trim() {
            "reply" => Ok(true),
            "no reply" => Ok(false),
            text => Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))),
        }
    }

    /// Whether an ICMP message from inside a client's cgroup was refused by the datapath
    /// (`EPERM`).
    pub fn icmp_denied(&self, client: Option<&str>, to: std::net::IpAddr, icmp_type: u8) -> bool {
        matches!(self.icmp(client, to, icmp_type), Err(e) if e.contains("PermissionError"))
    }

    /// Whether a TCP connect from inside a client's cgroup was refused by the datapath
    /// (`EPERM`, as opposed to connected or failed otherwise).
    pub fn denied(&self, client: Option<&str>, to: SocketAddr) -> bool {
        matches!(self.connect(client, to), Err(e) if e.contains("PermissionError"))
    }

    /// Programs attached at the cgroup root, as `bpftool cgroup show` lists them.
    pub fn attached(&self) -> String {
        let out = run(
            "bpftool",
            &["cgroup", "show", &self.cgroup_root.display().to_string()],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// An address added to `lo`, removed on drop.
#[derive(Debug)]
pub struct LocalAddress {
    family: &'static str,
    cidr: String,
}

impl Drop for LocalAddress {
    fn drop(&mut self) {
        let _ = run("ip", &[self.family, "addr", "del", &self.cidr, "dev", "lo"]);
    }
}

/// Removes a cgroup and its descendants, deepest first (a cgroup with children cannot be
/// removed: a flat pass left `a` behind whenever `a/nested` existed).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Env {
    fn drop(&mut self) {
        // Best effort: detach and unpin whatever a failed test left, then remove the tree.
        let _ = Command::new(crate::bin("dnsfence"))
            .args(["agent", "--uninstall", "--bpf-pin"])
            .arg(&self.pin)
            .output();
        // This pin directory is never used again: its lock files go too.
        let _ = dnsfence_datapath::loader::remove_lock_files(&self.pin);
        remove_cgroup_tree(&self.cgroup_root);
    }
}
