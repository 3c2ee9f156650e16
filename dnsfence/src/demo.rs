//! `dnsfence demo`: the proof a user can run (`../shared/spec/interfaces.md`). Starts the
//! bundled upstream, an agent and the standalone proxy sharing one port (SO_REUSEPORT) on
//! loopback, drives open-loop load with `dnsfence-loadgen`, and on a schedule kills the agent
//! with SIGKILL and restarts it, then the proxy, then stops each with SIGTERM (a graceful
//! restart) and starts it again. It prints the per-second timeline and checks the proof:
//! lost queries within the crash bound and none on graceful restarts, SERVFAIL bounded, no
//! denied name answered with anything but the reject rcode, no allowed name refused, no
//! denied name seen by the upstream (its own counters), every restart serving. Exit 0 only
//! when all of it holds.
//!
//! Mode: as root, eBPF: the demo mounts a cgroup v2 hierarchy of its own, runs the load
//! generator as a workload in an endpoint cgroup sending to 192.0.2.53:53 (TEST-NET, a
//! blackhole route for the run), which the redirect brings to the agent and the proxy; the
//! programs and maps are pinned under a directory of its own and uninstalled at the end.
//! Otherwise (or with `--no-bpf`) userspace mode: the load generator asks the proxy's address.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Flags of `dnsfence demo` (all optional).
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Seconds of load (the schedule of kills and restarts needs at least 21).
    #[arg(long, default_value_t = 22)]
    duration: u32,
    /// Queries per second for allowed names (denied names get a quarter of it on top).
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Keep the working directory (logs, policy) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Userspace mode even as root (no eBPF: the load generator asks the proxy directly).
    #[arg(long)]
    no_bpf: bool,
    /// Extra DNS and toFQDNs patterns in the policy (names the load never asks), to run the
    /// proof with a policy of realistic size (issue 8's test: 10,000).
    #[arg(long, default_value_t = 0)]
    patterns: u32,
    /// List the allowed queries answered at least this late (µs; 0: none) in the load
    /// generator's report, kept with `--keep` as `load-allowed.json` (when each was sent, its
    /// latency): to place a transition second's spike in time.
    #[arg(long, default_value_t = 0)]
    slow_us: u64,
    /// Place the load generator and the upstream on the first CPU this process may use and
    /// the agent and the proxy on the others (with `taskset`), as the peer benchmark places
    /// its processes: the transition seconds then measure what a start or a stop costs the
    /// serving CPUs, not the harness's own bursts of CPU landing on them (a 2-CPU VM's main
    /// noise).
    #[arg(long)]
    place: bool,
}

/// Where `--place` puts the harness and the served processes: `taskset -c` CPU lists.
struct Placement {
    harness: String,
    serving: String,
}

impl Placement {
    fn of(args: &DemoArgs) -> Result<Option<Placement>> {
        if !args.place {
            return Ok(None);
        }
        // The CPUs this process may run on (taskset, cpuset), by id: the first for the
        // harness, the others for the served processes.
        let cpus: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let [harness, serving @ ..] = cpus.as_slice() else {
            bail!("--place: cannot read this process's CPUs");
        };
        if serving.is_empty() {
            bail!("--place needs at least 2 CPUs (this process may use CPU {harness} only)");
        }
        Ok(Some(Placement {
            harness: harness.to_string(),
            serving: serving
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }))
    }
}

/// `program args` run on `cpus` (through `taskset -c`) when placed.
fn placed(cpus: Option<&str>, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
    match cpus {
        None => (program.to_path_buf(), args.to_vec()),
        Some(cpus) => {
            let mut v = vec!["-c".to_owned(), cpus.to_owned()];
            v.push(program.display().to_string());
            v.extend(args.iter().cloned());
            (PathBuf::from("taskset"), v)
        }
    }
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: demo-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: demo}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "**.allowed.demo.test"}, {matchName: "api.demo.test"}]
  - toFQDNs: [{matchPattern: "**.allowed.demo.test"}, {matchName: "api.demo.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

/// The demo policy with `extra` more patterns in its DNS and toFQDNs rules.
fn policy_text(extra: u32) -> String {
    let mut more = String::new();
    for i in 0..extra {
        let _ = write!(more, ", {{matchPattern: \"*.svc{i}.bulk.demo.test\"}}");
    }
    POLICY.replace(
        "{matchName: \"api.demo.test\"}]",
        &format!("{{matchName: \"api.demo.test\"}}{more}]"),
    )
}

const ENDPOINTS: &str = r#"endpoints:
- name: demo
  namespace: default
  labels: {app: demo}
  ips: ["127.0.0.1", "::1"]
"#;

/// eBPF mode: the workload is the `demo` cgroup.
const ENDPOINTS_BPF: &str = r#"endpoints:
- name: demo
  namespace: default
  labels: {app: demo}
  cgroup: demo
"#;

/// The DNS server the workload addresses in eBPF mode (TEST-NET-1, blackholed for the run):
/// only the redirect answers it.
const DEMO_SERVER: &str = "192.0.2.53:53";

/// Whether this process runs as root (eBPF is possible).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// eBPF mode's own cgroup v2 mount (with the `--cgroup-root` a subdirectory of it: a cgroup
/// v2 mount is a view of the one system-wide hierarchy, so its root is the host's), pin
/// directory and blackhole route, removed on drop.
struct BpfSetup {
    /// Where the hierarchy is mounted; its `cgroup.procs` is the hierarchy's root.
    mount: std::path::PathBuf,
    /// The agent's `--cgroup-root`: a cgroup of the demo's own.
    cgroup_root: std::path::PathBuf,
    pin: std::path::PathBuf,
    exe: std::path::PathBuf,
    route_added: bool,
}

impl BpfSetup {
    fn new(exe: &Path) -> Result<BpfSetup> {
        let id = std::process::id();
        let mount = std::path::PathBuf::from(format!("/run/dnsfence-demo-{id}/cgroup"));
        std::fs::create_dir_all(&mount)?;
        let mounted = Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = std::fs::remove_dir_all(mount.parent().unwrap_or(&mount));
            bail!("cannot mount a cgroup v2 hierarchy at {}", mount.display());
        }
        // The programs attach here, never at the hierarchy's (the host's) root.
        let cgroup_root = mount.join(format!("dnsfence-demo-{id}"));
        std::fs::create_dir_all(&cgroup_root)?;
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/dnsfence-demo-{id}"));
        let host = DEMO_SERVER.split(':').next().unwrap_or("192.0.2.53");
        let exists = Command::new("ip")
            .args(["-4", "route", "show", host])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        let mut setup = BpfSetup {
            mount,
            cgroup_root,
            pin,
            exe: exe.to_path_buf(),
            route_added: false,
        };
        if !exists {
            let ok = Command::new("ip")
                .args(["-4", "route", "add", "blackhole", host])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("cannot add a blackhole route for {host} (ip route)");
            }
            setup.route_added = true;
        }
        Ok(setup)
    }

    /// The workload's cgroup.
    fn workload(&self) -> std::path::PathBuf {
        self.cgroup_root.join("demo")
    }
}

impl Drop for BpfSetup {
    /// Called once the agent and the proxy have exited (an agent still draining holds the
    /// pin directory's lock, and the uninstall would fail).
    fn drop(&mut self) {
        let out = Command::new(&self.exe)
            .args(["agent", "--uninstall", "--bpf-pin"])
            .arg(&self.pin)
            .output();
        match out {
            Ok(out) if out.status.success() => {
                // The demo's own pin directory, never used again: its lock files go too.
                let _ = dnsfence_datapath::loader::remove_lock_files(&self.pin);
            }
            Ok(out) => eprintln!(
                "demo: warning: uninstalling {} failed: {} (run `dnsfence agent --uninstall \
                 --bpf-pin {}`)",
                self.pin.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.pin.display()
            ),
            Err(e) => eprintln!("demo: warning: cannot run the uninstall: {e}"),
        }
        let _ = std::fs::remove_dir(self.workload());
        let _ = std::fs::remove_dir(&self.cgroup_root);
        let _ = Command::new("umount").arg(&self.mount).status();
        if let Some(dir) = self.mount.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        if self.route_added {
            let host = DEMO_SERVER.split(':').next().unwrap_or("192.0.2.53");
            let _ = Command::new("ip")
                .args(["-4", "route", "del", "blackhole", host])
                .status();
        }
    }
}

/// A child process that is killed (SIGTERM, then SIGKILL) when dropped.
struct Guard {
    name: &'static str,
    child: Child,
}

impl Drop for Guard {
    fn drop(&mut self) {
        terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("demo: {} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

/// `s` as one single-quoted shell word (a `'` inside becomes `'\''`).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A free loopback port (UDP and TCP are both needed; the race with other programs is
/// accepted for a demo).
fn free_port() -> Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("pick a free port")?;
    Ok(socket.local_addr()?.port())
}

/// Sends an A query for `name` to `server` and returns the rcode of the answer, if any.
fn probe(server: SocketAddr, name: &str) -> Option<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut query = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send_to(&query, server).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    (n >= 12 && buf[0..2] == [0x42, 0x42]).then_some(buf[3] & 0x0f)
}

fn wait_for(server: SocketAddr, name: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if probe(server, name) == Some(0) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not answer on {server} within 10 s")
}

fn spawn(name: &'static str, program: &Path, args: &[String], log: &Path) -> Result<Guard> {
    let log_file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    Ok(Guard { name, child })
}

/// One step of the schedule: at second `at`, `signal` the process (`KILL` or `TERM`) or, with
/// None, start it again.
#[derive(Debug, Clone, Copy)]
struct Step {
    at: u32,
    process: &'static str,
    signal: Option<&'static str>,
}

/// The schedule: a crash and a graceful restart of each process.
const SCHEDULE: [Step; 8] = [
    Step {
        at: 3,
        process: "agent",
        signal: Some("KILL"),
    },
    Step {
        at: 5,
        process: "agent",
        signal: None,
    },
    Step {
        at: 8,
        process: "proxy",
        signal: Some("KILL"),
    },
    Step {
        at: 10,
        process: "proxy",
        signal: None,
    },
    Step {
        at: 13,
        process: "agent",
        signal: Some("TERM"),
    },
    Step {
        at: 14,
        process: "agent",
        signal: None,
    },
    Step {
        at: 17,
        process: "proxy",
        signal: Some("TERM"),
    },
    Step {
        at: 18,
        process: "proxy",
        signal: None,
    },
];

/// Lost queries allowed on a crash: what sat in the dead process's socket queue.
const CRASH_LOSS_BOUND: f64 = 0.002;

/// How many of each process's last log lines a failed demo prints.
const FAILURE_LOG_LINES: usize = 40;

/// Runs the demo; exit status follows the proof. A failed proof (or a failed run) prints the
/// end of each process's log and keeps the directory.
pub fn run(args: &DemoArgs) -> Result<bool> {
    let last = SCHEDULE.iter().map(|s| s.at).max().unwrap_or(0);
    if args.duration < last + 3 {
        bail!(
            "--duration must be at least {} (the schedule ends at {last} s)",
            last + 3
        );
    }
    let exe = std::env::current_exe().context("locate dnsfence")?;
    let loadgen = exe.with_file_name("dnsfence-loadgen");
    if !loadgen.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p dnsfence-loadgen`",
            loadgen.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("dnsfence-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let result = run_in(args, &exe, &loadgen, &dir);
    let failed = !matches!(result, Ok(true));
    if failed {
        // What a failure needs to be understood (a rare one may not come back): the last
        // lines each process wrote, and the whole directory kept.
        for role in ["agent", "proxy", "upstream"] {
            let log = dir.join(format!("{role}.log"));
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(FAILURE_LOG_LINES)..];
                eprintln!("demo: last {} lines of {}:", tail.len(), log.display());
                for line in tail {
                    eprintln!("  {line}");
                }
            }
        }
    }
    if args.keep || failed {
        eprintln!("demo: logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The shell command that starts `program args` in the background, appending to `log` and
/// writing its PID to `pid_file`.
fn start_command(program: &Path, args: &[String], log: &Path, pid_file: &Path) -> String {
    let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    format!(
        "{} {} >> {} 2>&1 & echo $! > {}",
        shell_quote(&program.display().to_string()),
        quoted.join(" "),
        shell_quote(&log.display().to_string()),
        shell_quote(&pid_file.display().to_string())
    )
}

/// Runs a shell command (a start, a kill) and waits for the shell.
fn sh(command: &str) -> Result<()> {
    let status = Command::new("sh").arg("-c").arg(command).status()?;
    if !status.success() {
        bail!("`{command}` failed: {status}");
    }
    Ok(())
}

/// How many times `log` says its process serves.
fn serving_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|l| l.matches(": serving ").count())
        .unwrap_or(0)
}

fn wait_serving(log: &Path, times: usize, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while serving_lines(log) < times {
        if Instant::now() > deadline {
            bail!("{what} did not start: see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn run_in(args: &DemoArgs, exe: &Path, loadgen: &Path, dir: &Path) -> Result<bool> {
    let bpf = match (args.no_bpf, is_root()) {
        (false, true) => match BpfSetup::new(exe) {
            Ok(setup) => Some(setup),
            Err(e) => {
                eprintln!("demo: eBPF mode unavailable ({e:#}); userspace mode");
                None
            }
        },
        _ => None,
    };
    let policy = dir.join("policy.yaml");
    let endpoints = dir.join("endpoints.yaml");
    std::fs::write(&policy, policy_text(args.patterns))?;
    std::fs::write(
        &endpoints,
        if bpf.is_some() {
            ENDPOINTS_BPF
        } else {
            ENDPOINTS
        },
    )?;
    let allowed = dir.join("allowed.txt");
    let denied = dir.join("denied.txt");
    let mut text = String::new();
    for i in 0..500 {
        let _ = writeln!(text, "host{i}.svc{}.allowed.demo.test A", i % 7);
    }
    text.push_str("api.demo.test AAAA\n");
    std::fs::write(&allowed, text)?;
    let mut text = String::new();
    for i in 0..100 {
        // `drop-`: the upstream counts (and drops) every such name it is asked.
        let _ = writeln!(text, "drop-exfil{i}.blocked.example A");
    }
    text.push_str("allowed.demo.test A\n"); // the apex of `**.allowed.demo.test`: denied
    std::fs::write(&denied, text)?;

    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let upstream_args: Vec<String> = [
        "upstream",
        "--listen",
        &upstream.to_string(),
        "--stats-json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let upstream_log = dir.join("upstream.log");
    let placement = Placement::of(args)?;
    let harness = placement.as_ref().map(|p| p.harness.as_str());
    let serving = placement.as_ref().map(|p| p.serving.as_str());
    let (program, upstream_args) = placed(harness, loadgen, &upstream_args);
    let upstream_guard = spawn("upstream", &program, &upstream_args, &upstream_log)?;
    wait_for(upstream, "probe.allowed.demo.test", "the upstream")?;

    let socket = dir.join("agent.sock").display().to_string();
    let common = |role: &str| -> Vec<String> {
        let mut v: Vec<String> = match &bpf {
            None => vec!["--no-bpf".to_owned()],
            Some(setup) => {
                // The proxy's --cgroup-root: where it finds endpoint cgroups created again
                // while the agent is away.
                vec![
                    "--bpf-pin".to_owned(),
                    setup.pin.display().to_string(),
                    "--cgroup-root".to_owned(),
                    setup.cgroup_root.display().to_string(),
                ]
            }
        };
        v.insert(0, role.to_owned());
        v.extend(
            [
                "--listen",
                &listen.to_string(),
                "--upstream",
                &upstream.to_string(),
                "--upstream-timeout",
                "1s",
                "--no-metrics",
                "--agent-socket",
                &socket,
                "--state-dir",
                &dir.join(format!("{role}-state")).display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if role == "agent" {
            v.extend([
                // The bundled upstream answers in 127.0.0.0/8 (the demo's world is this
                // node's loopback): opened as a host-process node would.
                "--open-loopback-answers".to_owned(),
                "--policy".to_owned(),
                policy.display().to_string(),
                "--endpoints".to_owned(),
                endpoints.display().to_string(),
            ]);
        }
        v
    };
    let mut starts = std::collections::HashMap::new();
    for role in ["agent", "proxy"] {
        let log = dir.join(format!("{role}.log"));
        let pid = dir.join(format!("{role}.pid"));
        let (program, role_args) = placed(serving, exe, &common(role));
        let mut command = start_command(&program, &role_args, &log, &pid);
        if let Some(setup) = &bpf {
            // Restarts run from the load generator, inside the workload's cgroup: the agent
            // and the proxy move to the hierarchy's root first (they are not the workload).
            let procs = setup.mount.join("cgroup.procs");
            // (The shell moves itself, then runs the command, whose background process
            // inherits its cgroup.)
            command = format!(
                "sh -c {} {}",
                shell_quote(&format!(
                    "echo $$ > {} && exec sh -c \"$0\"",
                    shell_quote(&procs.display().to_string())
                )),
                shell_quote(&command)
            );
        }
        sh(&command)?;
        wait_serving(&log, 1, role)?;
        starts.insert(role, (command, log, pid));
        if let (Some(setup), "agent") = (&bpf, role) {
            std::fs::create_dir_all(setup.workload())?;
        }
    }
    let server: SocketAddr = match &bpf {
        Some(_) => DEMO_SERVER.parse()?,
        None => listen,
    };
    if bpf.is_none() {
        wait_for(listen, "probe.allowed.demo.test", "the agent and the proxy")?;
    }

    match &bpf {
        Some(setup) => println!(
            "dnsfence demo: upstream {upstream}; agent and standalone proxy on {listen} \
             (mode: eBPF: the workload in cgroup {} asks {DEMO_SERVER}, redirected; sync \
             over {socket})",
            setup.workload().display()
        ),
        None => println!(
            "dnsfence demo: upstream {upstream}; agent and standalone proxy on {listen} \
             (mode: userspace, --no-bpf; sync over {socket})"
        ),
    }
    let schedule: Vec<String> = SCHEDULE
        .iter()
        .map(|s| match s.signal {
            Some(sig) => format!("{} s: SIG{sig} {}", s.at, s.process),
            None => format!("{} s: start {}", s.at, s.process),
        })
        .collect();
    println!(
        "load: {} qps allowed + {} qps denied for {} s; {}",
        args.rate,
        args.rate / 4,
        args.duration,
        schedule.join(", ")
    );
    if let Some(p) = &placement {
        println!(
            "placement: load generator and upstream on CPU {}, agent and proxy on CPUs {}",
            p.harness, p.serving
        );
    }
    let load = |queries: &Path, rate: u32| -> Vec<String> {
        vec![
            "--server".into(),
            server.to_string(),
            "--queries".into(),
            queries.display().to_string(),
            "--rate".into(),
            rate.to_string(),
            "--duration".into(),
            args.duration.to_string(),
            "--timeout".into(),
            "1500".into(),
            "--json".into(),
            "--quiet".into(),
        ]
    };
    let mut allowed_args = load(&allowed, args.rate);
    allowed_args.extend(["--slow-us".into(), args.slow_us.to_string()]);
    for step in &SCHEDULE {
        let (command, _, pid) = &starts[step.process];
        let action = match step.signal {
            Some(sig) => format!(
                "kill -{sig} $(cat {})",
                shell_quote(&pid.display().to_string())
            ),
            None => command.clone(),
        };
        allowed_args.extend(["--at".into(), format!("{}:{action}", step.at)]);
    }
    // In eBPF mode the load generator is the workload: it runs in the endpoint's cgroup.
    let workload = |args: &[String]| -> Command {
        let (loadgen, args) = placed(harness, loadgen, args);
        let (loadgen, args) = (loadgen.as_path(), args.as_slice());
        match &bpf {
            None => {
                let mut c = Command::new(loadgen);
                c.args(args);
                c
            }
            Some(setup) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0\" && shift && exec \"$@\"")
                    .arg(setup.workload().join("cgroup.procs"))
                    .arg("--")
                    .arg(loadgen)
                    .args(args);
                c
            }
        }
    };
    let allowed_run = workload(&allowed_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the load generator")?;
    let denied_run = workload(&load(&denied, (args.rate / 4).max(1)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the load generator")?;
    let allowed_out = allowed_run.wait_with_output()?;
    let denied_out = denied_run.wait_with_output()?;
    let mut restarts_served = true;
    for role in ["agent", "proxy"] {
        let (_, log, pid) = &starts[role];
        // Started once, then again after each of its two stops.
        restarts_served &= serving_lines(log) >= 3;
        if let Some(pid) = std::fs::read_to_string(pid)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            terminate(pid);
            // Drained and gone before the uninstall (its pin lock goes with it).
            let deadline = Instant::now() + Duration::from_secs(15);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    drop(upstream_guard);
    let upstream_stats: Option<Value> =
        std::fs::read_to_string(&upstream_log).ok().and_then(|log| {
            log.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
        });
    for (name, out) in [
        ("load-allowed.json", &allowed_out.stdout),
        ("load-denied.json", &denied_out.stdout),
    ] {
        std::fs::write(dir.join(name), out).with_context(|| format!("writing {name}"))?;
    }
    let allowed: Value =
        serde_json::from_slice(&allowed_out.stdout).context("load generator output (allowed)")?;
    let denied: Value =
        serde_json::from_slice(&denied_out.stdout).context("load generator output (denied)")?;
    Ok(report(
        &allowed,
        &denied,
        upstream_stats.as_ref(),
        restarts_served,
    ))
}

fn count(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, key| v.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The seconds of the timeline that a graceful restart spans: from its SIGTERM to the second
/// after its process was started again.
fn graceful_seconds() -> Vec<u64> {
    SCHEDULE
        .iter()
        .filter(|s| s.signal == Some("TERM"))
        .flat_map(|stop| {
            let restart = SCHEDULE
                .iter()
                .find(|s| s.process == stop.process && s.signal.is_none() && s.at > stop.at)
                .map_or(stop.at + 1, |s| s.at);
            u64::from(stop.at)..=u64::from(restart) + 1
        })
        .collect()
}

/// Issue 8's benchmark target, set beside the proof (not part of it: a noisy machine moves
/// it): each transition's p99, the worse of its second and the next (a start's takeover and
/// its cold first queries often land in the next), against the median p99 of the quiet
/// seconds, those with no event in them or in the second before (the first and the last
/// second, partial, left out). Returns that median (µs) and, per step of the schedule, its
/// ratio (`None` without a p99 for the step's own second).
fn transition_ratios(p99_by_second: &[(u64, u64)]) -> (u64, Vec<(Step, Option<f64>)>) {
    let event_at = |t: u64| SCHEDULE.iter().any(|s| u64::from(s.at) == t);
    let last = p99_by_second.iter().map(|&(t, _)| t).max().unwrap_or(0);
    let mut quiet: Vec<u64> = p99_by_second
        .iter()
        .filter(|&&(t, p99)| {
            t > 0 && t < last && p99 > 0 && !event_at(t) && !event_at(t.saturating_sub(1))
        })
        .map(|&(_, p99)| p99)
        .collect();
    quiet.sort_unstable();
    let steady = quiet.get(quiet.len() / 2).copied().unwrap_or(0);
    let ratios = SCHEDULE
        .iter()
        .map(|s| {
            let at = |t: u64| {
                p99_by_second
                    .iter()
                    .find(|&&(second, _)| second == t)
                    .map(|&(_, p99)| p99)
            };
            let t = u64::from(s.at);
            let p99 = at(t)
                .filter(|&p| p > 0 && steady > 0)
                .map(|p| p.max(at(t + 1).unwrap_or(0)));
            (*s, p99.map(|p| p as f64 / steady as f64))
        })
        .collect();
    (steady, ratios)
}

fn report(
    allowed: &Value,
    denied: &Value,
    upstream: Option<&Value>,
    restarts_served: bool,
) -> bool {
    println!();
    println!("  t  | sent  answered  timeouts  p99 (µs) | event");
    println!("-----+----------------------------------+------------------");
    let empty = Vec::new();
    let timeline = allowed["timeline"].as_array().unwrap_or(&empty);
    let denied_timeline = denied["timeline"].as_array().unwrap_or(&empty);
    let graceful = graceful_seconds();
    let mut graceful_lost = 0;
    for (i, row) in timeline.iter().enumerate() {
        let d = denied_timeline.get(i);
        let sent = count(row, &["sent"]) + d.map_or(0, |d| count(d, &["sent"]));
        let answered = count(row, &["answered"]) + d.map_or(0, |d| count(d, &["answered"]));
        let timeouts = count(row, &["timeouts"]) + d.map_or(0, |d| count(d, &["timeouts"]));
        let t = count(row, &["t_s"]);
        if graceful.contains(&t) {
            graceful_lost += timeouts;
        }
        let event: Vec<String> = SCHEDULE
            .iter()
            .filter(|s| u64::from(s.at) == t)
            .map(|s| match s.signal {
                Some("KILL") => format!("{} killed (SIGKILL)", s.process),
                Some(_) => format!("{} stopped (SIGTERM)", s.process),
                None => format!("{} started", s.process),
            })
            .collect();
        println!(
            "{t:>4} | {sent:>5} {answered:>9} {timeouts:>9} {:>9} | {}",
            count(row, &["p99_us"]),
            event.join(", ")
        );
    }
    let p99s: Vec<(u64, u64)> = timeline
        .iter()
        .map(|row| (count(row, &["t_s"]), count(row, &["p99_us"])))
        .collect();
    let (steady, ratios) = transition_ratios(&p99s);
    let within = ratios
        .iter()
        .filter(|(_, r)| r.is_some_and(|r| r <= 2.0))
        .count();
    println!();
    println!(
        "p99 of each transition (its second or the next, the worse) against the quiet \
         seconds' median ({steady} µs; issue 8's benchmark target is at most 2x, not part of \
         the proof):"
    );
    let line: Vec<String> = ratios
        .iter()
        .map(|(s, r)| {
            let what = match s.signal {
                Some("KILL") => "killed",
                Some(_) => "stopped",
                None => "started",
            };
            let r = r.map_or("-".to_owned(), |r| format!("{r:.1}x"));
            format!("{} {what} ({} s) {r}", s.process, s.at)
        })
        .collect();
    println!("  {}", line.join(", "));
    println!("  within 2x: {within} of {}", ratios.len());
    let sent = count(allowed, &["sent"]) + count(denied, &["sent"]);
    let lost = count(allowed, &["timeouts"]) + count(denied, &["timeouts"]);
    let bound = (CRASH_LOSS_BOUND * sent as f64).floor() as u64;
    let allowed_refused =
        count(allowed, &["rcodes", "REFUSED"]) + count(allowed, &["rcodes", "NXDOMAIN"]);
    let servfail = count(allowed, &["rcodes", "SERVFAIL"]) + count(denied, &["rcodes", "SERVFAIL"]);
    let denied_refused = count(denied, &["rcodes", "REFUSED"]);
    let denied_other = count(denied, &["answered"]).saturating_sub(denied_refused);
    let reached = upstream.map(|u| count(u, &["outcomes", "drop_by_name"]));
    println!();
    println!("queries sent:                 {sent}");
    println!(
        "queries lost:                 {lost} ({:.3}%; bound {bound}: what sat in a killed \
         process's socket queue; clients retry these)",
        100.0 * lost as f64 / sent.max(1) as f64
    );
    println!("lost on graceful restarts:    {graceful_lost} (must be 0)");
    println!("SERVFAIL:                     {servfail} (bound {bound})");
    println!(
        "allowed names answered:       {}",
        count(allowed, &["rcodes", "NOERROR"])
    );
    println!("allowed names refused:        {allowed_refused} (must be 0)");
    println!("denied names refused:         {denied_refused}");
    println!("denied names answered else:   {denied_other} (must be 0)");
    match reached {
        Some(n) => println!("denied names at the upstream: {n} (must be 0; its own counters)"),
        None => println!("denied names at the upstream: unknown (no stats from the upstream)"),
    }
    println!(
        "every restart served:         {}",
        if restarts_served { "yes" } else { "no" }
    );
    let holds = lost <= bound
        && graceful_lost == 0
        && servfail <= bound
        && allowed_refused == 0
        && denied_other == 0
        && reached == Some(0)
        && count(allowed, &["answered"]) > 0
        && denied_refused > 0
        && restarts_served;
    println!();
    println!(
        "proof {}",
        if holds {
            "holds: DNS kept answering through every crash and restart, and policy never widened"
        } else {
            "FAILED"
        }
    );
    holds
}

#[cfg(test)]
mod tests {
    use super::{SCHEDULE, placed, shell_quote};

    /// A placed command runs on its CPUs: `taskset -c` runs it there (checked by what the
    /// placed process itself reports), an unplaced one runs as given. Needs `taskset`
    /// (util-linux), as `--place` does.
    #[test]
    fn a_placed_command_runs_on_its_cpus() {
        let sh = std::path::Path::new("/bin/sh");
        let args = [
            "-c".to_owned(),
            "grep Cpus_allowed_list /proc/self/status".to_owned(),
        ];
        // The last CPU this process may use (placed alone there).
        let cpu = core_affinity::get_core_ids()
            .and_then(|ids| ids.last().map(|c| c.id.to_string()))
            .expect("this process's CPUs");
        let (program, with) = placed(Some(&cpu), sh, &args);
        let out = std::process::Command::new(&program)
            .args(&with)
            .output()
            .expect("taskset");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.trim_end().ends_with(&format!("\t{cpu}")),
            "{text:?} ({})",
            String::from_utf8_lossy(&out.stderr)
        );
        let (program, with) = placed(None, sh, &args);
        assert_eq!((program.as_path(), with.as_slice()), (sh, &args[..]));
    }

    /// The quiet seconds leave out every event second and the one after it, and the first
    /// and last (partial) seconds; each step gets its own second's p99 over their median.
    #[test]
    fn transition_seconds_are_measured_against_the_quiet_ones() {
        // Quiet seconds' p99s: 100 except at 1 (first quiet, 90) and 12 (300); event
        // seconds 1,000 + t; the seconds after an event 5,000 (they must not count); second 0
        // and the last are partial (1 µs, 1,000,000 µs).
        let events: Vec<u64> = SCHEDULE.iter().map(|s| u64::from(s.at)).collect();
        let p99s: Vec<(u64, u64)> = (0..=22u64)
            .map(|t| {
                let p99 = match t {
                    0 => 1,
                    22 => 1_000_000,
                    t if events.contains(&t) => 1_000 + t,
                    t if events.contains(&(t - 1)) => 5_000,
                    1 => 90,
                    12 => 300,
                    _ => 100,
                };
                (t, p99)
            })
            .collect();
        let (steady, ratios) = super::transition_ratios(&p99s);
        assert_eq!(steady, 100);
        assert_eq!(ratios.len(), SCHEDULE.len());
        for (step, r) in &ratios {
            // The worse of the step's second and the next.
            let t = u64::from(step.at) as usize;
            let want = p99s[t].1.max(p99s[t + 1].1) as f64 / 100.0;
            assert_eq!(*r, Some(want), "{step:?}");
        }
        // The agent's restart at 14 follows its stop at 13 (1,013 µs): 13 takes 14's 1,014 µs;
        // a start followed by a quiet-after second takes that second's 5,000.
        let of = |at: u32| ratios.iter().find(|(s, _)| s.at == at).unwrap().1;
        assert_eq!((of(13), of(14)), (Some(10.14), Some(50.0)));
        // A second without a p99 (nothing answered) has no ratio.
        let missing: Vec<(u64, u64)> = p99s.iter().filter(|&&(t, _)| t != 3).copied().collect();
        let (_, ratios) = super::transition_ratios(&missing);
        assert_eq!(ratios.iter().filter(|(_, r)| r.is_none()).count(), 1);
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        let tricky = "/tmp/it's $(here)";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(tricky)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), tricky);
    }
}
