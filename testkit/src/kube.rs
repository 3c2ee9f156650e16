//! A programmable fake Kubernetes API server on loopback, for tests of the Kubernetes source.
//!
//! It answers what kube-rs' watcher asks (HTTP/1.1, `Connection: close` on every answer):
//! - LIST `GET /api/v1/pods?limit=500[&continue=..][&fieldSelector=spec.nodeName=X]`: the
//!   objects now, with the current global resourceVersion, paged by `limit`/`continue`;
//! - WATCH `...?watch=true&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=N`: a
//!   chunked stream of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ..}` lines,
//!   first the changes after RV, then new ones as they happen, until `timeoutSeconds`, an
//!   [`FakeApi::expire`], [`FakeApi::set_down`] or the server's drop;
//! - `GET /version`.
//!
//! A field selector on `spec.nodeName` is honoured as the API server does in a watch: an
//! object entering the selection is `ADDED`, one leaving it `DELETED`. Label selectors of the
//! form `k=v,k2=v2` are honoured. A watch from a resourceVersion older than the last
//! [`FakeApi::expire`] gets one `ERROR` event with a 410 `Expired` Status, as a real server
//! does for a compacted revision.
//!
//! Every thread ends soon after the [`FakeApi`] is dropped (they poll a stop flag every 20 ms).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The resources the fake server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    /// core/v1 pods.
    Pods,
    /// core/v1 namespaces.
    Namespaces,
    /// core/v1 services.
    Services,
    /// discovery.k8s.io/v1 endpointslices.
    EndpointSlices,
    /// cilium.io/v2 ciliumnetworkpolicies.
    CiliumNetworkPolicies,
    /// cilium.io/v2 ciliumclusterwidenetworkpolicies.
    CiliumClusterwideNetworkPolicies,
    /// core/v1 nodes.
    Nodes,
}

const ALL: [Res; 7] = [
    Res::Pods,
    Res::Namespaces,
    Res::Services,
    Res::EndpointSlices,
    Res::CiliumNetworkPolicies,
    Res::CiliumClusterwideNetworkPolicies,
    Res::Nodes,
];

impl Res {
    /// The collection path (every namespace).
    pub fn path(self) -> &'static str {
        match self {
            Res::Pods => "/api/v1/pods",
            Res::Namespaces => "/api/v1/namespaces",
            Res::Nodes => "/api/v1/nodes",
            Res::Services => "/api/v1/services",
            Res::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::CiliumNetworkPolicies => "/apis/cilium.io/v2/ciliumnetworkpolicies",
            Res::CiliumClusterwideNetworkPolicies => {
                "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies"
            }
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::Pods | Res::Namespaces | Res::Services | Res::Nodes => "v1",
            Res::EndpointSlices => "discovery.k8s.io/v1",
            Res::CiliumNetworkPolicies | Res::CiliumClusterwideNetworkPolicies => "cilium.io/v2",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Namespaces => "Namespace",
            Res::Nodes => "Node",
            Res::Services => "Service",
            Res::EndpointSlices => "EndpointSlice",
            Res::CiliumNetworkPolicies => "CiliumNetworkPolicy",
            Res::CiliumClusterwideNetworkPolicies => "CiliumClusterwideNetworkPolicy",
        }
    }
}

/// One change, kept for watches that resume from an older resourceVersion.
struct Change {
    res: Res,
    rv: u64,
    kind: &'static str,
    prev: Option<Value>,
    object: Value,
    /// Sent to watches as an event no client can decode (see [`FakeApi::delete_unreadable`]).
    unreadable: bool,
}

#[derive(Default)]
struct Data {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    expired_below: u64,
    /// Bumped by `expire()`: open watches of an older epoch end with 410 Gone.
    epoch: u64,
    /// Bumped by `set_down(true)`: open connections of an older one are cut.
    cut: u64,
    down: bool,
    missing: HashSet<Res>,
    list_delay: BTreeMap<Res, Duration>,
    log: Vec<String>,
}

struct Shared {
    data: Mutex<Data>,
    changed: Condvar,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; stops when dropped.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Starts a server on an ephemeral loopback port.
    pub fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            // A real API server's resourceVersion is never 0: a watch from "0" means "from
            // now", so a list of an empty cluster answering 0 would let a watch started after
            // the next change miss it.
            data: Mutex::new(Data {
                rv: 1,
                ..Data::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(&listener, &s));
        FakeApi {
            shared,
            addr,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials) into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Adds or replaces an object (by namespace/name); returns its new resourceVersion.
    /// `kind`, `apiVersion`, `metadata.resourceVersion`, and on creation `metadata.uid` and
    /// `metadata.creationTimestamp` (when absent) are filled in.
    pub fn apply(&self, res: Res, mut object: Value) -> u64 {
        let mut d = self.shared.lock();
        d.rv += 1;
        let rv = d.rv;
        let key = key_of(&object);
        let prev = d.objects.get(&res).and_then(|m| m.get(&key)).cloned();
        object["kind"] = json!(res.kind());
        object["apiVersion"] = json!(res.api_version());
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if let Some(p) = &prev {
            for f in ["uid", "creationTimestamp"] {
                if meta.get(f).is_none() {
                    meta[f] = p["metadata"][f].clone();
                }
            }
        } else {
            if meta.get("uid").is_none() {
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
            }
            if meta.get("creationTimestamp").is_none() {
                meta["creationTimestamp"] = json!(format!("2025-01-01T00:00:{:02}Z", rv % 60));
            }
        }
        d.objects
            .entry(res)
            .or_default()
            .insert(key, object.clone());
        let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
        d.history.push(Change {
            res,
            rv,
            kind,
            prev,
            object,
            unreadable: false,
        });
        drop(d);
        self.shared.changed.notify_all();
        rv
    }

    /// Deletes an object (`namespace` `""` for a cluster-scoped one); whether it existed.
    pub fn delete(&self, res: Res, namespace: &str, name: &str) -> bool {
        self.remove(res, namespace, name, false)
    }

    /// [`FakeApi::delete`], but open watches get the `DELETED` event with an object that is
    /// no `res` (its `metadata.name` a number), as a client meets an event it cannot decode
    /// (a server newer than its schema, a corrupted stream). Lists are not affected.
    pub fn delete_unreadable(&self, res: Res, namespace: &str, name: &str) -> bool {
        self.remove(res, namespace, name, true)
    }

    fn remove(&self, res: Res, namespace: &str, name: &str, unreadable: bool) -> bool {
        let mut d = self.shared.lock();
        let key = (namespace.to_string(), name.to_string());
        let Some(mut object) = d.objects.get_mut(&res).and_then(|m| m.remove(&key)) else {
            return false;
        };
        d.rv += 1;
        let rv = d.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        d.history.push(Change {
            res,
            rv,
            kind: "DELETED",
            prev: Some(object.clone()),
            object,
            unreadable,
        });
        drop(d);
        self.shared.changed.notify_all();
        true
    }

    /// Compacts history: every open watch gets a 410 Gone `ERROR` event and ends, and a watch
    /// from a resourceVersion before now gets 410 too, so clients must relist.
    pub fn expire(&self) {
        let mut d = self.shared.lock();
        d.epoch += 1;
        d.expired_below = d.rv;
        drop(d);
        self.shared.changed.notify_all();
    }

    /// While down, every connection is closed at once without an answer and open watches are
    /// cut (no final chunk), as when the API server goes away.
    pub fn set_down(&self, down: bool) {
        let mut d = self.shared.lock();
        d.down = down;
        if down {
            d.cut += 1;
        }
        drop(d);
        self.shared.changed.notify_all();
    }

    /// Serves `res` as absent (404 NotFound), as for a CRD that is not installed; `false`
    /// serves it again.
    pub fn missing(&self, res: Res, missing: bool) {
        let mut d = self.shared.lock();
        if missing {
            d.missing.insert(res);
            d.cut += 1;
        } else {
            d.missing.remove(&res);
        }
        drop(d);
        self.shared.changed.notify_all();
    }

    /// Holds every LIST of `res` for `delay` before answering (a slow or large list).
    pub fn list_delay(&self, res: Res, delay: Duration) {
        self.shared.lock().list_delay.insert(res, delay);
    }

    /// The requests so far, as `GET <path and query>` (a refused one ends with ` (down)`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().log.clone()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in threads {
            let _ = t.join();
        }
    }
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let s = shared.clone();
                let t = std::thread::spawn(move || {
                    let _ = serve(stream, &s);
                });
                let mut threads = shared.threads.lock().unwrap_or_else(|e| e.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A parsed request target.
struct Request {
    path: String,
    query: BTreeMap<String, String>,
}

fn parse_target(target: &str) -> Request {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    Request {
        path: path.to_string(),
        query,
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    // The rest of the head (kube sends GETs without a body).
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let req = parse_target(&target);
    let (down, cut) = {
        let mut d = shared.lock();
        let down = d.down;
        d.log.push(if down {
            format!("GET {target} (down)")
        } else {
            format!("GET {target}")
        });
        (down, d.cut)
    };
    let mut stream = stream;
    if down {
        return Ok(());
    }
    if req.path == "/version" {
        let body = json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "fake",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
            "compiler": "gc", "platform": "linux/amd64"
        });
        return respond(&mut stream, 200, &body);
    }
    let Some(res) = ALL.iter().copied().find(|r| r.path() == req.path) else {
        return respond(&mut stream, 404, &status(404, "NotFound", "not served"));
    };
    if shared.lock().missing.contains(&res) {
        return respond(
            &mut stream,
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let selector = Selector::new(&req.query);
    if matches!(
        req.query.get("watch").map(String::as_str),
        Some("true" | "1")
    ) {
        watch(stream, shared, res, &req, &selector, cut)
    } else {
        let delay = shared.lock().list_delay.get(&res).copied();
        if let Some(delay) = delay {
            let until = Instant::now() + delay;
            while Instant::now() < until && !shared.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        list(&mut stream, shared, res, &req, &selector)
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

/// `fieldSelector=spec.nodeName=X` and `labelSelector=k=v,...`.
struct Selector {
    node: Option<String>,
    labels: Vec<(String, String)>,
}

impl Selector {
    fn new(query: &BTreeMap<String, String>) -> Selector {
        let node = query.get("fieldSelector").and_then(|f| {
            f.split(',').find_map(|term| {
                let v = term
                    .strip_prefix("spec.nodeName==")
                    .or_else(|| term.strip_prefix("spec.nodeName="))?;
                Some(v.to_string())
            })
        });
        let labels = query
            .get("labelSelector")
            .map(|l| {
                l.split(',')
                    .filter_map(|t| {
                        let (k, v) = t.split_once('=')?;
                        Some((k.to_string(), v.trim_start_matches('=').to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Selector { node, labels }
    }

    fn matches(&self, object: &Value) -> bool {
        if let Some(node) = &self.node
            && object["spec"]["nodeName"].as_str() != Some(node.as_str())
        {
            return false;
        }
        self.labels
            .iter()
            .all(|(k, v)| object["metadata"]["labels"][k].as_str() == Some(v.as_str()))
    }
}

fn list(
    stream: &mut TcpStream,
    shared: &Shared,
    res: Res,
    req: &Request,
    selector: &Selector,
) -> std::io::Result<()> {
    let d = shared.lock();
    let all: Vec<&Value> = d
        .objects
        .get(&res)
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|o| selector.matches(o))
        .collect();
    let start: usize = req
        .query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let items: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|o| (*o).clone())
        .collect();
    let mut metadata = json!({ "resourceVersion": d.rv.to_string() });
    if start.saturating_add(limit) < all.len() {
        metadata["continue"] = json!((start + limit).to_string());
    }
    drop(d);
    let body = json!({
        "kind": format!("{}List", res.kind()),
        "apiVersion": res.api_version(),
        "metadata": metadata,
        "items": items,
    });
    respond(stream, 200, &body)
}

fn chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    write!(stream, "{:x}\r\n", line.len())?;
    stream.write_all(&line)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

fn watch(
    mut stream: TcpStream,
    shared: &Shared,
    res: Res,
    req: &Request,
    selector: &Selector,
    cut: u64,
) -> std::io::Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let deadline = Instant::now() + timeout;
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )?;
    let (epoch, expired, mut sent_rv) = {
        let d = shared.lock();
        // resourceVersion 0 (or none): start at the most recent state.
        let from = if from == 0 { d.rv } else { from };
        (d.epoch, from < d.expired_below, from)
    };
    if expired {
        chunk(
            &mut stream,
            &json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}),
        )?;
        return stream.write_all(b"0\r\n\r\n");
    }
    loop {
        let mut events = Vec::new();
        {
            let mut d = shared.lock();
            loop {
                if shared.stop.load(Ordering::SeqCst) || d.cut != cut || d.missing.contains(&res) {
                    // Cut without the final chunk, as a dying server would.
                    return Ok(());
                }
                if d.epoch != epoch {
                    drop(d);
                    chunk(
                        &mut stream,
                        &json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}),
                    )?;
                    return stream.write_all(b"0\r\n\r\n");
                }
                if Instant::now() >= deadline {
                    drop(d);
                    return stream.write_all(b"0\r\n\r\n");
                }
                if d.rv > sent_rv {
                    break;
                }
                d = shared
                    .changed
                    .wait_timeout(d, Duration::from_millis(20))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            for c in d.history.iter().filter(|c| c.res == res && c.rv > sent_rv) {
                let was = c.prev.as_ref().is_some_and(|p| selector.matches(p));
                let is = c.kind != "DELETED" && selector.matches(&c.object);
                let kind = match (was, is) {
                    (true, true) => c.kind,
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => continue,
                };
                let object = if c.unreadable {
                    json!({"kind": res.kind(), "apiVersion": res.api_version(), "metadata": {"name": 7}})
                } else {
                    c.object.clone()
                };
                events.push(json!({"type": kind, "object": object}));
            }
            if events.is_empty() && bookmarks {
                let object = json!({
                    "kind": res.kind(), "apiVersion": res.api_version(),
                    "metadata": {"resourceVersion": d.rv.to_string()}
                });
                events.push(json!({"type": "BOOKMARK", "object": object}));
            }
            sent_rv = d.rv;
        }
        for e in &events {
            chunk(&mut stream, e)?;
        }
    }
}
