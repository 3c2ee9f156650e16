//! The building blocks of dnsfence's high availability (the agent and the standalone proxy
//! side by side, `../shared/spec/ha.md`), with no process wiring: that lives in the
//! `dnsfence` binary.
//!
//! - [`state`]: persisted state files (`--state-dir`): atomic writes, a version and a
//!   checksum; a corrupt file is set aside and reported in one line so the caller can fail
//!   closed.
//! - [`proto`]: the agent ↔ proxy protocol over the agent socket: framing, the versioned
//!   message types, an incremental decoder and an encoder into a reused buffer.
//! - [`conn`]: the agent socket: a listener that admits only its own user or root
//!   (`SO_PEERCRED`), and a client connecting with capped, jittered backoff.
//! - [`replay`]: the bounded buffer of observations and flow records the proxy holds until
//!   the agent acknowledges them; overflow counted, unacknowledged batches re-sent after a
//!   reconnect.
//!
//! This crate depends on neither the engine nor the policy crate (endpoint keys travel as
//! `u64`), so the agent, the proxy and future `observe`/`status` clients can all use it, and
//! its tests need no kernel.
//!
//! # Why a framed JSON protocol, not gRPC or a binary encoding
//!
//! The frame header is binary and fixed (magic, version, type, length), so a reader knows
//! the type and size of a message before it reads the body, refuses an oversize frame before
//! buffering it, and skips a message type it does not know without losing its place. The body
//! is JSON (serde_json, already a dependency) because:
//!
//! - **Independent upgrades.** The agent and the proxy are upgraded one at a time, so for a
//!   while a newer one talks to an older one. JSON ignores unknown fields and takes new
//!   optional ones with `#[serde(default)]`: most changes need no version bump. A hand-rolled
//!   binary layout needs explicit field tags to get the same, which is most of protobuf.
//! - **Other clients.** `dnsfence observe`/`status` and a user's `socat … | jq` read it with
//!   no schema compiler; 64-bit keys are hex strings so no double loses a bit.
//! - **The cost is off the data path.** Messages are batches made on the consumer or sync
//!   thread, never on a shard. Measured (release, batches of 1,000): a flow record is 246
//!   bytes and takes about 0.3 µs to encode and 0.8 µs to decode; an observation 125 bytes,
//!   0.12 µs and 0.28 µs. The largest message (a policy snapshot) is dominated by file text,
//!   which is a string in any encoding.
//! - gRPC (tonic, prost, protox) would bring an async runtime and HTTP/2 into a process
//!   whose threads are pinned shards and a few blocking control threads, for features
//!   (streams, deadlines, TLS) a same-node unix socket does not need.
//!
//! # How to wire it
//!
//! **Proxy** (`dnsfence proxy`):
//! 1. At start, [`state::StateDir::open`] on `--state-dir` (exits 1 on `Locked`), then
//!    `load("policy", Kind::POLICY_SNAPSHOT)`: `Ok(Some)` → decode the payload (a
//!    [`proto::PolicySnapshot`] encoded with serde_json is the natural choice) and serve
//!    with it at once; `Ok(None)` → refuse every query until the agent sends one;
//!    `Err(e)` → print `e` (one line), refuse until the agent sends one (fail closed).
//! 2. A sync thread (one blocking control thread; never a shard) connects to
//!    `--agent-socket` with [`conn::connect_with_backoff`] (a stop flag set at SIGTERM),
//!    sends [`proto::Hello`], and loops: read with
//!    [`proto::Decoder::read_from`] and [`proto::Decoder::decode`] (a read timeout of about
//!    one heartbeat interval on the socket, so it also gets to send; the decoder keeps a
//!    half-read frame across timeouts; a write timeout too, so a hung agent is noticed). On a
//!    `PolicySnapshot`: compile it (the same code as the agent), `save` it, swap it in,
//!    then send [`proto::SnapshotAck`]. Versions are comparable within one agent instance
//!    only (the Hello's `instance`): a restarted agent may start again from 1. Drain the engine's record queue into two
//!    [`replay::ReplayBuffer`]s (observations, flows; capacity a flag, overflow a metric) and
//!    send `next_batch` through [`proto::Encoder::encode_observations`] /
//!    [`proto::Encoder::encode_flows`]; on an ack, `ack(seq)`. When the connection ends,
//!    `rewind()` both buffers and reconnect. Persist the FQDN cache
//!    (`Kind::FQDN_CACHE`) now and then and at SIGTERM, and the unacknowledged replay items
//!    (`Kind::REPLAY`, from [`replay::ReplayBuffer::iter`]) at SIGTERM, so a proxy restarted
//!    while the agent is away still replays them.
//!
//! **Agent** (`dnsfence agent`):
//! 1. [`conn::AgentListener::bind`] on `--agent-socket` (mode 0600, a stale socket file
//!    removed, a live one an error) and an accept thread calling
//!    [`conn::AgentListener::accept`] (peers of another user than the agent's or root are
//!    closed and counted: export [`conn::AgentListener::rejected`] as a metric); one thread
//!    per connection (there are at most a proxy and a few observers).
//! 2. After the peer's Hello, send the current [`proto::PolicySnapshot`] (a version that
//!    grows on every reload, across reconnects) and another after every reload; treat the
//!    peer as current when its `SnapshotAck` carries the newest version.
//! 3. On `Observations`, merge into the FQDN cache (a union: a replayed batch merges twice
//!    harmlessly), then send `ObservationsAck`; the same for `Flows` into the flow log.
//! 4. Either side sends [`proto::Message::Heartbeat`] after a quiet interval and drops a
//!    peer silent for three.
//!
//! **Threading.** Every call in this crate is synchronous. [`state`] blocks on the disk
//! (fsync), [`proto::Decoder::read_from`] on the socket it is given (or returns
//! `WouldBlock` from a nonblocking one), [`conn::AgentListener::accept`] until a peer comes
//! and [`conn::connect_with_backoff`] sleeps between attempts; call them from control
//! threads only ([`conn::try_connect`] and [`conn::Backoff`] never wait, for an event loop). Encoding,
//! decoding and the replay buffer do no I/O and never block; a `ReplayBuffer` is not shared
//! (own it in the sync thread, or put it behind a mutex held only for a push).
//!
//! `unsafe`: one `getsockopt(SO_PEERCRED)` in [`conn`] (`conn::peer_of`), nowhere else.
#![deny(unsafe_code)]

pub mod conn;
pub mod proto;
pub mod replay;
pub mod state;
