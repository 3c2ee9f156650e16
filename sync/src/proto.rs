//! The agent ↔ proxy protocol (and the one place its message types are versioned; `observe`
//! and `status` clients of the agent socket speak it too).
//!
//! # Framing
//!
//! A connection is a sequence of frames over a unix stream socket. Each frame is a fixed
//! 12-byte header and a body:
//!
//! | offset | size | field                                                    |
//! |-------:|-----:|----------------------------------------------------------|
//! | 0      | 4    | magic `b"DFSY"`                                           |
//! | 4      | 2    | protocol version, big-endian ([`PROTOCOL_VERSION`])       |
//! | 6      | 2    | message type, big-endian ([`MessageType`])                |
//! | 8      | 4    | body length in bytes, big-endian                          |
//! | 12     | n    | body: one JSON object (UTF-8), the message's fields       |
//!
//! The length is checked against the receiver's limit ([`DEFAULT_MAX_FRAME`]) as soon as the
//! header is in, before the body is waited for or buffered.
//!
//! # Versioning and compatibility
//!
//! - The header's protocol version changes only when the framing or the meaning of an
//!   existing message changes incompatibly. A frame of another version is a fatal
//!   [`DecodeError::UnsupportedVersion`]: close the connection and log the line.
//! - New messages get new type numbers. A peer that does not know one gets the non-fatal
//!   [`DecodeError::UnknownType`]: the frame has been skipped and the stream is still in
//!   step, so an older agent keeps talking to a newer proxy.
//! - New fields are added as optional (`#[serde(default)]`); unknown fields are ignored. A
//!   body that does not parse is the non-fatal [`DecodeError::BadBody`] (the frame skipped).
//! - 64-bit identifiers (`endpoint_key`, `instance`) travel as 16 hex digits in a string, so
//!   clients whose JSON numbers are doubles (jq, JavaScript) read them exactly; counters
//!   (`version`, `seq`) are plain numbers (they stay far below 2^53).
//!
//! # Conversation
//!
//! Each side sends [`Hello`] first. The agent then sends a [`PolicySnapshot`] whenever its
//! policy or endpoints change (and once after each Hello); the proxy answers
//! [`SnapshotAck`] once it has persisted and swapped it in. The proxy sends
//! [`Observations`] and [`Flows`] batches out of its [`crate::replay::ReplayBuffer`]s; the
//! agent acknowledges each batch (cumulatively: an ack for `seq` covers every earlier batch)
//! after merging it. Either side sends [`Message::Heartbeat`] when it has had nothing to say
//! for a while; a peer silent for several heartbeat intervals is gone.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"DFSY";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;
/// The default bound on a frame body: 256 MiB, the bound of a state file, so that any
/// policy snapshot the proxy could persist can be sent (a snapshot with 100k patterns is a
/// few MiB; a large cluster's rendered policies and endpoints tens of MiB: at 64 MiB one
/// could never be sent, review finding). Peers are the node's agent and proxy only (peer
/// credentials are checked), and a frame is buffered only as its bytes arrive.
pub const DEFAULT_MAX_FRAME: u32 = 256 << 20;

/// The message types, as numbered on the wire. Never renumber; only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    /// [`Hello`], both ways.
    Hello = 1,
    /// [`PolicySnapshot`], agent → proxy.
    PolicySnapshot = 2,
    /// [`SnapshotAck`], proxy → agent.
    SnapshotAck = 3,
    /// [`Observations`], proxy → agent.
    Observations = 4,
    /// [`ObservationsAck`], agent → proxy.
    ObservationsAck = 5,
    /// [`Flows`], proxy → agent.
    Flows = 6,
    /// [`FlowsAck`], agent → proxy.
    FlowsAck = 7,
    /// [`Message::Heartbeat`], both ways.
    Heartbeat = 8,
}

impl MessageType {
    /// Every message type, in wire order.
    pub const ALL: [MessageType; 8] = [
        MessageType::Hello,
        MessageType::PolicySnapshot,
        MessageType::SnapshotAck,
        MessageType::Observations,
        MessageType::ObservationsAck,
        MessageType::Flows,
        MessageType::FlowsAck,
        MessageType::Heartbeat,
    ];

    /// The type with wire number `n`, if this build knows it.
    pub fn from_wire(n: u16) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| *t as u16 == n)
    }
}

/// Who is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `dnsfence agent`: owns policy, endpoints and the eBPF programs.
    Agent,
    /// `dnsfence proxy`: the standalone HA proxy.
    Proxy,
    /// A read-only client (`dnsfence observe`, `dnsfence status`).
    Observer,
}

/// The first message on a connection, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's role.
    pub role: Role,
    /// The protocol version the sender speaks ([`PROTOCOL_VERSION`]).
    pub protocol_version: u16,
    /// The sender's process id (for logs).
    pub pid: u32,
    /// Random per process start ([`process_instance`]): a changed value on reconnect means
    /// the peer restarted (and lost what it had not persisted).
    #[serde(with = "hex_u64")]
    pub instance: u64,
    /// What the sender's build honours beyond [`PROTOCOL_VERSION`] ([`FEATURES`]): fields an
    /// older peer would ignore (absent from older builds' Hellos, and left out when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// The proxy applies the snapshot's `deny_answer_cidrs` (an older one ignores them: its
/// answers would open those ranges).
pub const FEATURE_DENY_ANSWERS: &str = "deny-answer-cidrs";

/// The features of this build ([`Hello::features`]).
pub const FEATURES: &[&str] = &[FEATURE_DENY_ANSWERS];

impl Hello {
    /// A Hello for this process: [`PROTOCOL_VERSION`], its pid, [`process_instance`] and
    /// [`FEATURES`].
    pub fn new(role: Role) -> Hello {
        Hello {
            role,
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            instance: process_instance(),
            features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    /// Whether the sender honours `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// A random `u64` drawn once per process start (the same on every call in a process).
pub fn process_instance() -> u64 {
    static INSTANCE: OnceLock<u64> = OnceLock::new();
    *INSTANCE.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's random source once per process (and per
        // thread after that); mix in the time and pid for good measure.
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        h.finish()
    })
}

/// One source file, verbatim: the proxy compiles it with the same code as the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Where the agent read it (reported in the proxy's `file:line: reason` messages).
    pub path: String,
    /// Its contents.
    pub content: String,
}

/// Facts about the node that entity selectors resolve through (the agent's `--cluster-cidr`,
/// `--node-ip`, `--kube-apiserver`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    /// `--cluster-cidr` values.
    pub cluster_cidrs: Vec<String>,
    /// `--node-ip` values.
    pub node_ips: Vec<String>,
    /// `--kube-apiserver` values.
    pub kube_apiserver: Vec<String>,
    /// `--open-loopback-answers` (absent from messages of versions before it: false).
    #[serde(default)]
    pub open_loopback_answers: bool,
    /// `--deny-answer-cidr` values (absent from messages of versions before it: none).
    #[serde(default)]
    pub deny_answer_cidrs: Vec<String>,
}

/// Agent → proxy: everything needed to compile the agent's policy snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySnapshot {
    /// Increases with every snapshot the agent sends (across reconnects; persisted by the
    /// agent if it must survive its restart).
    pub version: u64,
    /// The policy files in force, each its last good version.
    pub policy_files: Vec<SourceFile>,
    /// The endpoints file in force.
    pub endpoints: SourceFile,
    /// Node facts.
    pub node: NodeFacts,
    /// The identity the agent gives this policy (the allow writers compare it, see
    /// `BpfAllow` in the datapath crate): sent, so that a proxy of another build, which
    /// might hash the texts otherwise, takes the agent's (0 from agents before it: the
    /// proxy computes it).
    #[serde(default)]
    pub policy_id: u64,
}

/// Proxy → agent: the snapshot `version` is compiled, persisted and in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAck {
    /// The version acknowledged.
    pub version: u64,
}

/// One FQDN → addresses observation (what the proxy wrote allow entries for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// The endpoint that asked (`EndpointKey` as `u64`).
    #[serde(with = "hex_u64")]
    pub endpoint_key: u64,
    /// The question name, lowercase, without the trailing dot.
    pub name: String,
    /// The A/AAAA addresses on its CNAME chain.
    pub addresses: Vec<IpAddr>,
    /// The TTL the allow entries were written with.
    pub ttl_secs: u32,
    /// When the answer arrived (wall clock, ms since the Unix epoch).
    pub observed_unix_ms: u64,
}

/// The most bytes `s` takes as a JSON string (quotes and escapes included).
fn json_str_bound(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The most bytes an address takes in a JSON list (quotes and a comma included).
fn json_ip_bound(ip: &IpAddr) -> usize {
    match ip {
        // "255.255.255.255",
        IpAddr::V4(_) => 18,
        // "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", (eight groups at most: only the
        // IPv4-mapped form prints a dotted quad, and it is shorter)
        IpAddr::V6(_) => 42,
    }
}

impl Observation {
    /// An upper bound on the length of its JSON encoding, plus one for the comma that
    /// separates it from the next in a list: the replay buffer's weight of it, so that what
    /// the buffer holds always fits the state file (an observation may carry hundreds of
    /// addresses).
    pub fn json_bound(&self) -> usize {
        // Field names, punctuation and the numbers at their longest: about 120 bytes.
        160 + json_str_bound(&self.name) + self.addresses.iter().map(json_ip_bound).sum::<usize>()
    }
}

impl FlowRecord {
    /// As [`Observation::json_bound`].
    pub fn json_bound(&self) -> usize {
        // Field names, punctuation, the numbers and the client address (a scoped IPv6
        // socket address: 66 bytes) at their longest: about 290 bytes.
        384 + json_str_bound(&self.name)
            + json_str_bound(&self.verdict)
            + json_str_bound(&self.served_by)
            + self.addresses.iter().map(json_ip_bound).sum::<usize>()
    }
}

/// Proxy → agent: a batch of observations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observations {
    /// The batch's sequence number ([`crate::replay::ReplayBuffer::next_batch`]).
    pub seq: u64,
    /// The observations, oldest first.
    pub items: Vec<Observation>,
}

/// Agent → proxy: every observations batch up to and including `seq` is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservationsAck {
    /// The newest batch merged.
    pub seq: u64,
}

/// One query's outcome, as the flow log writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When the verdict was given (ms since the Unix epoch).
    pub unix_ms: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The endpoint, when known.
    #[serde(with = "opt_hex_u64")]
    pub endpoint_key: Option<u64>,
    /// The question name.
    pub name: String,
    /// The question type.
    pub qtype: u16,
    /// The engine's verdict as the flow log spells it (`Forward`, `Refuse`, `Timeout`, ...;
    /// `dnsfence observe` shows them as Cilium's `FORWARDED`, `DROPPED`, `ERROR`).
    pub verdict: String,
    /// The rcode the client got (see `dropped`).
    pub rcode: u16,
    /// The client got no answer (`rcode` means nothing). Absent from older proxies' records.
    #[serde(default)]
    pub dropped: bool,
    /// The answer's addresses as the sender's FQDN cache held them (`toFQDNs` names), if any.
    pub addresses: Vec<IpAddr>,
    /// Their remaining lifetime in seconds (0 when none).
    pub ttl: u32,
    /// Query to answer, in µs.
    pub latency_us: u64,
    /// Which process answered (`agent`, `proxy`, or a host name).
    pub served_by: String,
}

/// Proxy → agent: a batch of flow records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flows {
    /// The batch's sequence number.
    pub seq: u64,
    /// The records, oldest first.
    pub items: Vec<FlowRecord>,
}

/// Agent → proxy: every flows batch up to and including `seq` is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsAck {
    /// The newest batch merged.
    pub seq: u64,
}

/// A message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`PolicySnapshot`].
    PolicySnapshot(PolicySnapshot),
    /// See [`SnapshotAck`].
    SnapshotAck(SnapshotAck),
    /// See [`Observations`].
    Observations(Observations),
    /// See [`ObservationsAck`].
    ObservationsAck(ObservationsAck),
    /// See [`Flows`].
    Flows(Flows),
    /// See [`FlowsAck`].
    FlowsAck(FlowsAck),
    /// Nothing to say; still here. Its body is `{}`.
    Heartbeat,
}

impl Message {
    /// This message's wire type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::PolicySnapshot(_) => MessageType::PolicySnapshot,
            Message::SnapshotAck(_) => MessageType::SnapshotAck,
            Message::Observations(_) => MessageType::Observations,
            Message::ObservationsAck(_) => MessageType::ObservationsAck,
            Message::Flows(_) => MessageType::Flows,
            Message::FlowsAck(_) => MessageType::FlowsAck,
            Message::Heartbeat => MessageType::Heartbeat,
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The body is over the frame limit; nothing was appended.
    #[error("{ty:?} message of {len} bytes exceeds the frame limit of {max}")]
    TooLarge {
        /// The message type.
        ty: MessageType,
        /// The body's length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// serde_json refused the body (not expected for these types); nothing was appended.
    #[error("{ty:?} message could not be serialised: {error}")]
    Json {
        /// The message type.
        ty: MessageType,
        /// serde_json's message.
        error: String,
    },
}

/// Why the byte stream could not be decoded. [`DecodeError::is_fatal`] says whether the
/// stream is still usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame does not start with [`MAGIC`]: not this protocol, or out of step. Fatal.
    #[error("agent socket: not a dnsfence frame (magic {found:02x?}, expected {MAGIC:02x?})")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version. Fatal.
    #[error(
        "agent socket: peer speaks protocol version {found}, this build speaks {PROTOCOL_VERSION}; upgrade the older of the two"
    )]
    UnsupportedVersion {
        /// The version in the frame.
        found: u16,
    },
    /// The declared body length is over the limit (refused before buffering). Fatal.
    #[error("agent socket: frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The declared length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A message type this build does not know (a newer peer). Not fatal: skipped.
    #[error("agent socket: unknown message type {ty} ({len} bytes), skipped")]
    UnknownType {
        /// The wire type.
        ty: u16,
        /// Its body length.
        len: u32,
    },
    /// A known type whose body does not parse. Not fatal: skipped.
    #[error("agent socket: bad {ty:?} message, skipped: {error}")]
    BadBody {
        /// The message type.
        ty: MessageType,
        /// serde_json's message (one line).
        error: String,
    },
}

impl DecodeError {
    /// Whether the stream is out of step for good: the caller must close the connection.
    /// After a fatal error the decoder returns the same error on every call.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::BadMagic { .. }
                | DecodeError::UnsupportedVersion { .. }
                | DecodeError::FrameTooLarge { .. }
        )
    }
}

/// Frames messages into a byte buffer the caller owns and reuses.
#[derive(Debug, Clone, Copy)]
pub struct Encoder {
    max_frame: u32,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// An encoder with [`DEFAULT_MAX_FRAME`].
    pub fn new() -> Encoder {
        Encoder::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// An encoder refusing bodies over `max_frame` bytes (match the receiver's limit).
    pub fn with_max_frame(max_frame: u32) -> Encoder {
        Encoder { max_frame }
    }

    /// Appends the frame of `msg` to `out`. On error `out` is as it was.
    pub fn encode(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let ty = msg.message_type();
        match msg {
            Message::Hello(m) => self.encode_body(ty, m, out),
            Message::PolicySnapshot(m) => self.encode_body(ty, m, out),
            Message::SnapshotAck(m) => self.encode_body(ty, m, out),
            Message::Observations(m) => self.encode_body(ty, m, out),
            Message::ObservationsAck(m) => self.encode_body(ty, m, out),
            Message::Flows(m) => self.encode_body(ty, m, out),
            Message::FlowsAck(m) => self.encode_body(ty, m, out),
            Message::Heartbeat => self.encode_body(ty, &Empty {}, out),
        }
    }

    /// Appends an [`Observations`] frame of borrowed items (straight from a
    /// [`crate::replay::Batch`], no copy). Decodes as [`Message::Observations`].
    pub fn encode_observations(
        &self,
        seq: u64,
        items: &[Observation],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.encode_body(MessageType::Observations, &BatchRef { seq, items }, out)
    }

    /// Appends a [`Flows`] frame of borrowed items. Decodes as [`Message::Flows`].
    pub fn encode_flows(
        &self,
        seq: u64,
        items: &[FlowRecord],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.encode_body(MessageType::Flows, &BatchRef { seq, items }, out)
    }

    fn encode_body<T: Serialize>(
        &self,
        ty: MessageType,
        body: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        out.extend_from_slice(&(ty as u16).to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        if let Err(e) = serde_json::to_writer(&mut *out, body) {
            out.truncate(start);
            return Err(EncodeError::Json {
                ty,
                error: e.to_string(),
            });
        }
        let len = out.len() - start - HEADER_LEN;
        match u32::try_from(len) {
            Ok(l) if l <= self.max_frame => {
                out[start + 8..start + HEADER_LEN].copy_from_slice(&l.to_be_bytes());
                Ok(())
            }
            _ => {
                out.truncate(start);
                Err(EncodeError::TooLarge {
                    ty,
                    len,
                    max: self.max_frame,
                })
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Empty {}

/// Serialises exactly as [`Observations`] / [`Flows`] do, from borrowed items.
#[derive(Serialize)]
struct BatchRef<'a, T> {
    seq: u64,
    items: &'a [T],
}

/// How many bytes [`Decoder::read_from`] reads at most per call.
const READ_CHUNK: usize = 64 << 10;
/// The buffer capacity a decoder keeps once a large frame is decoded.
const KEEP_CAPACITY: usize = 1 << 20;

/// Turns a byte stream into messages, fed as bytes arrive (partial reads welcome).
///
/// Memory: the buffer holds what was fed and not yet decoded: at most the largest frame plus
/// one read (or feed) when the caller decodes after each one; a caller that reads ahead
/// without decoding (dnsfence's sync while it writes or applies) bounds it itself. A frame
/// header over the limit is refused as soon as its 12 bytes are in and `decode` is called,
/// before its body is waited for.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the undecoded bytes in `buf`.
    pos: usize,
    /// Bytes after `pos` whose frame headers [`Decoder::check_buffered`] has validated (up
    /// to a frame boundary).
    checked: usize,
    max_frame: u32,
    failed: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder with [`DEFAULT_MAX_FRAME`].
    pub fn new() -> Decoder {
        Decoder::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// A decoder refusing frames whose body is over `max_frame` bytes.
    pub fn with_max_frame(max_frame: u32) -> Decoder {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            checked: 0,
            max_frame,
            failed: None,
        }
    }

    /// Appends received bytes (dropped after a fatal error).
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Reads once from `r` (at most 64 KiB) into the buffer. Returns what `read` returned: `Ok(0)` at end of stream, and
    /// `ErrorKind::WouldBlock` from a nonblocking socket with nothing to read.
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        self.compact();
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let res = r.read(&mut self.buf[old..]);
        let n = *res.as_ref().unwrap_or(&0);
        self.buf.truncate(old + n);
        if self.failed.is_some() {
            self.buf = Vec::new();
        }
        res
    }

    /// Bytes fed and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes the buffer holds allocated (for a memory gauge): back to at most 1 MiB plus one
    /// read once a large frame is decoded and the next bytes arrive.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. Call it until it
    /// returns `Ok(None)` after each feed. On a non-fatal error the bad frame has been
    /// skipped and the next call goes on; after a fatal one every call returns it again.
    pub fn decode(&mut self) -> Result<Option<Message>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.pos..];
        let Some(header) = avail.first_chunk::<HEADER_LEN>() else {
            // Fail early on a wrong magic, even before the whole header is in.
            if let Some(e) = bad_partial_magic(avail) {
                return Err(self.fail(e));
            }
            return Ok(None);
        };
        let (ty, len) = match parse_header(header, self.max_frame) {
            Ok(h) => h,
            Err(e) => return Err(self.fail(e)),
        };
        let end = HEADER_LEN + len as usize;
        let Some(body) = avail.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let result = match MessageType::from_wire(ty) {
            None => Err(DecodeError::UnknownType { ty, len }),
            Some(ty) => decode_body(ty, body),
        };
        self.pos += end;
        self.checked = self.checked.saturating_sub(end);
        result.map(Some)
    }

    /// Validates the header of every frame buffered and not decoded yet, without decoding
    /// anything: for a caller that reads ahead (bytes fed, not decoded), so that a bad magic,
    /// version or length is refused as soon as its 12 bytes are in, as `decode` would,
    /// instead of after whatever follows has been buffered. A fatal error is kept, as by
    /// `decode`. Each frame's header is checked once.
    pub fn check_buffered(&mut self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            let avail = &self.buf[self.pos + self.checked..];
            let Some(header) = avail.first_chunk::<HEADER_LEN>() else {
                if let Some(e) = bad_partial_magic(avail) {
                    return Err(self.fail(e));
                }
                return Ok(());
            };
            match parse_header(header, self.max_frame) {
                Ok((_, len)) => {
                    let end = HEADER_LEN + len as usize;
                    if avail.len() < end {
                        // Its body is still coming; the next header is checked once it is in.
                        return Ok(());
                    }
                    self.checked += end;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.failed = Some(e.clone());
        self.buf = Vec::new();
        self.pos = 0;
        self.checked = 0;
        e
    }

    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            // Nothing pending: give back what one large frame (a snapshot) made it grow to.
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

/// The error of a header's first bytes (fewer than a whole header) that are not the magic.
fn bad_partial_magic(avail: &[u8]) -> Option<DecodeError> {
    let n = avail.len().min(MAGIC.len());
    (avail[..n] != MAGIC[..n]).then(|| {
        let mut found = [0u8; 4];
        found[..n].copy_from_slice(&avail[..n]);
        DecodeError::BadMagic { found }
    })
}

fn parse_header(h: &[u8; HEADER_LEN], max: u32) -> Result<(u16, u32), DecodeError> {
    if h[0..4] != MAGIC {
        return Err(DecodeError::BadMagic {
            found: [h[0], h[1], h[2], h[3]],
        });
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    let ty = u16::from_be_bytes([h[6], h[7]]);
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if len > max {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    Ok((ty, len))
}

fn decode_body(ty: MessageType, body: &[u8]) -> Result<Message, DecodeError> {
    fn parse<'a, T: Deserialize<'a>>(ty: MessageType, body: &'a [u8]) -> Result<T, DecodeError> {
        serde_json::from_slice(body).map_err(|e| DecodeError::BadBody {
            ty,
            error: e.to_string().replace(['\n', '\r'], " "),
        })
    }
    Ok(match ty {
        MessageType::Hello => Message::Hello(parse(ty, body)?),
        MessageType::PolicySnapshot => Message::PolicySnapshot(parse(ty, body)?),
        MessageType::SnapshotAck => Message::SnapshotAck(parse(ty, body)?),
        MessageType::Observations => Message::Observations(parse(ty, body)?),
        MessageType::ObservationsAck => Message::ObservationsAck(parse(ty, body)?),
        MessageType::Flows => Message::Flows(parse(ty, body)?),
        MessageType::FlowsAck => Message::FlowsAck(parse(ty, body)?),
        MessageType::Heartbeat => {
            let Empty {} = parse(ty, body)?;
            Message::Heartbeat
        }
    })
}

/// `u64` as 16 lowercase hex digits in a JSON string.
mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse(&s).map_err(D::Error::custom)
    }

    pub fn parse(s: &str) -> Result<u64, String> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("expected 16 hex digits, got {s:?}"));
        }
        u64::from_str_radix(s, 16).map_err(|e| e.to_string())
    }
}

/// `Option<u64>` as 16 hex digits or `null`.
mod opt_hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::hex_u64::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        s.map(|s| super::hex_u64::parse(&s).map_err(D::Error::custom))
            .transpose()
    }
}
