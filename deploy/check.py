"""Offline checks of deploy/ beyond the Kubernetes schemas (deploy/validate.sh runs this).

- kustomization.yaml: every resource and generator file exists, and every manifest in the
  directory is listed (nothing shipped but unused);
- dnsfence-seccomp.json: the OCI seccomp shape (an errno default, known actions, the io_uring
  and bpf syscalls allowed: the reason the profile exists);
- the ConfigMaps: the policy and endpoints files are written to OUT (argv[1]) so that
  validate.sh can run them through dnsfence's own loader;
- the agent's and the proxy's args name only flags `dnsfence agent|proxy --help` lists
  (argv[2]: a directory holding agent.help and proxy.help);
- the systemd units: the sections and keys a unit needs, and flags known to the binary.
"""
import configparser
import json
import os
import re
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
K8S = os.path.join(HERE, "kubernetes")
errors = []


def fail(msg):
    errors.append(msg)


def flags_of(help_text):
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", help_text, re.M))


out, helps = sys.argv[1], sys.argv[2]
known = {cmd: flags_of(open(os.path.join(helps, f"{cmd}.help")).read()) for cmd in ("agent", "proxy")}

kust = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
listed = set(kust.get("resources", []))
for r in listed:
    if not os.path.exists(os.path.join(K8S, r)):
        fail(f"kustomization.yaml: resource {r} does not exist")
for gen in kust.get("configMapGenerator", []):
    for f in gen.get("files", []):
        if not os.path.exists(os.path.join(K8S, f)):
            fail(f"kustomization.yaml: generator file {f} does not exist")
for f in os.listdir(K8S):
    if f.endswith(".yaml") and f != "kustomization.yaml" and f not in listed:
        fail(f"{f} is not listed in kustomization.yaml")

profile = json.load(open(os.path.join(K8S, "dnsfence-seccomp.json")))
if profile.get("defaultAction") not in ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL_PROCESS"):
    fail("seccomp: defaultAction must deny (SCMP_ACT_ERRNO)")
allowed = set()
for rule in profile.get("syscalls", []):
    if rule.get("action") not in ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_LOG"):
        fail(f"seccomp: unknown action {rule.get('action')}")
    if rule.get("action") == "SCMP_ACT_ALLOW":
        allowed |= set(rule.get("names", []))
for needed in ("io_uring_setup", "io_uring_enter", "io_uring_register", "bpf"):
    if needed not in allowed:
        fail(f"seccomp: {needed} is not allowed")
for refused in ("kexec_load", "init_module", "ptrace", "unshare", "setns"):
    if refused in allowed:
        fail(f"seccomp: {refused} must not be allowed")

docs = []
for f in sorted(listed):
    docs += [d for d in yaml.safe_load_all(open(os.path.join(K8S, f))) if d]
by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
policy_dir = os.path.join(out, "policy")
os.makedirs(policy_dir, exist_ok=True)
for key, text in by_name[("ConfigMap", "dnsfence-policy")]["data"].items():
    open(os.path.join(policy_dir, key), "w").write(text)
# Workloads come from the Kubernetes API (--k8s); an endpoints file only if one is shipped.
if ("ConfigMap", "dnsfence-endpoints") in by_name:
    open(os.path.join(out, "endpoints.yaml"), "w").write(
        by_name[("ConfigMap", "dnsfence-endpoints")]["data"]["endpoints.yaml"])
config_keys = set(by_name[("ConfigMap", "dnsfence-config")]["data"])

for name, cmd in (("dnsfence-agent", "agent"), ("dnsfence-proxy", "proxy")):
    spec = by_name[("DaemonSet", name)]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    if args[0] != cmd:
        fail(f"{name}: first arg {args[0]!r}, want {cmd!r}")
    for a in args[1:]:
        flag = a.split("=", 1)[0]
        if flag not in known[cmd]:
            fail(f"{name}: dnsfence {cmd} has no flag {flag}")
        for var in re.findall(r"\$\(([A-Z_]+)\)", a):
            env = {e["name"] for e in container.get("env", [])}
            if var not in env and var not in config_keys:
                fail(f"{name}: $({var}) is neither an env var nor a dnsfence-config key")
    mounts = {m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in spec["volumes"]}
    for m in mounts - volumes:
        fail(f"{name}: volume mount {m} has no volume")
    port = int(re.search(r"--metrics-listen=[^:]+:(\d+)", " ".join(args)).group(1))
    for probe in ("livenessProbe", "readinessProbe"):
        if container[probe]["httpGet"]["port"] != port:
            fail(f"{name}: {probe} port is not the --metrics-listen port {port}")
    if not spec.get("hostNetwork"):
        fail(f"{name}: needs hostNetwork (pods reach the proxy on the node's address)")

for unit in ("dnsfence-agent.service", "dnsfence-proxy.service"):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(os.path.join(HERE, "systemd", unit))
    for section, key in (("Unit", "Description"), ("Service", "ExecStart"), ("Install", "WantedBy")):
        if not cp.has_option(section, key):
            fail(f"{unit}: [{section}] {key} missing")
    exec_start = cp.get("Service", "ExecStart", fallback="").split()
    cmd = exec_start[1] if len(exec_start) > 1 else ""
    for word in exec_start[2:]:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in known.get(cmd, set()):
            fail(f"{unit}: dnsfence {cmd} has no flag {flag}")

for e in errors:
    print(f"deploy check: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
