//! System tests: real processes (dnsfence, dnsfence-loadgen, knot) on loopback.
//!
//! The library holds what the tests in `tests/` share: where the binaries are, a child-process
//! guard that captures stderr to a file and kills its child on drop, port reservation, start
//! helpers for the bundled upstream, knotd, an in-process fake upstream and the agent, and small
//! DNS clients (`dig`, raw UDP/TCP exchanges parsed with hickory-proto). Everything talks to
//! 127.0.0.1 only and every wait is bounded.
#![forbid(unsafe_code)]

pub mod bpf;
pub mod dns;
pub mod upstream;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use dns::{DigResult, dig};

/// The I/O backend flag of the agent (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// `--io uring`.
    Uring,
    /// `--io mmsg`.
    Mmsg,
}

impl IoBackend {
    /// The flag value.
    pub fn flag(self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Mmsg => "mmsg",
        }
    }
}

/// Declares one test per I/O backend: `both_backends!(name, body_fn)` expands to
/// `name_uring` and `name_mmsg` calling `body_fn(IoBackend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident => $body:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn uring() {
                    super::$body($crate::IoBackend::Uring)
                }
                #[test]
                fn mmsg() {
                    super::$body($crate::IoBackend::Mmsg)
                }
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Binaries

/// The directory of the test executable's profile (`target/<profile>/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let deps = exe.parent().expect("exe dir");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path to a binary of the workspace (`dnsfence`, `dnsfence-loadgen`).
///
/// Looked up in `$DNSFENCE_BIN_DIR`, then next to the test executable (`target/<profile>/`).
/// When missing, they are built once with `cargo build -p dnsfence -p dnsfence-loadgen` in the
/// same profile, into `target/systest-bins/` (the running `cargo test` holds the lock on its
/// own target directory, so a nested build there would wait forever).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("DNSFENCE_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        assert!(
            p.is_file(),
            "DNSFENCE_BIN_DIR has no {name}: {}",
            p.display()
        );
        return p;
    }
    let profile = profile_dir();
    let p = profile.join(name);
    if p.is_file() {
        return p;
    }
    static FALLBACK: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = FALLBACK.get_or_init(|| build_fallback(&profile));
    match dir {
        Ok(dir) => dir.join(name),
        Err(e) => panic!(
            "{name} is not built next to the tests ({}) and building it failed: {e}\n\
             run `cargo build -p dnsfence -p dnsfence-loadgen` (same profile) first",
            profile.display()
        ),
    }
}

fn build_fallback(profile: &Path) -> Result<PathBuf, String> {
    let profile_name = profile
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("no profile name")?
        .to_owned();
    let target = profile
        .parent()
        .ok_or("no target dir")?
        .join("systest-bins");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "dnsfence", "-p", "dnsfence-loadgen"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile_name.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!(
        "building dnsfence and dnsfence-loadgen into {}",
        target.display()
    );
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build failed: {status}"));
    }
    Ok(target.join(profile_name))
}

/// Whether the binaries under test are an optimised build (judged by the profile directory).
pub fn release_build() -> bool {
    profile_dir().file_name().is_some_and(|n| n != "debug")
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and ports

/// A directory removed on drop (kept when the test is panicking, for the post-mortem).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir, unique to this process and call.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dnsfence-systest-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `name` inside it and returns the file's path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Reservations: a TCP listener on 127.0.0.254:PORT per port handed out, held until this
/// process exits, so concurrent test processes never pick the same port.
static RESERVED: Mutex<Vec<TcpListener>> = Mutex::new(Vec::new());

/// A port free on 127.0.0.1 for both UDP and TCP, below the ephemeral range (so no client's
/// source port takes it), reserved for this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOW: usize = 20_000;
    const SPAN: usize = 12_000;
    let base = (std::process::id() as usize).wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        let Ok(token) = TcpListener::bind(("127.0.0.254", port)) else {
            continue;
        };
        let udp = UdpSocket::bind(("127.0.0.1", port));
        let tcp = TcpListener::bind(("127.0.0.1", port));
        if udp.is_ok() && tcp.is_ok() {
            RESERVED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(token);
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// `127.0.0.1:free_port()`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process killed (SIGKILL, by its PID) when dropped. Its stdout and stderr go to
/// files in `dir`, readable at any time.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured to `dir/NAME.{stdout,stderr}`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Process {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let stdout = dir.join(format!("{name}-{n}.stdout"));
        let stderr = dir.join(format!("{name}-{n}.stderr"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Process {
            name: name.to_owned(),
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The file its stdout goes to.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    /// What it wrote on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits at most `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_status())
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`, ...) with kill(1), by PID.
    pub fn signal(&mut self, signal: &str) {
        if self.try_status().is_some() {
            return;
        }
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {} ({}) failed", self.pid(), self.name);
    }

    /// SIGTERM, then waits at most `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        self.wait_timeout(timeout)
    }

    /// Panics with its stderr if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_status() {
            panic!(
                "{} exited ({status}); stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
    }

    /// Calls `ready` until it returns true; panics (with stderr) if the process exits first or
    /// `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if ready() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not ready after {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/proc/PID/status` field value (`VmRSS`, ...), trimmed.
    pub fn proc_status(&self, field: &str) -> Option<String> {
        proc_status_of(&format!("/proc/{}/status", self.pid()), field)
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let v = self.proc_status("VmRSS").expect("VmRSS");
        v.trim_end_matches("kB")
            .trim()
            .parse()
            .expect("VmRSS value")
    }
}

/// A `Field:` value of a `/proc/.../status` file.
pub fn proc_status_of(path: &str, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// Runs `dnsfence-loadgen` against `server` with the queries of `file` at `rate` qps for
/// `secs` seconds (1 s answer timeout) and returns its JSON report (`sent`, `answered`,
/// `rcodes`, the per-second `timeline` with `p99_us`, ...). Panics when it fails.
pub fn loadgen(server: SocketAddr, file: &Path, rate: u64, secs: f64) -> serde_json::Value {
    loadgen_with(server, file, rate, secs, &[])
}

/// [`loadgen`] with further flags (e.g. `--at SECS:COMMAND`).
pub fn loadgen_with(
    server: SocketAddr,
    file: &Path,
    rate: u64,
    secs: f64,
    extra: &[&str],
) -> serde_json::Value {
    let out = Command::new(bin("dnsfence-loadgen"))
        .arg("--server")
        .arg(server.to_string())
        .arg("--queries")
        .arg(file)
        .args(["--rate", &rate.to_string(), "--duration", &secs.to_string()])
        .args(["--timeout", "1000", "--json", "--quiet"])
        .args(extra)
        .output()
        .expect("run loadgen");
    assert!(
        out.status.success(),
        "loadgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("loadgen JSON")
}

/// The CPUs in a kernel CPU list (`0-3,8`), as in `Cpus_allowed_list`.
pub fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut ends = part.splitn(2, '-').map(|n| n.parse::<usize>().ok());
        match (ends.next().flatten(), ends.next()) {
            (Some(a), None) => cpus.push(a),
            (Some(a), Some(Some(b))) => cpus.extend(a..=b),
            _ => {}
        }
    }
    cpus
}

/// Whether this test process may run on every CPU of `cpus` (a test that pins threads to
/// them). When not, says so on stderr as `SKIPPED {test}: needs CPUs ...` and returns false.
/// The line is written to the process's stderr directly, not through `eprintln!`, so that
/// `cargo test` shows it even though the test passes (it captures the output of passing
/// tests): a skipped test never passes silently.
pub fn require_cpus(test: &str, cpus: &[usize]) -> bool {
    let allowed = proc_status_of("/proc/self/status", "Cpus_allowed_list").unwrap_or_default();
    let have = parse_cpu_list(&allowed);
    if cpus.iter().all(|c| have.contains(c)) {
        return true;
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs {} CPUs ({cpus:?}), this process may use CPUs {allowed:?}",
        cpus.len()
    );
    false
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

/// The policy of the tests: endpoint `client` (127.0.0.1 and ::1, i.e. every local test
/// client) may resolve `allowed.test` and `*.allowed.test` (so the bundled upstream's
/// behaviours are reachable as `cname-2-x.allowed.test`, `tc-x.allowed.test`, ...) and reach
/// `*.allowed.test` on 443/TCP. Everything else is denied.
pub const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}, {matchName: "allowed.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

/// The endpoints of the tests: `client` is every loopback client of the tests.
pub const ENDPOINTS: &str = r#"endpoints:
- name: client
  namespace: default
  labels: {app: client}
  ips: ["127.0.0.1", "::1"]
"#;

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `--io`.
    pub io: IoBackend,
    /// `--upstream` (None: not given; each query goes to the server its workload addressed).
    pub upstream: Option<SocketAddr>,
    /// `--shards`.
    pub shards: usize,
    /// `--cpus`.
    pub cpus: Option<String>,
    /// Text of the policy file.
    pub policy: String,
    /// Text of the endpoints file.
    pub endpoints: String,
    /// Further flags.
    pub extra: Vec<String>,
    /// `--listen` (default: a free port).
    pub listen: Option<SocketAddr>,
    /// eBPF mode: `--bpf-pin` and `--cgroup-root` (None: `--no-bpf`).
    pub bpf: Option<(PathBuf, PathBuf)>,
    /// Without `cpus`: leave the agent's default pinning on (else `--no-pin` is passed).
    pub pin_default: bool,
    /// Run `dnsfence proxy` (the standalone HA proxy: no policy files; pass
    /// `--agent-socket` and `--state-dir` in `extra`) instead of `dnsfence agent`.
    pub proxy: bool,
    /// A command the binary runs under (e.g. `setpriv --bounding-set=...`), empty: none.
    pub wrapper: Vec<String>,
    /// `--k8s --kubeconfig FILE` instead of the policy and endpoints files (the Kubernetes
    /// source; pass `--node-name` in `extra`).
    pub kubeconfig: Option<PathBuf>,
    /// Where the policy and endpoints files are written (None: the agent's own directory,
    /// new at each start). An agent restarted over the same directory reads the same paths,
    /// as a restarted service would.
    pub files_in: Option<PathBuf>,
    /// `--open-loopback-answers` (an agent only; on by default: the tests' upstreams answer
    /// in 127.0.0.0/8, and the tests connect there).
    pub open_loopback: bool,
}

impl AgentConfig {
    /// The test policy and endpoints, one shard, no pinning.
    pub fn new(io: IoBackend, upstream: SocketAddr) -> AgentConfig {
        AgentConfig {
            io,
            upstream: Some(upstream),
            shards: 1,
            cpus: None,
            policy: POLICY.to_owned(),
            endpoints: ENDPOINTS.to_owned(),
            extra: Vec::new(),
            listen: None,
            bpf: None,
            pin_default: false,
            proxy: false,
            wrapper: Vec::new(),
            kubeconfig: None,
            files_in: None,
            open_loopback: true,
        }
    }

    /// Adds flags.
    pub fn args(mut self, args: &[&str]) -> AgentConfig {
        self.extra.extend(args.iter().map(|s| (*s).to_owned()));
        self
    }

    /// The agent (or, with `proxy`, the standalone proxy) of an HA pair on `listen`, syncing
    /// over `dir`'s socket, each with its own state directory in `dir` (io_uring, userspace).
    pub fn ha_pair(dir: &Path, listen: SocketAddr, upstream: SocketAddr, proxy: bool) -> Self {
        let socket = dir.join("agent.sock");
        let state = dir.join(if proxy { "proxy-state" } else { "agent-state" });
        let mut c = AgentConfig::new(IoBackend::Uring, upstream).args(&[
            "--agent-socket",
            socket.to_str().expect("utf-8"),
            "--state-dir",
            state.to_str().expect("utf-8"),
        ]);
        c.listen = Some(listen);
        c.proxy = proxy;
        c
    }

    /// Sets `--shards` (and `--cpus` when given).
    pub fn shards(mut self, shards: usize, cpus: Option<&str>) -> AgentConfig {
        self.shards = shards;
        self.cpus = cpus.map(str::to_owned);
        self
    }
}

/// A running `dnsfence agent` (`--no-bpf` unless configured for eBPF; killed on drop).
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub process: Process,
    /// Its DNS address.
    pub addr: SocketAddr,
    /// Its metrics address.
    pub metrics: SocketAddr,
    /// The policy file it watches.
    pub policy_path: PathBuf,
    /// The endpoints file.
    pub endpoints_path: PathBuf,
    /// Readiness probes answered before it was declared ready (each counted as a query).
    pub probes_answered: u64,
    /// Its files (dropped after the process).
    pub dir: TempDir,
}

impl Agent {
    /// Writes the files and spawns the agent without waiting for it.
    pub fn spawn(config: &AgentConfig) -> Agent {
        let dir = TempDir::new("agent");
        let write = |name: &str, text: &str| match &config.files_in {
            None => dir.write(name, text),
            Some(files) => {
                let path = files.join(name);
                std::fs::write(&path, text).expect("write a file of the agent");
                path
            }
        };
        let policy_path = write("policy.yaml", &config.policy);
        let endpoints_path = write("endpoints.yaml", &config.endpoints);
        let addr = config.listen.unwrap_or_else(free_addr);
        let metrics = free_addr();
        let mut cmd = match config.wrapper.split_first() {
            None => Command::new(bin("dnsfence")),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin("dnsfence"));
                cmd
            }
        };
        cmd.arg(if config.proxy { "proxy" } else { "agent" });
        match &config.bpf {
            None => {
                cmd.arg("--no-bpf");
            }
            Some((pin, cgroup_root)) if config.proxy => {
                cmd.arg("--bpf-pin")
                    .arg(pin)
                    .arg("--cgroup-root")
                    .arg(cgroup_root);
            }
            Some((pin, cgroup_root)) => {
                cmd.arg("--bpf-pin")
                    .arg(pin)
                    .arg("--cgroup-root")
                    .arg(cgroup_root);
            }
        }
        cmd.arg("--listen").arg(addr.to_string());
        if let Some(upstream) = config.upstream {
            cmd.arg("--upstream").arg(upstream.to_string());
        }
        if let Some(kubeconfig) = &config.kubeconfig {
            cmd.arg("--k8s").arg("--kubeconfig").arg(kubeconfig);
        } else if !config.proxy {
            cmd.arg("--policy")
                .arg(&policy_path)
                .arg("--endpoints")
                .arg(&endpoints_path);
        }
        cmd.arg("--shards")
            .arg(config.shards.to_string())
            .arg("--io")
            .arg(config.io.flag())
            .arg("--metrics-listen")
            .arg(metrics.to_string());
        // Tests run many agents at once on a small machine: unpinned unless a test pins
        // (with --cpus, or the agent's default pinning with `pin_default`).
        match &config.cpus {
            Some(cpus) => {
                cmd.arg("--cpus").arg(cpus);
            }
            None if !config.pin_default => {
                cmd.arg("--no-pin");
            }
            None => {}
        }
        // Each agent its own sync socket: the default path is node-wide, and agents of tests
        // running at once would otherwise find one another there.
        if !config.extra.iter().any(|a| a == "--agent-socket") {
            cmd.arg("--agent-socket").arg(dir.path().join("agent.sock"));
        }
        if config.open_loopback && !config.proxy {
            cmd.arg("--open-loopback-answers");
        }
        cmd.args(&config.extra);
        let name = if config.proxy {
            "dnsfence-proxy"
        } else {
            "dnsfence-agent"
        };
        let process = Process::spawn(name, cmd, dir.path());
        Agent {
            process,
            addr,
            metrics,
            policy_path,
            endpoints_path,
            probes_answered: 0,
            dir,
        }
    }

    /// Starts an agent and waits until it answers a DNS query (a denied probe name, which
    /// never reaches the upstream) and its own metrics listener answers. The DNS answer alone
    /// is not enough: on a port shared with another process (SO_REUSEPORT) that one may answer
    /// while this one is still starting; the metrics thread starts once its shards serve.
    pub fn start(config: &AgentConfig) -> Agent {
        let mut agent = Agent::spawn(config);
        let (addr, metrics) = (agent.addr, agent.metrics);
        let mut answered = 0;
        let mut dns_ok = false;
        agent.process.wait_ready(Duration::from_secs(15), || {
            if !dns_ok {
                let q = dns::query(0x5eed, "ready.probe.invalid", dns::TYPE_A, None);
                dns_ok = dns::udp_exchange(addr, &q, Duration::from_millis(200)).is_some();
                answered += u64::from(dns_ok);
            }
            dns_ok && dns::http_get_once(metrics, "/metrics").is_ok()
        });
        agent.probes_answered = answered;
        agent
    }

    /// `GET /metrics` (retried while the listener comes up).
    pub fn metrics_text(&self) -> String {
        dns::http_get(self.metrics, "/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics at {}: {e}", self.metrics))
    }

    /// Per-shard values of a counter, e.g. `dnsfence_queries_total`.
    pub fn metric(&self, name: &str) -> Vec<(String, f64)> {
        dns::metric_values(&self.metrics_text(), name)
    }

    /// Sum over shards of a counter.
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.metric(name).iter().map(|(_, v)| v).sum()
    }

    /// Waits (10 s at most, else panics with the last answer) until `GET path` answers
    /// `code` (a probe: `/healthz`, `/readyz`), and returns the body.
    pub fn wait_probe(&self, path: &str, code: u16) -> String {
        let mut last = Err(String::new());
        let got = poll_until(Duration::from_secs(10), || {
            last = dns::http_get_status(self.metrics, path);
            match &last {
                Ok((c, body)) if *c == code => Some(body.clone()),
                _ => None,
            }
        });
        got.unwrap_or_else(|| panic!("GET {path} at {}: want {code}, got {last:?}", self.metrics))
    }

    /// Waits (10 s at most, else panics with the metrics) until `metric` summed over its
    /// shards is at least `want` (shards publish their counters every 100 ms or so).
    pub fn wait_metric(&self, metric: &str, want: f64) {
        let got = poll_until(Duration::from_secs(10), || {
            (self.metric_sum(metric) >= want).then_some(())
        });
        assert!(got.is_some(), "{metric} < {want}: {}", self.metrics_text());
    }
}

/// The local ports of process `pid`'s UDP sockets connected to `peer` (IPv4), read from
/// `/proc/<pid>/fd` (socket inodes) and `/proc/net/udp`: what an attacker who can list
/// sockets (or scan ports) learns about the agent's upstream source ports.
pub fn udp_ports_connected_to(pid: u32, peer: SocketAddr) -> Vec<u16> {
    let SocketAddr::V4(peer) = peer else {
        panic!("IPv4 only: {peer}")
    };
    let mut inodes = std::collections::HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(peer.ip().octets()),
        peer.port()
    );
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/udp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, rem, inode) = (f.get(1)?, f.get(2)?, f.get(9)?);
            if *rem != remote || !inodes.contains(*inode) {
                return None;
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod unit {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8"), [0, 1, 2, 3, 8]);
        assert_eq!(parse_cpu_list("1"), [1]);
        assert_eq!(parse_cpu_list(""), [0usize; 0]);
    }
}
