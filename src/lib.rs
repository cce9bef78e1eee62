//! handoff: pick up on one device what another nearby device is showing.
//!
//! Module map:
//! - [`identity`] — Ed25519 key pairs and the base32 IDs they define.
//! - [`files`] — the state directory's checks, atomic private writes, secret files;
//!   [`accounts`] — Unix user and group lookups.
//! - [`config`] — the daemon's and server's TOML, validated (errors name the key).
//! - [`wire`] — pure protocol: messages, frames, the bincode config, TXT records, tickets, error codes.
//! - [`tls`] — mutual TLS 1.3 that pins peer keys; a connection's peer ID.
//! - [`net`] — frames on QUIC streams, with timeouts and the size cap; one-shot requests.
//! - [`discovery`] — mDNS advertise and browse (mdns-sd).
//! - [`peer`] — the peer table fed by discovery.
//! - [`trust`] — the trust list and revocations; [`inbox`] — received pushes, kept on disk.
//! - [`hook`] — the `on_push` command line built from a push; [`text`] — remote text made safe
//!   to show.
//! - [`daemon`] — the terminal daemon: peer service, server links, pulls, delivery.
//! - [`server`] — the content server: registry, links, ticket checks, pushes.
//! - [`control`] — the daemon's local control socket protocol (JSON Lines) and its client.
//! - [`cli`] — the command line; [`demo`] — the loopback demonstration; [`isolate`] — private
//!   network namespaces for the demo; [`doctor`] — network checks for `handoff doctor`.
//! - [`player`] — `handoff player`: the desktop's media players (MPRIS on D-Bus) as the source
//!   of this terminal's session and the place pushes open.
//! - [`metrics`] — Prometheus counters and histograms; [`service`] — sd_notify for systemd;
//!   [`logging`] — log lines for stderr, with journald priorities when stderr is the journal;
//!   [`limits`] — rate limiters and counters for the bounds of DESIGN §7.
//! - `testing` (hidden) — helpers the tests share, e.g. a private `redis-server` per test.
//!
//! The path of one handoff: terminal B's `pull` ([`daemon::Daemon::pull`]) dials A over QUIC, A's
//! peer service answers with interface info and a ticket it signs for B; B sends `Follow` to the
//! server named there; the server ([`server`]) checks the ticket, links B to A and pushes A's
//! session on a stream it opens on B's connection; B's server link delivers it to the inbox,
//! watchers and the `on_push` hook.

pub mod accounts;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod discovery;
pub mod doctor;
pub mod files;
pub mod hook;
pub(crate) mod http_conns;
pub mod identity;
pub mod inbox;
pub mod isolate;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod peer;
pub mod player;
pub mod server;
pub mod service;
#[doc(hidden)]
pub mod testing;
pub mod text;
pub mod tls;
pub mod trust;
pub mod wire;
