//! The policy and endpoints the engine's tests and the callgrind gate drive the core with.

/// The restricted test endpoint's address.
pub const CLIENT: &str = "127.0.0.10:40000";
/// An endpoint no policy selects.
pub const OPEN_CLIENT: &str = "127.0.0.20:40000";

/// The test policy: endpoint `client` (127.0.0.10) may resolve `*.allowed.test` and
/// `api.stripe.com` on port 53 and reach `*.allowed.test` on 443/TCP; `open` (127.0.0.20) is
/// selected by no policy.
pub const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}, {matchName: "api.stripe.com"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

/// The endpoints: `client` (127.0.0.10 and ::1) and `open` (127.0.0.20).
pub const ENDPOINTS: &str = r#"
endpoints:
- name: client
  namespace: default
  labels: {app: client}
  ips: ["127.0.0.10", "::1"]
- name: open
  namespace: default
  labels: {app: open}
  ips: ["127.0.0.20"]
"#;
