//! The sans-IO core of a shard: every per-query decision, no sockets, no clock.
//!
//! A [`Core`] is driven by its shard:
//! 1. feed inputs: [`Core::handle_client`], [`Core::handle_upstream`] (each with the current
//!    time) and [`Core::handle_timeout`];
//! 2. call [`Core::commit_allows`] once per batch: it writes the allow entries that answers of
//!    this batch need, in one batch, and only then makes those answers transmittable;
//! 3. drain [`Core::poll_transmit`] into the sockets and [`Core::poll_record`] into the
//!    consumer queue;
//! 4. sleep until [`Core::poll_timeout`] or the next packet.
//!
//! Outcomes are counted in [`Stats`]; nothing in here allocates once its tables are warm (the
//! pending table, the ID maps and the output arena are sized at construction).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_matcher::{MAX_WIRE_LEN, Name, RuleId, RuleSet};
use dnsfence_policy::{DnsVerdict, EndpointId, EndpointKey, Proto, Snapshot};

use crate::allow::{AllowBatch, AllowKey, AllowSink, PortSpec};
use crate::histogram::{Latency, Local, Network};
use crate::wire::{self, Addresses, Edns, Query, Rcode};

/// What to do with queries from sources the endpoint registry does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownSource {
    /// Answer them with the reject rcode (the default).
    Deny,
    /// Forward them, unrestricted and unrecorded in the allow table.
    Allow,
}

/// The knobs of a core; every one is a flag of `dnsfence agent`.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The upstream servers, each with `upstream_sockets` sockets (socket `k` is server
    /// `k / upstream_sockets`'s); an answer from another address than its socket's server is
    /// dropped. Without `addressed`, every query goes to the first.
    pub upstreams: Vec<SocketAddr>,
    /// Each query goes to the server its client addressed ([`Origin::server`], eBPF
    /// redirection) when that server is one of `upstreams` (the servers trusted to answer);
    /// one addressed to another server is refused with the reject rcode
    /// ([`Stats::untrusted_server`]), one with no addressed server (sent to the proxy itself)
    /// gets SERVFAIL ([`Stats::no_upstream`]).
    pub addressed: bool,
    /// The DNS server a query is taken to be addressed to when the datapath does not say
    /// (policy DNS rules are written for port 53 of the cluster's DNS server).
    pub policy_server: SocketAddr,
    /// Upstream UDP sockets (random source ports) the shard opened per server.
    pub upstream_sockets: u16,
    /// Queries one upstream UDP socket sends before it is retired and replaced by a socket
    /// on a fresh random port (see [`Core::poll_replace`]), so that an off-path spoofer never
    /// learns a port for long. 0: never rotate.
    pub upstream_socket_queries: u32,
    /// Answers with no query in flight under their ID on one upstream socket after which the
    /// socket counts as under attack: it is replaced at once and its queries re-sent from the
    /// new port. 0: never.
    pub upstream_unknown_id_burst: u32,
    /// After this long without an answer the client gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// The rcode for denied names: REFUSED or NXDOMAIN.
    pub reject_rcode: Rcode,
    /// Floor for the TTL of allow entries, in seconds.
    pub min_ttl: u32,
    /// Ceiling for the TTL of allow entries, in seconds (an answer with a 68-year TTL must
    /// not pin its addresses in the allow table).
    pub max_ttl: u32,
    /// Queries from unknown sources.
    pub unknown_source: UnknownSource,
    /// eBPF mode: every query that reaches the proxy through this node's hooks has an origin
    /// record; one without (evicted under a flood, or sent around the hooks) is refused as
    /// unidentified whatever `unknown_source` says (it could be any workload's).
    pub require_origin: bool,
    /// Most queries in flight upstream at once; beyond it new queries get SERVFAIL.
    pub max_pending: usize,
    /// Most of those one endpoint may hold (unknown sources count as one endpoint), so a
    /// workload querying names that never answer cannot starve the others. Besides, an
    /// endpoint never holds as many as are free (its fair share: endpoints flooding together
    /// leave a share free for the rest).
    pub max_pending_per_endpoint: usize,
    /// Most (endpoint, address) entries this shard remembers as written; beyond it the
    /// memory is cleared (which costs extra writes, never correctness).
    pub allow_cache_entries: usize,
    /// Seed of the ID generator (take it from the OS; tests fix it).
    pub seed: [u64; 2],
    /// Largest UDP answer the shard's sockets receive; the EDNS0 payload size of forwarded
    /// queries is lowered to it.
    pub max_udp_payload: u16,
    /// Randomise the case of forwarded question names and accept only answers that echo it
    /// exactly (DNS 0x20): more spoofing resistance, for upstreams that preserve case (most
    /// recursive resolvers do).
    pub upstream_0x20: bool,
    /// With `upstream_0x20`: when the upstream answers [`CASE_FALLBACK_AFTER`] queries with
    /// the right ID and name but another spelling before it ever echoed one exactly, it does
    /// not preserve case: 0x20 is switched off for it (counted in
    /// [`Stats::upstream_0x20_disabled`]). Once one answer echoed the spelling, never.
    pub upstream_0x20_fallback: bool,
    /// Emit a [`Flow`] record per query (for the flow log). Off, the per-query cost is the
    /// counters only; address observations are emitted either way.
    pub flow_records: bool,
}

impl CoreConfig {
    /// Defaults for an upstream, as `dnsfence agent` uses them.
    pub fn new(upstream: SocketAddr) -> CoreConfig {
        CoreConfig {
            upstreams: vec![upstream],
            addressed: false,
            policy_server: SocketAddr::new(upstream.ip(), 53),
            upstream_sockets: 4,
            upstream_socket_queries: 256,
            upstream_unknown_id_burst: 32,
            upstream_timeout: Duration::from_secs(5),
            reject_rcode: Rcode::Refused,
            min_ttl: 0,
            max_ttl: 86_400,
            unknown_source: UnknownSource::Deny,
            require_origin: false,
            max_pending: 8192,
            max_pending_per_endpoint: 4096,
            allow_cache_entries: 65536,
            seed: [0x5eed, 0x5eed_5eed],
            max_udp_payload: 4096,
            upstream_0x20: true,
            upstream_0x20_fallback: true,
            flow_records: false,
        }
    }
}

/// Who asked: where the answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A UDP client at this address.
    Udp(SocketAddr),
    /// A TCP client connection of the shard.
    Tcp {
        /// The shard's connection id.
        conn: crate::io::ConnId,
        /// The client's address.
        peer: SocketAddr,
    },
}

impl Client {
    fn addr(&self) -> SocketAddr {
        match *self {
            Client::Udp(addr) | Client::Tcp { peer: addr, .. } => addr,
        }
    }

    fn proto(&self) -> Proto {
        match self {
            Client::Udp(_) => Proto::Udp,
            Client::Tcp { .. } => Proto::Tcp,
        }
    }
}

/// Where a transmit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To a client.
    Client(Client),
    /// To an upstream server from UDP socket `socket` (connected to it).
    UpstreamUdp {
        /// The shard's upstream socket index.
        socket: u16,
    },
    /// To an upstream server over the shard's TCP connection to it.
    UpstreamTcp {
        /// The server's index in [`CoreConfig::upstreams`].
        server: u16,
    },
}

/// The written-entries memory, sized at start and written once so that its pages are in
/// memory before the shard binds its sockets (its first writes would otherwise each pay a
/// page fault on the answer path).
fn prefaulted_written(n: usize) -> HashMap<(AllowKey, u64), Instant, foldhash::fast::RandomState> {
    let mut map = HashMap::with_capacity_and_hasher(n, foldhash::fast::RandomState::default());
    let now = Instant::now();
    for i in 0..n as u64 {
        let key = AllowKey {
            endpoint: EndpointKey(i),
            ip: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            ports: PortSpec::ALL,
        };
        map.insert((key, i), now);
    }
    map.clear();
    map
}

/// Whether `a` and `b` name one server: address (an IPv4-mapped IPv6 address is its IPv4
/// address) and port; IPv6 flow labels, which a sender chooses, do not count.
pub fn same_server(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// A datagram or TCP message to send. The bytes stay valid until the next call on the core.
#[derive(Debug)]
pub struct Transmit<'a> {
    /// Where to.
    pub to: Destination,
    /// The DNS message (no TCP length prefix).
    pub data: &'a [u8],
}

/// What became of a query, as the flow log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded and answered by the upstream.
    Forward,
    /// Refused by policy (REFUSED or NXDOMAIN written).
    Refuse,
    /// Refused: the source is not a known endpoint.
    RefuseUnknownSource,
    /// The upstream did not answer in time; SERVFAIL written.
    Timeout,
    /// Malformed; FORMERR/NOTIMP written or dropped.
    Malformed,
    /// No room (pending table full) or the allow write failed; SERVFAIL written.
    Overload,
    /// The upstream's answer could not be used (unparsable records, or repeated answers
    /// with the query's ID but another question); SERVFAIL written.
    BadAnswer,
    /// The upstream is unreachable (an ICMP error on the upstream socket); SERVFAIL written.
    Unreachable,
}

/// A record for the consumer: an observation of addresses or a flow.
// Records travel by value through fixed slots of a bounded queue: boxing the larger variant
// would cost an allocation per answer.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Record {
    /// Addresses learned for a name an endpoint may reach.
    Addresses(IpUpdate),
    /// One query's outcome.
    Flow(Flow),
}

/// Addresses learned from an allowed answer (the FQDN cache's input and the agent's sync).
#[derive(Debug, Clone)]
pub struct IpUpdate {
    /// When the answer arrived.
    pub at: Instant,
    /// The endpoint that asked (stable key).
    pub endpoint: EndpointKey,
    /// The question name.
    pub name: Name,
    /// The addresses on the CNAME chain.
    pub addresses: Addresses,
    /// TTL used for the allow entries (the chain's minimum, raised to `min_ttl`).
    pub ttl: u32,
    /// Up to eight matching `toFQDNs` rule ids (`rules_total` says how many matched).
    pub rules: [u32; 8],
    /// Number of matching rules.
    pub rules_total: usize,
}

/// One query's outcome.
#[derive(Debug, Clone)]
pub struct Flow {
    /// When the verdict was given.
    pub at: Instant,
    /// The client's address.
    pub client: SocketAddr,
    /// The endpoint (stable key), when known.
    pub endpoint: Option<EndpointKey>,
    /// The question name when it is a valid name (else the root).
    pub name: Name,
    /// Question type.
    pub qtype: u16,
    /// Verdict.
    pub verdict: Verdict,
    /// The rcode the client got (None when dropped).
    pub rcode: Option<u8>,
    /// Time from query to answer for forwarded queries.
    pub upstream_latency: Option<Duration>,
}

/// Counters of one core. Every client query ends in exactly one of `forwarded`, `refused`,
/// `refused_unknown_source`, `malformed_answered`, `malformed_dropped`, `responses_dropped`
/// or `pending_full`; every forwarded one in `answered`, `timeouts`, `answer_malformed`,
/// `spoofing_suspected`, `case_mismatch_failed`, `upstream_unreachable` or an allow-write
/// failure. Every answer the I/O layer could not send is counted in `client_sends_dropped`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Upstream latency of the answers relayed (`answered`): from the query's forwarding to
    /// its answer's arrival, as the shard's clock sees the two events.
    pub upstream_latency: Latency<Network>,
    /// Duration of each batched allow write (`allow_batches` with entries): the answers
    /// held for it wait this long on top of their upstream latency (measured by the shard).
    pub write_latency: Latency<Local>,
    /// Time a client query spends in the core: parse, endpoint lookup, policy walk, and the
    /// refusal written or the forward queued (measured by the shard).
    pub processing_latency: Latency<Local>,
    /// Upstream answers relayed, by rcode (the header's 4 bits).
    pub upstream_rcodes: [u64; 16],
    /// Client queries received.
    pub queries: u64,
    /// Queries forwarded upstream.
    pub forwarded: u64,
    /// Queries refused by policy.
    pub refused: u64,
    /// Queries refused because the source is unknown.
    pub refused_unknown_source: u64,
    /// Queries with no origin record in eBPF mode (refused as unidentified; also counted in
    /// `refused_unknown_source`).
    pub origin_missing: u64,
    /// Malformed queries answered FORMERR/NOTIMP.
    pub malformed_answered: u64,
    /// Malformed queries dropped (no readable header).
    pub malformed_dropped: u64,
    /// Responses (QR set) received on the listen socket, dropped unanswered.
    pub responses_dropped: u64,
    /// Queries answered SERVFAIL because the pending table, or the endpoint's share of it,
    /// was full.
    pub pending_full: u64,
    /// Of those, refused at the endpoint's fair share: below its quota, it already held as
    /// many as were free.
    pub pending_fair_share: u64,
    /// Queries answered SERVFAIL after the upstream timeout.
    pub timeouts: u64,
    /// Upstream answers relayed to clients.
    pub answered: u64,
    /// Upstream answers relayed with TC set (client retries over TCP).
    pub truncated: u64,
    /// Upstream datagrams from an address other than their socket's server.
    pub upstream_wrong_source: u64,
    /// Allowed queries answered SERVFAIL because they had no server to go to (`addressed`,
    /// and the client addressed the proxy itself).
    pub no_upstream: u64,
    /// Allowed queries refused because the server their client addressed is not one of the
    /// trusted `upstreams` (`addressed`): its answers would open egress.
    pub untrusted_server: u64,
    /// Upstream datagrams that are not well-formed answers.
    pub upstream_malformed: u64,
    /// Upstream answers with no query in flight under their ID.
    pub upstream_unknown_id: u64,
    /// Upstream answers whose question differs from the query's.
    pub upstream_wrong_question: u64,
    /// Queries given up (SERVFAIL) after several answers with their ID but another question.
    pub spoofing_suspected: u64,
    /// Answers whose records could not be parsed (client got SERVFAIL).
    pub answer_malformed: u64,
    /// Address records in answers that were not on the question's CNAME chain (ignored).
    pub off_chain_records: u64,
    /// Addresses beyond the 32 kept from one answer (not allowed).
    pub addresses_overflow: u64,
    /// Answer addresses inside the cluster (`Snapshot::in_cluster`), which a toFQDNs rule
    /// never opens (DNS rebinding); the answer itself is released.
    pub addresses_in_cluster: u64,
    /// Enforced answers whose TTLs were lowered: to the TTL their allow entries were written
    /// for (the chain's minimum, raised to `min_ttl`, capped at `max(max_ttl, min_ttl)`),
    /// which a client must not cache past; to the cap for answers that open nothing.
    pub ttl_clamped: u64,
    /// Allow entries written.
    pub allow_writes: u64,
    /// Allow write batches.
    pub allow_batches: u64,
    /// Allow write batches that failed (their answers became SERVFAIL).
    pub allow_write_failures: u64,
    /// Records dropped because the record queue was full.
    pub records_dropped: u64,
    /// Answers whose question matched except for the 0x20 spelling sent.
    pub upstream_case_mismatch: u64,
    /// Queries answered SERVFAIL at once because the upstream answered them in another
    /// spelling before it had ever echoed one exactly (it may not preserve case).
    pub case_mismatch_failed: u64,
    /// Upstream servers 0x20 was switched off for (they do not preserve case).
    pub upstream_0x20_disabled: u64,
    /// Upstream sockets replaced by a fresh random port (after their query quota, or early).
    pub upstream_sockets_rotated: u64,
    /// Upstream sockets retired early: a burst of answers with unknown IDs (an attack).
    pub upstream_sockets_attacked: u64,
    /// Socket replacements the I/O layer could not do (the old socket stays in use).
    pub upstream_socket_replace_failed: u64,
    /// Queries re-sent from a replacement socket (their socket was replaced before the answer).
    pub upstream_resent: u64,
    /// Queries sent on a retiring socket because every upstream socket was retiring (more
    /// queries in flight than `upstream_sockets` × `upstream_socket_queries` cover: raise
    /// `--upstream-sockets`). Such a port lives past its quota, at most `RETIRE_GRACE` more.
    pub upstream_socket_overrun: u64,
    /// Queries answered SERVFAIL at once because the upstream socket reported an ICMP error
    /// (port unreachable: `ECONNREFUSED`), or because their TCP connection to the upstream
    /// was lost a second time.
    pub upstream_unreachable: u64,
    /// Queries re-sent on a new TCP connection because theirs to the upstream was lost
    /// before the answer (once per query, as RFC 7766 asks of a client).
    pub upstream_tcp_resent: u64,
    /// Messages to clients the I/O layer dropped (queue or buffer full, send error, closed
    /// connection).
    pub client_sends_dropped: u64,
    /// Messages to the upstream the I/O layer dropped.
    pub upstream_sends_dropped: u64,
}

const NO_SLOT: u32 = u32::MAX;
/// Question bytes kept per pending query: a name of up to 255 bytes, type and class.
const QUESTION_MAX: usize = MAX_WIRE_LEN + 4;
/// SipHash-2-4 (Aumasson and Bernstein) of one 64-bit word under a 128-bit key.
fn siphash24(key: [u64; 2], word: u64) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    // The message is the 8 bytes of `word`, then the final block carrying the length (8).
    for block in [word, 8u64 << 56] {
        v[3] ^= block;
        round(&mut v);
        round(&mut v);
        v[0] ^= block;
    }
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// Answers with a query's ID but the wrong question after which the query is abandoned.
const MAX_MISMATCHES: u8 = 3;
/// Answers in another spelling (and none exact) after which 0x20 is off for the upstream.
pub const CASE_FALLBACK_AFTER: u32 = 4;
/// How long a socket past its query quota waits for its queries' answers before it is
/// replaced anyway (what is still in flight is then re-sent from the new socket).
const RETIRE_GRACE: Duration = Duration::from_millis(500);
/// Most queries [`Core::handle_timeout`] expires per call, so one call's SERVFAILs fit the
/// shard's send queue; the rest go on the next call (the deadline is already due).
const MAX_EXPIRED_PER_CALL: usize = 512;
/// Most records buffered between two drains by the shard.
const RECORD_BUFFER: usize = 4096;

/// toFQDNs rule ids a pending query keeps (as many as an `IpUpdate` carries).
const FQDN_KEPT: usize = 8;
/// `Pending::fqdn_len` when more rules matched than are kept.
const FQDN_MORE: u8 = u8::MAX;

#[derive(Clone)]
struct Pending {
    client: Client,
    client_id: u16,
    client_flags: u16,
    question: [u8; QUESTION_MAX],
    question_len: u16,
    name_len: u16,
    qtype: u16,
    /// The endpoint in the pending query's own snapshot, and its stable key.
    endpoint: Option<EndpointId>,
    key: Option<EndpointKey>,
    /// Whether answers must go through the allow table (a known, restricted endpoint).
    enforce: bool,
    /// The toFQDNs rules (`RuleId`s of the query's snapshot) whose selectors match the
    /// queried name, found by the query's one walk of its name (`Snapshot::judge`): the
    /// answer path needs no second walk. `fqdn_len` of them, or `FQDN_MORE` when there were
    /// more than `FQDN_KEPT` (the answer path then walks the name again).
    fqdn: [u32; FQDN_KEPT],
    fqdn_len: u8,
    /// Generation of the snapshot the query was judged by (see `Core::in_use`).
    generation: u64,
    upstream: Destination,
    upstream_id: u16,
    sent_at: Instant,
    /// Answers with this query's ID but another question.
    mismatches: u8,
    /// Re-sent once already because its TCP connection to the upstream was lost.
    tcp_resent: bool,
    /// Index into `Core::in_flight_by_endpoint` this query is counted under.
    bucket: u32,
    /// Seed of the 0x20 spelling sent upstream, when `case_applied`.
    case_seed: u64,
    /// Whether the query went upstream in a 0x20 spelling.
    case_applied: bool,
    /// The query's EDNS0 parameters (payload clamped), forwarded in a minimal OPT record.
    edns: Option<Edns>,
    /// Neighbours in the in-flight list (oldest first), `NO_SLOT` at the ends.
    prev: u32,
    next: u32,
}

/// What the answers of one upstream server said of its letter case (DNS 0x20).
#[derive(Debug, Clone, Copy, Default)]
struct CaseState {
    /// Answers that echoed the 0x20 spelling exactly, and that did not (same ID and name).
    exact: u64,
    other: u32,
    /// 0x20 switched off for this server (it does not preserve case).
    off: bool,
}

/// One upstream UDP socket's life as the core sees it (the I/O layer owns the socket).
#[derive(Debug, Clone, Copy, Default)]
struct UpSocket {
    /// The index of its server in `CoreConfig::upstreams`.
    server: u16,
    /// Queries sent from it since it was opened.
    sent: u32,
    /// Queries in flight on it.
    in_flight: u32,
    /// Answers with unknown IDs received on it since it was opened.
    unknown: u32,
    /// Since when it takes no new queries (quota spent or under attack).
    retiring: Option<Instant>,
    /// Whether its replacement was queued for the shard.
    replace_queued: bool,
}

/// An answer waiting for its allow entries to be written; its pending slot stays taken
/// until then (it holds the client and the question, for SERVFAIL if the write fails).
struct Held {
    slot: u32,
    start: usize,
    len: usize,
    /// Its group in `Core::batch`.
    group: usize,
}

/// Where a redirected query came from, as the datapath recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The endpoint whose cgroup sent it, when the datapath knows it (then it takes
    /// precedence over the source address).
    pub endpoint: Option<EndpointKey>,
    /// The DNS server the client addressed; None when it sent the query to the proxy's own
    /// address (then DNS rules are judged against the configured policy server, as for a
    /// query that arrived without eBPF).
    pub server: Option<SocketAddr>,
}

/// Output arena: transmits are byte ranges of one buffer, which is reset when all are drained.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    ready: std::collections::VecDeque<(Destination, usize, usize)>,
}

impl Outbox {
    /// Drops the transmits queued for `to` (their queries are about to be pushed again).
    fn drop_queued(&mut self, to: Destination) {
        self.ready.retain(|(d, _, _)| *d != to);
    }

    fn with_capacity(bytes: usize) -> Outbox {
        Outbox {
            bytes: Vec::with_capacity(bytes),
            ready: std::collections::VecDeque::with_capacity(1024),
        }
    }

    /// Appends `data`, returning its range.
    fn push_bytes(&mut self, data: &[u8]) -> (usize, usize) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        (start, data.len())
    }
}

/// The per-shard query engine. See the module documentation for the call order.
pub struct Core {
    config: CoreConfig,
    snapshot: Arc<Snapshot>,
    /// Generation of `snapshot` (bumped by each `set_snapshot`).
    generation: u64,
    /// Queries in flight judged by `snapshot`.
    in_flight_current: u32,
    /// Queries in flight per endpoint of `snapshot`, by `EndpointId`; the last entry counts
    /// unknown sources. A reload recounts the queries in flight under the new numbering.
    in_flight_by_endpoint: Vec<u32>,
    /// Earlier snapshots that queries in flight still use, with their count. Pending queries
    /// refer to snapshots by generation, so forwarding and answering touch no reference count
    /// shared with other shards.
    in_use: std::collections::VecDeque<(u64, Arc<Snapshot>, u32)>,
    pending: Vec<Pending>,
    free: Vec<u32>,
    /// Per upstream channel (UDP sockets, then TCP): upstream ID → pending slot.
    ids: Vec<Box<[u32]>>,
    /// In-flight slots, oldest first: the timeout is the same for all, so the head expires
    /// first. Linked through the slots themselves, so answering unlinks in O(1).
    oldest: u32,
    newest: u32,
    outbox: Outbox,
    held: Vec<Held>,
    batch: AllowBatch,
    /// Allow entry → expiry known to be in the allow table (cleared at a reload, which may
    /// have revoked entries).
    /// Seeded foldhash: fast, and keys partly chosen by upstream answers cannot be aimed at
    /// one bucket without the per-process seed.
    /// Keyed also by a hash of the justifying name: a second name answering an address the
    /// first one already opened is still written, so the ledger learns it (a reload that
    /// drops the first name must not revoke what the second one justifies).
    written: HashMap<(AllowKey, u64), Instant, foldhash::fast::RandomState>,
    /// The allow table's epoch `written` was filled under (see [`AllowSink::epoch`]).
    allow_epoch: u64,
    /// Scratch: the distinct port specs of one answer's matching rules.
    specs: Vec<PortSpec>,
    /// The batch group `learn` began last.
    held_group: usize,
    /// Address observations of this batch's answers, by group, recorded once written.
    updates: Vec<(usize, IpUpdate)>,
    records: std::collections::VecDeque<Record>,
    rules: RuleSet,
    /// Scratch for the addresses of one answer (boxed: moved in and out without a copy).
    addresses: Option<Box<Addresses>>,
    /// Key and counter of the ID generator (SipHash-2-4 of a counter under a secret key).
    rng_key: [u64; 2],
    rng_counter: u64,
    /// The upstream UDP sockets' lives, by index.
    sockets: Vec<UpSocket>,
    /// Sockets retiring (some `UpSocket::retiring` is set).
    retiring: usize,
    /// Sockets the shard should replace (drained by `poll_replace`).
    replace: Vec<u16>,
    /// What each upstream server's answers said of its letter case (DNS 0x20), by server.
    case: Vec<CaseState>,
    stats: Stats,
}

impl Core {
    /// A core over `snapshot`.
    ///
    /// # Panics
    /// If `config.max_pending` is not below 65536 (an upstream ID must stay free for every
    /// query in flight), `config.upstream_sockets` is 0, or `config.upstream_timeout` is over
    /// a day.
    pub fn new(config: CoreConfig, snapshot: Arc<Snapshot>) -> Core {
        assert!(
            config.max_pending < 65536,
            "max_pending must be below 65536"
        );
        assert!(config.upstream_sockets > 0, "at least one upstream socket");
        assert!(
            !config.upstreams.is_empty() && config.upstreams.len() < usize::from(u16::MAX),
            "at least one upstream server"
        );
        assert!(
            config.upstream_timeout <= Duration::from_secs(86_400),
            "upstream_timeout above a day"
        );
        let sockets = config.upstreams.len() * usize::from(config.upstream_sockets);
        assert!(sockets < usize::from(u16::MAX), "too many upstream sockets");
        let channels = sockets + 1;
        let template = Pending {
            client: Client::Udp(config.upstreams[0]),
            client_id: 0,
            client_flags: 0,
            question: [0; QUESTION_MAX],
            question_len: 0,
            name_len: 0,
            qtype: 0,
            endpoint: None,
            key: None,
            enforce: false,
            fqdn: [0; FQDN_KEPT],
            fqdn_len: 0,
            generation: 0,
            upstream: Destination::UpstreamTcp { server: 0 },
            upstream_id: 0,
            sent_at: Instant::now(),
            mismatches: 0,
            tcp_resent: false,
            bucket: 0,
            case_seed: 0,
            case_applied: false,
            edns: None,
            prev: NO_SLOT,
            next: NO_SLOT,
        };
        let pending = vec![template; config.max_pending];
        let free = (0..config.max_pending as u32).rev().collect();
        let ids = (0..channels)
            .map(|_| vec![NO_SLOT; 65536].into_boxed_slice())
            .collect();
        let rules = snapshot.rule_set();
        let config_servers = config.upstreams.len();
        let config_sockets = config.upstream_sockets;
        Core {
            rng_key: config.seed,
            rng_counter: 0,
            written: prefaulted_written(config.allow_cache_entries),
            allow_epoch: 0,
            oldest: NO_SLOT,
            newest: NO_SLOT,
            held: Vec::with_capacity(256),
            batch: AllowBatch::with_capacity(1024),
            specs: Vec::with_capacity(64),
            held_group: 0,
            updates: Vec::with_capacity(256),
            records: std::collections::VecDeque::with_capacity(RECORD_BUFFER),
            outbox: Outbox::with_capacity(1 << 20),
            config,
            in_use: std::collections::VecDeque::new(),
            in_flight_current: 0,
            in_flight_by_endpoint: vec![0; snapshot.stats().endpoints + 1],
            generation: 0,
            snapshot,
            pending,
            free,
            ids,
            rules,
            addresses: Some(Box::default()),
            sockets: (0..sockets)
                .map(|k| UpSocket {
                    server: (k / usize::from(config_sockets)) as u16,
                    ..UpSocket::default()
                })
                .collect(),
            retiring: 0,
            replace: Vec::with_capacity(sockets),
            case: vec![CaseState::default(); config_servers],
            stats: Stats::default(),
        }
    }

    /// Replaces the policy snapshot for new queries; queries in flight keep theirs.
    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        self.rules = snapshot.rule_set();
        let old = std::mem::replace(&mut self.snapshot, snapshot);
        if self.in_flight_current > 0 {
            self.in_use
                .push_back((self.generation, old, self.in_flight_current));
        }
        self.in_flight_current = 0;
        self.generation += 1;
        self.recount_endpoint_shares();
        // The reload may have revoked entries this shard remembers as written.
        self.written.clear();
    }

    /// The TTL an answer's allow entries are written for: the chain's minimum TTL raised to
    /// `min_ttl`, capped at `max(max_ttl, min_ttl)`.
    fn entry_ttl(&self, addresses: &wire::Addresses) -> u32 {
        addresses
            .min_ttl
            .max(self.config.min_ttl)
            .min(self.config.max_ttl.max(self.config.min_ttl))
    }

    /// Takes the allow table's epoch (read once per poll): when it changed, another writer
    /// may have removed entries this shard remembers as written, so it forgets them and the
    /// next answers that need them go to the sink (which puts back what is missing).
    pub fn note_allow_epoch(&mut self, epoch: u64) {
        if epoch != self.allow_epoch {
            self.allow_epoch = epoch;
            self.written.clear();
        }
    }

    /// Rebuilds the per-endpoint counts for the current snapshot's numbering: every query in
    /// flight (and every held answer, whose slot is still taken) is counted again under its
    /// workload's new `EndpointId`, found by its stable key. O(queries in flight), per reload.
    fn recount_endpoint_shares(&mut self) {
        let unknown = self.snapshot.stats().endpoints;
        self.in_flight_by_endpoint.clear();
        self.in_flight_by_endpoint.resize(unknown + 1, 0);
        let mut recount = |p: &mut Pending| {
            let bucket = p
                .key
                .and_then(|key| self.snapshot.endpoint_by_key(key))
                .map_or(unknown, |ep| (ep.0 as usize).min(unknown));
            p.bucket = bucket as u32;
            self.in_flight_by_endpoint[bucket] += 1;
        };
        let mut slot = self.oldest;
        while slot != NO_SLOT {
            let p = &mut self.pending[slot as usize];
            slot = p.next;
            recount(p);
        }
        for h in &self.held {
            recount(&mut self.pending[h.slot as usize]);
        }
    }

    /// Counts a query off snapshot `generation`; an earlier snapshot is released when its
    /// last query is done.
    fn release_generation(&mut self, generation: u64) {
        if generation == self.generation {
            self.in_flight_current -= 1;
        } else if let Some(i) = self.in_use.iter().position(|(g, _, _)| *g == generation) {
            self.in_use[i].2 -= 1;
            if self.in_use[i].2 == 0 {
                self.in_use.remove(i);
            }
        }
    }

    /// The snapshot new queries are judged by.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queries in flight upstream.
    pub fn in_flight(&self) -> usize {
        self.config.max_pending - self.free.len()
    }

    /// The next value of a keyed PRF (SipHash-2-4 of a counter under the secret `seed`): upstream
    /// IDs, socket choices and 0x20 spellings reveal nothing about the ones to come, even to
    /// someone who sees many of them (a plain PRNG's output gives its state away).
    fn next_random(&mut self) -> u64 {
        self.rng_counter = self.rng_counter.wrapping_add(1);
        siphash24(self.rng_key, self.rng_counter)
    }

    /// A query from a client. `origin` is what the datapath (eBPF redirection) recorded of
    /// it: the endpoint that sent it and the server it addressed; without it, the endpoint
    /// is found by source address and the configured policy server is assumed.
    pub fn handle_client(
        &mut self,
        now: Instant,
        client: Client,
        origin: Option<Origin>,
        packet: &[u8],
    ) {
        self.stats.queries += 1;
        let query = match wire::parse_query(packet) {
            Ok(query) => query,
            Err(e) => {
                self.malformed(now, client, packet, e);
                return;
            }
        };
        let name = Name::from_wire(query.name_wire(packet));
        let server = origin.and_then(|o| o.server);
        // eBPF mode: no origin record means the sender cannot be told (any workload could
        // have sent it): no endpoint, and refused whatever --unknown-source says.
        let unidentified = self.config.require_origin && origin.is_none();
        if unidentified {
            self.stats.origin_missing += 1;
        }
        let endpoint = match origin.and_then(|o| o.endpoint) {
            _ if unidentified => None,
            // The datapath names the sending cgroup's endpoint; one the snapshot does not
            // (yet, or any longer) know is an unknown source.
            Some(key) => self.snapshot.endpoint_by_key(key),
            None => self.snapshot.endpoint_by_ip(client.addr().ip()),
        };
        let key = endpoint.map(|ep| self.snapshot.endpoint_key(ep));
        let verdict = match endpoint {
            None if unidentified => None,
            None => match self.config.unknown_source {
                UnknownSource::Deny => None,
                UnknownSource::Allow => Some(DnsVerdict::Unrestricted),
            },
            Some(ep) => Some(match &name {
                // Names outside the policy alphabet match no pattern: denied, unless the
                // endpoint is unrestricted.
                Err(_) if self.snapshot.is_restricted(ep) => DnsVerdict::Deny,
                Err(_) => DnsVerdict::Unrestricted,
                // One walk of the name: the verdict, and the toFQDNs rules the answer needs
                // (kept in the pending slot by `forward`).
                Ok(name) => self.snapshot.judge(
                    ep,
                    self.policy_server(server),
                    client.proto(),
                    name,
                    &mut self.rules,
                ),
            }),
        };
        match verdict {
            None | Some(DnsVerdict::Deny) => {
                let (counted, flow) = if verdict.is_none() {
                    (
                        &mut self.stats.refused_unknown_source,
                        Verdict::RefuseUnknownSource,
                    )
                } else {
                    (&mut self.stats.refused, Verdict::Refuse)
                };
                *counted += 1;
                let rcode = self.config.reject_rcode;
                self.reply_in_place(now, client, key, &query, packet, rcode, flow);
            }
            Some(verdict) => {
                let enforce = verdict == DnsVerdict::Allow;
                let upstream = match self.config.addressed {
                    false => Ok(0),
                    true => self.addressed_upstream(server),
                };
                match upstream {
                    Ok(upstream) => {
                        let ep = endpoint.zip(key);
                        self.forward(now, client, ep, enforce, upstream, &query, packet);
                    }
                    Err(rcode) => {
                        let flow = match rcode {
                            Rcode::ServFail => Verdict::Unreachable,
                            _ => Verdict::Refuse,
                        };
                        self.reply_in_place(now, client, key, &query, packet, rcode, flow);
                    }
                }
            }
        }
    }

    /// Answers `query` with `rcode` (same ID and question, written over a copy of the query)
    /// and records the flow.
    #[allow(clippy::too_many_arguments)]
    // Inlined into the denied path: out of line it cost that path 2.4 % more instructions.
    #[inline(always)]
    fn reply_in_place(
        &mut self,
        now: Instant,
        client: Client,
        key: Option<EndpointKey>,
        query: &Query,
        packet: &[u8],
        rcode: Rcode,
        verdict: Verdict,
    ) {
        let edns = wire::query_edns(packet, query).map(|e| self.reply_edns(e));
        let (start, len) = self.outbox.push_bytes(packet);
        let len = wire::write_reply(
            &mut self.outbox.bytes[start..start + len],
            query,
            rcode,
            true,
            edns,
        );
        self.outbox.bytes.truncate(start + len);
        self.outbox
            .ready
            .push_back((Destination::Client(client), start, len));
        let name = query.name_wire(packet);
        self.record_flow(
            now,
            client,
            key,
            name,
            query.qtype,
            verdict,
            Some(rcode as u8),
            None,
        );
    }

    /// The OPT record of a locally generated reply: our own payload size, the client's DO bit.
    fn reply_edns(&self, query: Edns) -> Edns {
        Edns {
            payload: self.config.max_udp_payload,
            dnssec_ok: query.dnssec_ok,
        }
    }

    fn policy_server(&self, server: Option<SocketAddr>) -> SocketAddr {
        server.unwrap_or(self.config.policy_server)
    }

    fn malformed(&mut self, now: Instant, client: Client, packet: &[u8], e: wire::QueryError) {
        match e.rcode() {
            None => {
                if e == wire::QueryError::ResponseBit {
                    self.stats.responses_dropped += 1;
                } else {
                    self.stats.malformed_dropped += 1;
                }
                self.record_flow(now, client, None, &[], 0, Verdict::Malformed, None, None);
            }
            Some(rcode) => {
                self.stats.malformed_answered += 1;
                let (start, _) = self.outbox.push_bytes(&packet[..wire::HEADER_LEN]);
                let mut len = wire::write_header_reply(&mut self.outbox.bytes[start..], rcode);
                // A minimal OPT when the query's records can be walked to one.
                if let Some(edns) = wire::malformed_query_edns(packet) {
                    let opt = wire::opt_record(self.reply_edns(edns));
                    self.outbox.bytes.extend_from_slice(&opt);
                    self.outbox.bytes[start + 11] = 1;
                    len += wire::OPT_LEN;
                }
                self.outbox
                    .ready
                    .push_back((Destination::Client(client), start, len));
                self.record_flow(
                    now,
                    client,
                    None,
                    &[],
                    0,
                    Verdict::Malformed,
                    Some(rcode as u8),
                    None,
                );
            }
        }
    }

    /// The index of the server a query addressed to `server` goes to (`addressed`): it must
    /// be one of the trusted upstreams (else the reject rcode: a server the workload chose
    /// could answer anything, and its answers would open egress); a query addressed to the
    /// proxy itself has none (SERVFAIL).
    fn addressed_upstream(&mut self, server: Option<SocketAddr>) -> Result<u16, Rcode> {
        let Some(server) = server else {
            self.stats.no_upstream += 1;
            return Err(Rcode::ServFail);
        };
        match self
            .config
            .upstreams
            .iter()
            .position(|&u| same_server(u, server))
        {
            Some(i) => Ok(i as u16),
            None => {
                self.stats.untrusted_server += 1;
                Err(self.config.reject_rcode)
            }
        }
    }

    /// Forwards an allowed query to upstream server `upstream` (an index).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        now: Instant,
        client: Client,
        endpoint: Option<(EndpointId, EndpointKey)>,
        enforce: bool,
        upstream: u16,
        query: &Query,
        packet: &[u8],
    ) {
        let unknown = self.in_flight_by_endpoint.len() - 1;
        let bucket = endpoint.map_or(unknown, |(ep, _)| (ep.0 as usize).min(unknown));
        // Its quota, and its fair share: an endpoint takes a slot only while it holds fewer
        // than are free, so k endpoints flooding together hold at most k/(k+1) of the table
        // and the rest stays free for the others (review finding: at the default quota, half
        // the table, two endpoints could take all of it).
        let held = self.in_flight_by_endpoint[bucket] as usize;
        let fair_share = held >= self.free.len() && !self.free.is_empty();
        let endpoint_full = held >= self.config.max_pending_per_endpoint || fair_share;
        let slot = if endpoint_full { None } else { self.free.pop() };
        let Some(slot) = slot else {
            self.stats.pending_full += 1;
            if fair_share && held < self.config.max_pending_per_endpoint {
                self.stats.pending_fair_share += 1;
            }
            let key = endpoint.map(|(_, key)| key);
            let servfail = Rcode::ServFail;
            self.reply_in_place(now, client, key, query, packet, servfail, Verdict::Overload);
            return;
        };
        // One PRF output for the socket (its upper half) and the ID (bits 16..32).
        let random = self.next_random();
        // TCP clients are forwarded over TCP (their answers may not fit a datagram).
        let (channel, destination) = match client {
            Client::Tcp { .. } => (
                self.sockets.len(),
                Destination::UpstreamTcp { server: upstream },
            ),
            Client::Udp(_) => {
                let socket = self.pick_socket(random >> 32, upstream);
                (usize::from(socket), Destination::UpstreamUdp { socket })
            }
        };
        let mut upstream_id = (random >> 16) as u16;
        while self.ids[channel][usize::from(upstream_id)] != NO_SLOT {
            upstream_id = (self.next_random() >> 16) as u16;
        }
        self.ids[channel][usize::from(upstream_id)] = slot;

        let question = &packet[wire::HEADER_LEN..query.question_end];
        let p = &mut self.pending[slot as usize];
        p.client = client;
        p.client_id = query.id;
        p.client_flags = query.flags;
        p.question[..question.len()].copy_from_slice(question);
        p.question_len = question.len() as u16;
        p.name_len = query.name_len as u16;
        p.qtype = query.qtype;
        p.endpoint = endpoint.map(|(ep, _)| ep);
        p.key = endpoint.map(|(_, key)| key);
        p.enforce = enforce;
        // `enforce` means an Allow verdict, which only `Snapshot::judge` gives: `rules`
        // holds this query's toFQDNs rules.
        let rules = self.rules.as_slice();
        p.fqdn_len = match enforce {
            false => 0,
            true if rules.len() > FQDN_KEPT => FQDN_MORE,
            true => {
                for (dst, rule) in p.fqdn.iter_mut().zip(rules) {
                    *dst = rule.0;
                }
                rules.len() as u8
            }
        };
        p.generation = self.generation;
        p.upstream = destination;
        p.upstream_id = upstream_id;
        p.sent_at = now;
        p.mismatches = 0;
        p.tcp_resent = false;
        p.prev = self.newest;
        p.next = NO_SLOT;
        match self.newest {
            NO_SLOT => self.oldest = slot,
            newest => self.pending[newest as usize].next = slot,
        }
        self.newest = slot;
        self.in_flight_current += 1;
        self.in_flight_by_endpoint[bucket] += 1;
        self.pending[slot as usize].bucket = bucket as u32;

        let case_applied = self.config.upstream_0x20 && !self.case[usize::from(upstream)].off;
        let case_seed = if case_applied { self.next_random() } else { 0 };
        // The upstream sizes its answer by the EDNS0 payload size; a larger answer than the
        // shard can receive would be lost (and the client time out).
        let max_payload = self.config.max_udp_payload;
        let edns = wire::query_edns(packet, query).map(|e| Edns {
            payload: e.payload.min(max_payload),
            dnssec_ok: e.dnssec_ok,
        });
        let p = &mut self.pending[slot as usize];
        p.case_seed = case_seed;
        p.case_applied = case_applied;
        p.edns = edns;
        self.push_upstream_query(slot, Some(&packet[..query.question_end]));
        if let Destination::UpstreamUdp { socket } = destination {
            self.socket_sent(now, socket);
        }
        self.stats.forwarded += 1;
    }

    /// Queues the upstream copy of the query in `slot`: its upstream ID, its question in the
    /// spelling sent, and no record but a minimal OPT when the client sent one (no client
    /// cookie, option or stray record goes upstream). `client` is the client's header and
    /// question when at hand (one copy), else they are rebuilt from the slot (a re-send).
    fn push_upstream_query(&mut self, slot: u32, client: Option<&[u8]>) {
        let p = &self.pending[slot as usize];
        let start = self.outbox.bytes.len();
        match client {
            Some(header_and_question) => self.outbox.bytes.extend_from_slice(header_and_question),
            None => {
                self.outbox.bytes.extend_from_slice(&[0; wire::HEADER_LEN]);
                let question = &p.question[..usize::from(p.question_len)];
                self.outbox.bytes.extend_from_slice(question);
            }
        }
        let header = wire::one_question_header(p.upstream_id, p.client_flags, p.edns.is_some());
        if let Ok(dst) = <&mut [u8; wire::HEADER_LEN]>::try_from(
            &mut self.outbox.bytes[start..][..wire::HEADER_LEN],
        ) {
            *dst = header;
        }
        if let Some(edns) = p.edns {
            self.outbox.bytes.extend_from_slice(&wire::opt_record(edns));
        }
        let len = self.outbox.bytes.len() - start;
        if p.case_applied {
            let at = start + wire::HEADER_LEN;
            let name = &mut self.outbox.bytes[at..at + usize::from(p.name_len)];
            wire::apply_0x20(name, p.case_seed);
        }
        self.outbox.ready.push_back((p.upstream, start, len));
    }

    /// A random socket of upstream server `server` that is not retiring (the next one in
    /// service when the draw falls on a retiring one; when all are retiring, the draw).
    fn pick_socket(&mut self, random: u64, server: u16) -> u16 {
        let n = self.config.upstream_sockets;
        let base = server * n;
        let drawn = base + (random % u64::from(n)) as u16;
        if self.retiring == 0 {
            return drawn;
        }
        match (0..n)
            .map(|i| base + (drawn - base + i) % n)
            .find(|&i| self.sockets[usize::from(i)].retiring.is_none())
        {
            Some(socket) => socket,
            None => {
                self.stats.upstream_socket_overrun += 1;
                drawn
            }
        }
    }

    /// Counts a query sent from `socket`; at its quota the socket retires (takes no new
    /// queries, and is replaced once its queries are answered or `RETIRE_GRACE` passed).
    fn socket_sent(&mut self, now: Instant, socket: u16) {
        let quota = self.config.upstream_socket_queries;
        let s = &mut self.sockets[usize::from(socket)];
        s.sent += 1;
        s.in_flight += 1;
        if quota != 0 && s.sent >= quota && s.retiring.is_none() {
            s.retiring = Some(now);
            self.retiring += 1;
        }
    }

    /// Asks the shard to replace `socket` (once), retiring it if it was not.
    fn queue_replace(&mut self, now: Instant, socket: u16) {
        let s = &mut self.sockets[usize::from(socket)];
        if s.replace_queued {
            return;
        }
        s.replace_queued = true;
        if s.retiring.is_none() {
            s.retiring = Some(now);
            self.retiring += 1;
        }
        self.replace.push(socket);
    }

    /// The next upstream UDP socket the shard should close and replace by a fresh socket on a
    /// new random port (same index), then report with [`Core::upstream_replaced`] before
    /// draining transmits.
    pub fn poll_replace(&mut self) -> Option<u16> {
        self.replace.pop()
    }

    /// The shard replaced upstream socket `socket` (`ok`), or could not (then the old one
    /// stays in service). After a replacement the queries still in flight on it are re-sent
    /// from the new port, with the same ID and spelling: their answers would go to the closed
    /// port.
    pub fn upstream_replaced(&mut self, socket: u16, ok: bool) {
        let Some(s) = self.sockets.get_mut(usize::from(socket)) else {
            return;
        };
        if s.retiring.is_some() {
            self.retiring -= 1;
        }
        if !ok {
            // The old socket stays in service, and keeps its counts (review finding: reset,
            // they gave whoever forges answers to its port a fresh budget of ID guesses per
            // failed replacement): its next unknown ID, or its next query past the quota,
            // asks for a replacement again.
            s.retiring = None;
            s.replace_queued = false;
            self.stats.upstream_socket_replace_failed += 1;
            return;
        }
        *s = UpSocket {
            server: s.server,
            in_flight: s.in_flight,
            ..UpSocket::default()
        };
        self.stats.upstream_sockets_rotated += 1;
        // Queries of this turn still queued for the socket are re-sent below with the others:
        // dropped here, so that none goes twice (review finding: the second answer was an
        // unknown ID on the new port, counted toward its attack burst).
        self.outbox.drop_queued(Destination::UpstreamUdp { socket });
        let mut slot = self.oldest;
        while slot != NO_SLOT {
            let p = &self.pending[slot as usize];
            let next = p.next;
            if p.upstream == (Destination::UpstreamUdp { socket }) {
                self.push_upstream_query(slot, None);
                self.sockets[usize::from(socket)].sent += 1;
                self.stats.upstream_resent += 1;
            }
            slot = next;
        }
    }

    /// The upstream UDP socket `socket` reported an ICMP error (`ECONNREFUSED`: nothing
    /// listens on the upstream's port, or it is unreachable): every query in flight on it
    /// gets SERVFAIL now instead of at the timeout. The error does not say which query it was
    /// for, and all of them went to the same upstream.
    pub fn handle_upstream_error(&mut self, now: Instant, socket: u16) {
        let mut slot = self.oldest;
        while slot != NO_SLOT {
            let p = &self.pending[slot as usize];
            let next = p.next;
            if p.upstream == (Destination::UpstreamUdp { socket }) {
                self.ids[usize::from(socket)][usize::from(p.upstream_id)] = NO_SLOT;
                self.unlink(slot);
                self.stats.upstream_unreachable += 1;
                self.servfail(now, slot, Verdict::Unreachable);
                self.free_slot(slot);
            }
            slot = next;
        }
    }

    /// The shard's TCP connection to upstream server `server` was lost (or could not be
    /// opened): each query sent on it and not answered is re-sent on a new connection, once;
    /// one lost a second time is answered SERVFAIL at once (it used to wait for the upstream
    /// timeout).
    pub fn handle_upstream_tcp_closed(&mut self, now: Instant, server: u16) {
        let channel = self.sockets.len();
        // Queries of this turn still queued for that server go with the re-sends below, once
        // (review finding: they went twice).
        self.outbox.drop_queued(Destination::UpstreamTcp { server });
        let mut slot = self.oldest;
        while slot != NO_SLOT {
            let p = &mut self.pending[slot as usize];
            let next = p.next;
            if p.upstream == (Destination::UpstreamTcp { server }) {
                if p.tcp_resent {
                    self.stats.upstream_unreachable += 1;
                    let id = p.upstream_id;
                    self.give_up(now, channel, id, slot, Verdict::Unreachable);
                } else {
                    p.tcp_resent = true;
                    self.stats.upstream_tcp_resent += 1;
                    self.push_upstream_query(slot, None);
                }
            }
            slot = next;
        }
    }

    /// Counts messages the I/O layer dropped since the last call.
    pub fn sends_dropped(&mut self, client: u64, upstream: u64) {
        self.stats.client_sends_dropped += client;
        self.stats.upstream_sends_dropped += upstream;
    }

    /// A datagram on upstream UDP socket `socket` from `from`.
    pub fn handle_upstream(&mut self, now: Instant, socket: u16, from: SocketAddr, packet: &[u8]) {
        if usize::from(socket) >= self.sockets.len() {
            self.stats.upstream_unknown_id += 1;
            return;
        }
        let server = self.sockets[usize::from(socket)].server;
        let expected = self.config.upstreams[usize::from(server)];
        if from != expected && !same_server(from, expected) {
            self.stats.upstream_wrong_source += 1;
            return;
        }
        self.handle_answer(now, usize::from(socket), server, packet);
    }

    /// A message over the shard's TCP connection to upstream server `server` (an index).
    pub fn handle_upstream_tcp(&mut self, now: Instant, server: u16, packet: &[u8]) {
        if usize::from(server) >= self.config.upstreams.len() {
            self.stats.upstream_wrong_source += 1;
            return;
        }
        self.handle_answer(now, self.sockets.len(), server, packet);
    }

    /// An answer on `channel` from upstream server `server`: it must hold the ID of a query
    /// in flight on that channel, sent to that server, and its question.
    fn handle_answer(&mut self, now: Instant, channel: usize, server: u16, packet: &[u8]) {
        let answer = match wire::parse_answer(packet) {
            Ok(answer) => answer,
            Err(_) => {
                self.stats.upstream_malformed += 1;
                return;
            }
        };
        let slot = self.ids[channel][usize::from(answer.id)];
        if slot == NO_SLOT {
            self.stats.upstream_unknown_id += 1;
            self.unknown_id(now, channel);
            return;
        }
        let p = &self.pending[slot as usize];
        if let Destination::UpstreamTcp { server: sent_to } = p.upstream
            && sent_to != server
        {
            // Over TCP the ID space is shared by the servers' connections.
            self.stats.upstream_wrong_source += 1;
            return;
        }
        let name_len = usize::from(p.name_len);
        let question = &p.question[..usize::from(p.question_len)];
        let (client_name, rest) = question.split_at(name_len);
        let (qtype, qclass) = (
            u16::from_be_bytes([rest[0], rest[1]]),
            u16::from_be_bytes([rest[2], rest[3]]),
        );
        if !wire::names_equal(answer.name_wire(packet), client_name)
            || answer.qtype != qtype
            || answer.qclass != qclass
        {
            self.wrong_question(now, channel, answer.id, slot);
            return;
        }
        if p.case_applied {
            if !wire::is_0x20_spelling(answer.name_wire(packet), client_name, p.case_seed) {
                self.stats.upstream_case_mismatch += 1;
                if self.case[usize::from(server)].exact > 0 {
                    // The upstream preserves case: this answer did not come from it.
                    self.wrong_question(now, channel, answer.id, slot);
                } else {
                    self.case_not_echoed(now, channel, answer.id, slot, server);
                }
                return;
            }
            // Proof that the upstream preserves case only when the spelling could not have
            // survived a case-normalising upstream unchanged (review finding: a name without
            // letters, or spelled all lowercase by chance, locked the fallback off for good,
            // and every later answer of a lowercasing upstream was dropped as a forgery).
            // (Scanned only until the first proof.)
            let case = &mut self.case[usize::from(server)];
            if case.exact > 0 || wire::has_mixed_case(answer.name_wire(packet)) {
                case.exact += 1;
            }
        }
        self.ids[channel][usize::from(answer.id)] = NO_SLOT;
        self.unlink(slot);

        // What the client gets: the upstream's answer with its ID and spelling.
        let p = &self.pending[slot as usize];
        let (start, len) = self.outbox.push_bytes(packet);
        let reply = &mut self.outbox.bytes[start..start + len];
        wire::set_id(reply, p.client_id);
        wire::restore_question_case(reply, &answer, &p.question[..name_len]);
        if answer.truncated() {
            self.stats.truncated += 1;
        }
        let (client, enforce, fqdn) = (p.client, p.enforce, p.fqdn_len != 0);
        let latency = now.saturating_duration_since(p.sent_at);
        self.stats.upstream_latency.observe(latency);
        self.stats.upstream_rcodes[usize::from(answer.rcode() & 0xf)] += 1;

        let mut held = false;
        if enforce && answer.rcode() == 0 && !answer.truncated() {
            // The scratch is taken out for the call and put back: no copy, no allocation.
            let mut addresses = self.addresses.take().unwrap_or_default();
            let collected = wire::collect_addresses(packet, &answer, &mut addresses);
            if collected.is_ok() {
                self.stats.off_chain_records += addresses.off_chain as u64;
                self.stats.addresses_overflow += addresses.overflow as u64;
                held = self.learn(now, slot, &addresses);
                // The entries live 1.5 × the TTL `learn` wrote them for: the chain's
                // minimum, raised to --min-ttl, capped at --max-ttl. No record of the answer
                // may be cached longer than that (else connections fail while the answer is
                // still fresh: a 7-day A record behind a 60 s CNAME, or a CNAME cached past
                // its target's entry whose target name the client then asks directly).
                // An answer no toFQDNs rule selects, or one without addresses (NODATA, or
                // another type behind a CNAME), opens nothing: only the cap applies.
                let limit = if fqdn && !addresses.ips().is_empty() {
                    self.entry_ttl(&addresses)
                } else {
                    self.config.max_ttl.max(self.config.min_ttl)
                };
                if addresses.max_ttl > limit {
                    let reply = &mut self.outbox.bytes[start..start + len];
                    if wire::clamp_ttls(reply, &answer, limit) {
                        self.stats.ttl_clamped += 1;
                    }
                }
            }
            self.addresses = Some(addresses);
            if collected.is_err() {
                self.stats.answer_malformed += 1;
                self.outbox.bytes.truncate(start);
                self.servfail(now, slot, Verdict::BadAnswer);
                self.free_slot(slot);
                return;
            }
        } else if enforce {
            // An answer that opens nothing (truncated, or an error with records: an NXDOMAIN
            // behind a CNAME) is capped too (review finding): a stub that keeps the records
            // of a truncated answer, or the CNAME of an NXDOMAIN, must not hold them longer
            // than any answer's entries live.
            let reply = &mut self.outbox.bytes[start..start + len];
            if wire::clamp_ttls(reply, &answer, self.config.max_ttl.max(self.config.min_ttl)) {
                self.stats.ttl_clamped += 1;
            }
        }
        self.stats.answered += 1;
        self.record_slot_flow(
            now,
            slot,
            Verdict::Forward,
            Some(answer.rcode()),
            Some(latency),
        );
        if held {
            // The slot stays taken until the write is committed (bounding held answers).
            let group = self.held_group;
            self.held.push(Held {
                slot,
                start,
                len,
                group,
            });
        } else {
            self.outbox
                .ready
                .push_back((Destination::Client(client), start, len));
            self.free_slot(slot);
        }
    }

    /// An answer with the ID of the query in `slot` but another question. Someone guessed the
    /// ID but not the question. Keep waiting for the real answer, but not forever: a real
    /// upstream never does this, so after a few such answers the query is given up (SERVFAIL)
    /// rather than left open to more guesses.
    fn wrong_question(&mut self, now: Instant, channel: usize, id: u16, slot: u32) {
        self.stats.upstream_wrong_question += 1;
        let p = &mut self.pending[slot as usize];
        p.mismatches += 1;
        if p.mismatches >= MAX_MISMATCHES {
            self.stats.spoofing_suspected += 1;
            self.give_up(now, channel, id, slot, Verdict::BadAnswer);
        }
    }

    /// An answer with the right ID and name in another spelling than the 0x20 one sent, from
    /// an upstream that has never echoed a spelling exactly: it may not preserve case. The
    /// query is answered SERVFAIL now (its real answer, if this was it, will not come again),
    /// and after [`CASE_FALLBACK_AFTER`] such answers 0x20 is switched off for the upstream.
    ///
    /// A spoofer cannot use this to switch 0x20 off cheaply: each such answer needs the right
    /// ID on the right socket (1 in 65,536 per guess, on a port that changes every few hundred
    /// queries and early under a burst of wrong IDs), all of them before the upstream's first
    /// real answer; one exact echo disables the fallback for the life of the process.
    fn case_not_echoed(&mut self, now: Instant, channel: usize, id: u16, slot: u32, server: u16) {
        let c = &mut self.case[usize::from(server)];
        c.other = c.other.saturating_add(1);
        if self.config.upstream_0x20_fallback && !c.off && c.other >= CASE_FALLBACK_AFTER {
            c.off = true;
            self.stats.upstream_0x20_disabled += 1;
        }
        self.stats.case_mismatch_failed += 1;
        self.give_up(now, channel, id, slot, Verdict::BadAnswer);
    }

    /// Ends the query in `slot` (upstream ID `id` on `channel`) with SERVFAIL.
    fn give_up(&mut self, now: Instant, channel: usize, id: u16, slot: u32, verdict: Verdict) {
        self.ids[channel][usize::from(id)] = NO_SLOT;
        self.unlink(slot);
        self.servfail(now, slot, verdict);
        self.free_slot(slot);
    }

    /// Counts an answer with an unknown ID on `channel`; a burst of them on one UDP socket
    /// means someone is guessing IDs at its port: the socket is replaced at once (its
    /// queries re-sent from the new port), which costs the guesser the port it found.
    fn unknown_id(&mut self, now: Instant, channel: usize) {
        let burst = self.config.upstream_unknown_id_burst;
        let Some(s) = self.sockets.get_mut(channel) else {
            return;
        };
        s.unknown = s.unknown.saturating_add(1);
        if burst != 0 && s.unknown >= burst {
            // Past the burst (a replacement that failed): asked again, counted once.
            if s.unknown == burst {
                self.stats.upstream_sockets_attacked += 1;
            }
            self.queue_replace(now, channel as u16);
        }
    }

    /// Queues the allow entries the answer to `slot` needs; returns whether any write is
    /// needed before the answer may be released.
    fn learn(&mut self, now: Instant, slot: u32, addresses: &Addresses) -> bool {
        let p = &self.pending[slot as usize];
        let (Some(endpoint), Some(key)) = (p.endpoint, p.key) else {
            return false;
        };
        if p.fqdn_len == 0 || addresses.ips().is_empty() {
            // No toFQDNs rule selects the name (or nothing to allow): no entry to write.
            return false;
        }
        let snapshot = if p.generation == self.generation {
            &self.snapshot
        } else {
            match self.in_use.iter().find(|(g, _, _)| *g == p.generation) {
                Some((_, snapshot, _)) => snapshot,
                None => return false,
            }
        };
        let Ok(name) = Name::from_wire(&p.question[..usize::from(p.name_len)]) else {
            return false;
        };
        match p.fqdn_len {
            FQDN_MORE => {
                if !snapshot.fqdn_rules(endpoint, &name, &mut self.rules) {
                    return false;
                }
            }
            n => {
                self.rules.clear();
                for &rule in &p.fqdn[..usize::from(n)] {
                    self.rules.insert(RuleId(rule));
                }
            }
        }
        let ttl = self.entry_ttl(addresses);
        // The entry must outlive the client's cached answer (now + ttl). It is written with
        // half a TTL of headroom, so answers of the next half TTL (an authoritative upstream
        // repeats the same TTL) find it fresh enough and need no write.
        let needed_until = now + Duration::from_secs(u64::from(ttl));
        let expires = now + Duration::from_secs(u64::from(ttl) + u64::from(ttl) / 2);
        // The port specs of the matching rules (a rule without toPorts opens every port).
        self.specs.clear();
        for &rule in self.rules.as_slice() {
            let ports = snapshot.rule_ports(rule);
            if ports.is_empty() {
                self.specs.push(PortSpec::ALL);
            }
            for p in ports {
                self.specs.push(PortSpec::of(p));
            }
        }
        self.specs.sort_unstable();
        self.specs.dedup();
        // The group (and its copy of the name) is begun at the first entry needed: answers
        // that need no write, the steady state, cost no copy.
        let mut group = None;
        let name_hash = {
            use std::hash::BuildHasher;
            self.written.hasher().hash_one(name.wire())
        };
        for &ip in addresses.ips() {
            let ip = crate::allow::canonical(ip);
            // Judged here as well as by the ledger, which may have no snapshot yet (a
            // standalone proxy serving its persisted policy before the agent's first).
            if snapshot.in_cluster(ip) {
                self.stats.addresses_in_cluster += 1;
                continue;
            }
            for &ports in &self.specs {
                let entry = AllowKey {
                    endpoint: key,
                    ip,
                    ports,
                };
                // Rewrite only what is missing or would expire before the client's cache.
                let fresh = self
                    .written
                    .get(&(entry, name_hash))
                    .is_some_and(|&at| at >= needed_until);
                if !fresh {
                    if group.is_none() {
                        group = Some(self.batch.begin_group(&name));
                    }
                    self.batch.push(entry, expires);
                }
            }
        }
        let Some(group) = group else {
            // Nothing changed: the consumer already holds this observation.
            return false;
        };
        self.held_group = group;
        let mut rules = [0u32; 8];
        for (dst, rule) in rules.iter_mut().zip(self.rules.as_slice()) {
            *dst = rule.0;
        }
        // Recorded once the write succeeded (commit_allows): the FQDN cache must not hold
        // addresses whose entries a quota refused.
        self.updates.push((
            group,
            IpUpdate {
                at: now,
                endpoint: key,
                name,
                addresses: *addresses,
                ttl,
                rules,
                rules_total: self.rules.len(),
            },
        ));
        true
    }

    /// Writes the allow entries queued by this batch's answers in one call, then releases
    /// those answers. When the write fails their clients get SERVFAIL instead: an answer is
    /// never released before its addresses are allowed.
    pub fn commit_allows(&mut self, now: Instant, table: &mut dyn AllowSink) {
        if self.batch.is_empty() && self.held.is_empty() {
            return;
        }
        self.stats.allow_batches += 1;
        if !self.batch.is_empty() {
            table.write(now, &mut self.batch);
        }
        if self.written.len() + self.batch.entries.len() > self.config.allow_cache_entries {
            self.written.clear();
        }
        for g in 0..self.batch.groups.len() {
            if self.batch.groups[g].ok {
                let name_hash = {
                    use std::hash::BuildHasher;
                    let group = self.batch.groups[g];
                    let first = &self.batch.entries[group.start as usize];
                    let name = &self.batch.names[first.name as usize];
                    self.written.hasher().hash_one(name.wire())
                };
                for w in self.batch.group_entries(g).iter().filter(|w| w.written) {
                    self.stats.allow_writes += 1;
                    self.written.insert((w.key, name_hash), w.expires);
                }
            } else {
                self.stats.allow_write_failures += 1;
            }
        }
        let mut updates = std::mem::take(&mut self.updates);
        for (g, update) in updates.drain(..) {
            if self.batch.groups.get(g).is_some_and(|g| g.ok) {
                self.push_record(Record::Addresses(update));
            }
        }
        self.updates = updates;
        let mut held = std::mem::take(&mut self.held);
        for h in held.drain(..) {
            let ok = self.batch.groups.get(h.group).is_some_and(|g| g.ok);
            if ok {
                let client = self.pending[h.slot as usize].client;
                self.outbox
                    .ready
                    .push_back((Destination::Client(client), h.start, h.len));
            } else {
                self.stats.answered -= 1;
                self.servfail(now, h.slot, Verdict::Overload);
            }
            self.free_slot(h.slot);
        }
        self.held = held;
        self.batch.clear();
    }

    /// Expires queries whose upstream did not answer in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = 0;
        while self.oldest != NO_SLOT && expired < MAX_EXPIRED_PER_CALL {
            expired += 1;
            let slot = self.oldest;
            let p = &self.pending[slot as usize];
            if p.sent_at + self.config.upstream_timeout > now {
                break;
            }
            let channel = match p.upstream {
                Destination::UpstreamUdp { socket } => usize::from(socket),
                _ => self.sockets.len(),
            };
            self.stats.timeouts += 1;
            self.give_up(now, channel, p.upstream_id, slot, Verdict::Timeout);
        }
        if self.retiring > 0 {
            for socket in 0..self.sockets.len() as u16 {
                let s = &self.sockets[usize::from(socket)];
                if !s.replace_queued && s.retiring.is_some_and(|t| t + RETIRE_GRACE <= now) {
                    self.queue_replace(now, socket);
                }
            }
        }
    }

    /// When [`Core::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.oldest != NO_SLOT)
            .then(|| self.pending[self.oldest as usize].sent_at + self.config.upstream_timeout)
    }

    /// Takes `slot` out of the in-flight list (it is answered or expired). A retiring socket
    /// whose last query this was is queued for replacement.
    fn unlink(&mut self, slot: u32) {
        let (prev, next) = (
            self.pending[slot as usize].prev,
            self.pending[slot as usize].next,
        );
        if let Destination::UpstreamUdp { socket } = self.pending[slot as usize].upstream {
            let s = &mut self.sockets[usize::from(socket)];
            s.in_flight -= 1;
            if s.in_flight == 0 && !s.replace_queued && s.retiring.is_some() {
                s.replace_queued = true;
                self.replace.push(socket);
            }
        }
        match prev {
            NO_SLOT => self.oldest = next,
            prev => self.pending[prev as usize].next = next,
        }
        match next {
            NO_SLOT => self.newest = prev,
            next => self.pending[next as usize].prev = prev,
        }
    }

    /// Returns `slot` to the free list, dropping its snapshot reference.
    fn free_slot(&mut self, slot: u32) {
        let p = &mut self.pending[slot as usize];
        let generation = p.generation;
        let bucket = p.bucket as usize;
        self.in_flight_by_endpoint[bucket] -= 1;
        self.free.push(slot);
        self.release_generation(generation);
    }

    /// Queues a SERVFAIL for the query in `slot`, built from its stored question.
    fn servfail(&mut self, now: Instant, slot: u32, verdict: Verdict) {
        let p = &self.pending[slot as usize];
        let start = self.outbox.bytes.len();
        let question = &p.question[..usize::from(p.question_len)];
        let edns = p.edns.map(|e| self.reply_edns(e));
        let opt_len = if edns.is_some() { wire::OPT_LEN } else { 0 };
        self.outbox
            .bytes
            .resize(start + wire::HEADER_LEN + question.len() + opt_len, 0);
        let len = wire::write_reply_from_question(
            &mut self.outbox.bytes[start..],
            p.client_id,
            p.client_flags,
            question,
            Rcode::ServFail,
            edns,
        );
        let client = p.client;
        self.outbox
            .ready
            .push_back((Destination::Client(client), start, len));
        self.record_slot_flow(now, slot, verdict, Some(Rcode::ServFail as u8), None);
    }

    /// Records the flow of the query in `slot` (when flow records are on).
    fn record_slot_flow(
        &mut self,
        at: Instant,
        slot: u32,
        verdict: Verdict,
        rcode: Option<u8>,
        upstream_latency: Option<Duration>,
    ) {
        if !self.config.flow_records {
            return;
        }
        let p = &self.pending[slot as usize];
        let name = Name::from_wire(&p.question[..usize::from(p.name_len)])
            .unwrap_or_else(|_| Name::root());
        let flow = Flow {
            at,
            client: p.client.addr(),
            endpoint: p.key,
            name,
            qtype: p.qtype,
            verdict,
            rcode,
            upstream_latency,
        };
        self.push_record(Record::Flow(flow));
    }

    #[allow(clippy::too_many_arguments)]
    fn record_flow(
        &mut self,
        at: Instant,
        client: Client,
        endpoint: Option<EndpointKey>,
        name_wire: &[u8],
        qtype: u16,
        verdict: Verdict,
        rcode: Option<u8>,
        upstream_latency: Option<Duration>,
    ) {
        if !self.config.flow_records {
            return;
        }
        let name = Name::from_wire(name_wire).unwrap_or_else(|_| Name::root());
        self.push_record(Record::Flow(Flow {
            at,
            client: client.addr(),
            endpoint,
            name,
            qtype,
            verdict,
            rcode,
            upstream_latency,
        }));
    }

    fn push_record(&mut self, record: Record) {
        if self.records.len() == RECORD_BUFFER {
            self.stats.records_dropped += 1;
            return;
        }
        self.records.push_back(record);
    }

    /// The next message to send, if any. Its bytes stay valid until the next call on the core.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        match self.outbox.ready.pop_front() {
            Some((to, start, len)) => Some(Transmit {
                to,
                data: &self.outbox.bytes[start..start + len],
            }),
            None => {
                // Nothing refers to the arena any more: reuse it from the start.
                if self.held.is_empty() {
                    self.outbox.bytes.clear();
                }
                None
            }
        }
    }

    /// The next record for the consumer, if any.
    pub fn poll_record(&mut self) -> Option<Record> {
        self.records.pop_front()
    }

    /// Counts a record the shard could not queue to the consumer.
    pub fn record_dropped(&mut self) {
        self.stats.records_dropped += 1;
    }

    /// Whether [`Core::commit_allows`] has entries to write (the shard times such writes).
    pub fn allows_pending(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Counts the duration of one batched allow write, as the shard measured it.
    pub fn write_took(&mut self, d: Duration) {
        self.stats.write_latency.observe(d);
    }

    /// Counts the time one client query took in [`Core::handle_client`], as the shard
    /// measured it.
    pub fn processing_took(&mut self, d: Duration) {
        self.stats.processing_latency.observe(d);
    }
}

#[cfg(test)]
mod tests {
    use super::siphash24;

    #[test]
    #[allow(deprecated)] // std's SipHasher is SipHash-2-4: the reference here.
    fn siphash24_matches_std() {
        use std::hash::Hasher;
        for (k0, k1, m) in [
            (0, 0, 0),
            (
                0x0706_0504_0302_0100,
                0x0f0e_0d0c_0b0a_0908,
                0x0706_0504_0302_0100,
            ),
            (u64::MAX, 7, 12345u64),
        ] {
            let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
            h.write(&m.to_le_bytes());
            assert_eq!(siphash24([k0, k1], m), h.finish());
        }
        // The reference test vector: key 00..0f, message 00..07.
        assert_eq!(
            siphash24(
                [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908],
                0x0706_0504_0302_0100
            ),
            0x93f5_f579_9a93_2462
        );
    }
}
