//! `dnsfence policy validate|check` (shared/spec/interfaces.md).
//!
//! Exit codes: 0 when valid / checked; 1 when a policy or endpoints file has problems (one
//! `FILE:LINE: reason` line each on stderr); 2 for a wrong invocation (unknown endpoint).

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use dnsfence_matcher::{Name, RuleSet};
use dnsfence_policy::{
    DnsVerdict, EndpointId, Endpoints, LoadErrors, PolicySet, PortProto, Proto, Snapshot,
};

/// Arguments of `dnsfence policy`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, clap::Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per run: its size costs nothing"
)]
enum PolicyCommand {
    /// Validate CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy files or directories.
    ///
    /// A directory contributes its *.yaml and *.yml files, sorted by name, not recursively
    /// (names starting with '.' skipped). Prints a one-line summary and exits 0 when valid;
    /// otherwise prints one `FILE:LINE: reason` line per problem on stderr and exits 1.
    Validate {
        /// Files or directories of CNP/CCNP YAML.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Also validate this endpoints file.
        #[arg(long, value_name = "FILE")]
        endpoints: Option<PathBuf>,
    },
    /// What does the policy allow an endpoint to resolve, and to reach?
    ///
    /// Prints `QNAME<TAB>dns=allow|deny<TAB>fqdn=allow|deny[<TAB>ports=443/tcp,...]` per
    /// name: dns= is the DNS-layer verdict (is the query forwarded), fqdn= whether the answer's
    /// addresses would become reachable, and ports= on which ports (`any` = every port). An
    /// endpoint selected by no egress policy is unrestricted: `dns=allow fqdn=allow ports=any`
    /// (and a note on stderr).
    Check {
        /// Policy file or directory. Repeatable.
        #[arg(long = "policy", required = true, value_name = "PATH")]
        policies: Vec<PathBuf>,
        /// The endpoints file.
        #[arg(long, value_name = "FILE")]
        endpoints: PathBuf,
        /// The querying endpoint: `namespace/name`, or `name` when unique.
        #[arg(long, value_name = "NAME")]
        endpoint: String,
        /// Destination port of the DNS query.
        #[arg(long, default_value_t = 53)]
        port: u16,
        /// Transport of the DNS query.
        #[arg(long, value_enum, default_value = "udp")]
        proto: ProtoArg,
        /// Address of the DNS server the query is sent to; DNS rules with an L3 selector
        /// (toEndpoints, toCIDR, toCIDRSet, toEntities) apply only when it is one they name.
        /// Without it, their L3 part is not checked (dns=allow then means: some server the
        /// policy allows would get the query).
        #[arg(long, value_name = "IP")]
        server: Option<IpAddr>,
        /// L3/L4 destinations to check, `ADDR:PORT/PROTO` (`10.0.0.5:5432/tcp`,
        /// `[2001:db8::1]:443/tcp`; proto tcp, udp or sctp; or icmp / icmpv6 with the ICMP
        /// type as PORT: `10.0.0.5:8/icmp` is an echo request). Prints
        /// `TARGET<TAB>l3=allow|deny<TAB>by=RULE` per destination, RULE one of `egressDeny`,
        /// `l3-rule` (toCIDR, toCIDRSet, toEndpoints, toPorts only), `default-deny` (only a
        /// toFQDNs answer could open it), `default-deny-fqdn-never` (no toFQDNs answer opens
        /// it either: an address of the cluster, of the node or of --deny-answer-cidr; only an
        /// L3 rule could) or `unrestricted`. Repeatable.
        #[arg(long = "to", value_name = "ADDR:PORT/PROTO", value_parser = parse_target)]
        to: Vec<Target>,
        /// L3/L4 destinations named by endpoint, `NAME:PORT/PROTO` (NAME as in --endpoint,
        /// `namespace/name` or a unique name): checked as --to for each of its registered
        /// addresses, printed `NAME(ADDR):PORT/PROTO`. Repeatable.
        #[arg(long = "to-endpoint", value_name = "NAME:PORT/PROTO")]
        to_endpoint: Vec<String>,
        /// As the agent's flags of the same names: what `toEntities` resolves to.
        #[arg(long, value_name = "CIDR", value_parser = dnsfence_policy::cidr::Cidr::parse)]
        cluster_cidr: Vec<dnsfence_policy::cidr::Cidr>,
        /// As the agent's `--node-ip`.
        #[arg(long, value_name = "IP", value_parser = dnsfence_policy::cidr::Cidr::parse_host, value_delimiter = ',')]
        node_ip: Vec<dnsfence_policy::cidr::Cidr>,
        /// As the agent's `--kube-apiserver`.
        #[arg(long, value_name = "CIDR", value_parser = dnsfence_policy::cidr::Cidr::parse)]
        kube_apiserver: Vec<dnsfence_policy::cidr::Cidr>,
        /// As the agent's `--deny-answer-cidr`: ranges no toFQDNs answer opens.
        #[arg(long, value_name = "CIDR", value_parser = dnsfence_policy::cidr::Cidr::parse, value_delimiter = ',')]
        deny_answer_cidr: Vec<dnsfence_policy::cidr::Cidr>,
        /// As the agent's `--open-loopback-answers`.
        #[arg(long)]
        open_loopback_answers: bool,
        /// Append `<TAB>by=RULE` to each name's line: why its query is forwarded or refused,
        /// RULE one of `egressDeny` (a deny covers the server), `l3-rule` (an L3/L4 allow of
        /// the server and port lets every name through), `dns-rule`, `default-deny`,
        /// `default-allow` (no rule is about it under `enableDefaultDeny.egress: false`) or
        /// `unrestricted`.
        #[arg(long)]
        explain: bool,
        /// Names to check.
        #[arg(required_unless_present_any = ["to", "to_endpoint"], value_name = "QNAME")]
        names: Vec<String>,
    },
}

/// The `--to` destinations of `--to-endpoint` specs: one per registered address of each.
fn endpoint_targets(endpoints_path: &Path, specs: &[String]) -> Result<Vec<Target>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let registry =
        dnsfence_policy::Endpoints::load(endpoints_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut targets = Vec::new();
    for spec in specs {
        let (name, port_proto) = spec
            .rsplit_once(':')
            .filter(|(_, pp)| pp.contains('/'))
            .with_context(|| format!("--to-endpoint {spec:?}: expected NAME:PORT/PROTO"))?;
        let found: Vec<_> = registry
            .endpoints
            .iter()
            .filter(|e| e.name == name || format!("{}/{}", e.namespace, e.name) == name)
            .collect();
        let endpoint = match found.as_slice() {
            [one] => one,
            [] => bail!(
                "--to-endpoint {spec:?}: no endpoint {name:?} in {}",
                endpoints_path.display()
            ),
            _ => bail!("--to-endpoint {spec:?}: {name:?} is ambiguous; use namespace/name"),
        };
        if endpoint.ips.is_empty() {
            bail!("--to-endpoint {spec:?}: {name:?} has no registered address");
        }
        for ip in &endpoint.ips {
            let (port, proto) = port_proto.split_once('/').unwrap_or((port_proto, ""));
            let port: u16 = port
                .parse()
                .with_context(|| format!("--to-endpoint {spec:?}: bad port {port:?}"))?;
            let mut target = parse_target(&format!("{}/{proto}", SocketAddr::new(*ip, port)))
                .map_err(|e| anyhow::anyhow!("--to-endpoint {spec:?}: {e}"))?;
            target.text = format!("{name}({ip}):{port_proto}");
            targets.push(target);
        }
    }
    Ok(targets)
}

/// A `--to` destination.
#[derive(Debug, Clone)]
struct Target {
    text: String,
    addr: SocketAddr,
    proto: dnsfence_policy::PortProtocol,
}

fn parse_target(s: &str) -> Result<Target, String> {
    let (addr, proto) = s
        .rsplit_once('/')
        .ok_or_else(|| format!("{s:?}: expected ADDR:PORT/PROTO, e.g. 10.0.0.5:5432/tcp"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: {addr:?} is not ADDR:PORT"))?;
    use dnsfence_policy::PortProtocol;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PortProtocol::Tcp,
        "udp" => PortProtocol::Udp,
        "sctp" => PortProtocol::Sctp,
        "icmp" if addr.is_ipv4() => PortProtocol::Icmp,
        "icmpv6" if addr.is_ipv6() => PortProtocol::Icmp6,
        "icmp" | "icmpv6" => {
            return Err(format!(
                "{s:?}: icmp goes with an IPv4 address, icmpv6 with an IPv6 one"
            ));
        }
        other => {
            return Err(format!(
                "{s:?}: protocol {other:?} (tcp, udp, sctp, icmp or icmpv6)"
            ));
        }
    };
    if matches!(proto, PortProtocol::Icmp | PortProtocol::Icmp6) && addr.port() > 255 {
        return Err(format!("{s:?}: an ICMP type is 0-255"));
    }
    Ok(Target {
        text: s.to_owned(),
        addr,
        proto,
    })
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProtoArg {
    Udp,
    Tcp,
}

/// Runs `dnsfence policy ...`.
pub fn run(args: &PolicyArgs) -> ExitCode {
    let result = match &args.command {
        PolicyCommand::Validate { paths, endpoints } => validate(paths, endpoints.as_ref()),
        PolicyCommand::Check {
            policies,
            endpoints,
            endpoint,
            port,
            proto,
            server,
            to,
            to_endpoint,
            cluster_cidr,
            node_ip,
            kube_apiserver,
            deny_answer_cidr,
            open_loopback_answers,
            explain,
            names,
        } => {
            let proto = match proto {
                ProtoArg::Udp => Proto::Udp,
                ProtoArg::Tcp => Proto::Tcp,
            };
            let mut node = dnsfence_policy::cidr::NodeFacts {
                cluster: cluster_cidr.clone(),
                kube_apiserver: kube_apiserver.clone(),
                open_loopback: *open_loopback_answers,
                deny_answers: deny_answer_cidr.clone(),
                ..Default::default()
            };
            node.host.extend(node_ip.iter().copied());
            match endpoint_targets(endpoints, to_endpoint) {
                Ok(mut targets) => {
                    targets.splice(0..0, to.iter().cloned());
                    let query = Query {
                        port: *port,
                        proto,
                        server: *server,
                        explain: *explain,
                    };
                    check(policies, endpoints, endpoint, query, &targets, &node, names)
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(code) => code,
        // A closed stdout (`| head`) is the reader's choice, not a failure.
        Err(e)
            if e.downcast_ref::<io::Error>().map(io::Error::kind)
                == Some(io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dnsfence policy: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints every problem, one `FILE:LINE: reason` a line, on stderr; exit 1.
fn report(errors: &LoadErrors) -> ExitCode {
    let mut err = io::stderr().lock();
    for e in errors.errors() {
        let _ = writeln!(err, "{e}");
    }
    ExitCode::FAILURE
}

fn validate(paths: &[PathBuf], endpoints: Option<&PathBuf>) -> Result<ExitCode> {
    let policies = PolicySet::load(paths);
    let endpoints = endpoints.map(|p| Endpoints::load(p)).transpose();
    let (policies, endpoints) = match (policies, endpoints) {
        (Ok(p), Ok(e)) => (p, e),
        (p, e) => {
            let mut all = LoadErrors::default();
            all.0.extend(p.err().map(|e| e.0).unwrap_or_default());
            all.0.extend(e.err().map(|e| e.0).unwrap_or_default());
            return Ok(report(&all));
        }
    };
    for note in policies.notes() {
        eprintln!("{note}");
    }
    let s = policies.summary();
    let mut line = format!(
        "ok: {} {}, {} {}, {} {}, {} {}",
        thousands(s.files),
        plural(s.files, "file", "files"),
        thousands(s.policies),
        plural(s.policies, "policy", "policies"),
        thousands(s.rules),
        plural(s.rules, "rule", "rules"),
        thousands(s.patterns),
        plural(s.patterns, "pattern", "patterns"),
    );
    if let Some(e) = endpoints {
        let n = e.endpoints.len();
        line.push_str(&format!(
            ", {} {}",
            thousands(n),
            plural(n, "endpoint", "endpoints")
        ));
    }
    writeln!(io::stdout().lock(), "{line}")?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
/// How `policy check` asks about names: the query's port, transport and server, and whether
/// to say why.
struct Query {
    port: u16,
    proto: Proto,
    server: Option<IpAddr>,
    explain: bool,
}

fn check(
    policy_paths: &[PathBuf],
    endpoints_path: &Path,
    endpoint: &str,
    query: Query,
    targets: &[Target],
    node: &dnsfence_policy::cidr::NodeFacts,
    names: &[String],
) -> Result<ExitCode> {
    let snapshot = match dnsfence_policy::load_on(policy_paths, Some(endpoints_path), node) {
        Ok(s) => s,
        Err(errors) => return Ok(report(&errors)),
    };
    let Some(ep) = snapshot.endpoint_by_name(endpoint) else {
        let known = snapshot
            .endpoints()
            .map(|ep| snapshot.endpoint_name(ep))
            .filter(|n| n.rsplit_once('/').is_some_and(|(_, name)| name == endpoint))
            .collect::<Vec<_>>();
        if known.len() > 1 {
            bail!(
                "endpoint {endpoint:?} is ambiguous: {}; use namespace/name",
                known.join(", ")
            );
        }
        bail!("no endpoint {endpoint:?} in {}", endpoints_path.display());
    };
    if !snapshot.is_restricted(ep) {
        eprintln!(
            "note: no egress policy selects {}: its egress is unrestricted",
            snapshot.endpoint_name(ep)
        );
    }
    let mut out = io::stdout().lock();
    let mut rules = snapshot.rule_set();
    for qname in names {
        let Query {
            port,
            proto,
            server,
            explain,
        } = query;
        let line = match Name::from_text(qname) {
            Ok(name) => {
                let mut line = verdict_line(&snapshot, ep, port, proto, server, &name, &mut rules);
                if explain {
                    let why = snapshot.dns_reason(ep, server, port, proto, &name);
                    line.push_str("\tby=");
                    line.push_str(why.as_str());
                }
                line
            }
            Err(e) => {
                eprintln!("note: {qname:?} is not a valid name ({e}): it matches nothing");
                let by = if explain { "\tby=invalid-name" } else { "" };
                format!("dns=deny\tfqdn=deny{by}")
            }
        };
        writeln!(out, "{qname}\t{line}").context("writing to stdout")?;
    }
    for t in targets {
        let (verdict, by) = if !snapshot.is_restricted(ep) {
            ("allow", "unrestricted")
        } else {
            match snapshot.l3_verdict(ep, t.addr.ip(), t.addr.port(), t.proto) {
                Some(false) => ("deny", "egressDeny"),
                Some(true) => ("allow", "l3-rule"),
                None if snapshot.in_cluster(t.addr.ip()) => ("deny", "default-deny-fqdn-never"),
                None => ("deny", "default-deny"),
            }
        };
        writeln!(out, "{}\tl3={verdict}\tby={by}", t.text).context("writing to stdout")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn verdict_line(
    snapshot: &Snapshot,
    ep: EndpointId,
    port: u16,
    proto: Proto,
    server: Option<IpAddr>,
    name: &Name,
    rules: &mut RuleSet,
) -> String {
    let dns = match server {
        Some(ip) => snapshot.dns_verdict(ep, SocketAddr::new(ip, port), proto, name),
        None => snapshot.dns_verdict_any_server(ep, port, proto, name),
    };
    match dns {
        DnsVerdict::Unrestricted => return "dns=allow\tfqdn=allow\tports=any".to_string(),
        DnsVerdict::Allow | DnsVerdict::Deny => {}
    }
    let dns = if dns == DnsVerdict::Allow {
        "allow"
    } else {
        "deny"
    };
    if !snapshot.fqdn_rules(ep, name, rules) {
        return format!("dns={dns}\tfqdn=deny");
    }
    let mut ports: Vec<PortProto> = Vec::new();
    let mut any = false;
    for &rule in rules.as_slice() {
        let p = snapshot.rule_ports(rule);
        any |= p.is_empty();
        ports.extend_from_slice(p);
    }
    let ports = if any {
        "any".to_string()
    } else {
        ports.sort_unstable();
        ports.dedup();
        ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("dns={dns}\tfqdn=allow\tports={ports}")
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// `10004` → `10,004`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
