//! Several server nodes sharing one Redis (`[store] kind = "redis"`): where each terminal is
//! attached, and waking the node that holds a recipient when another node appended to its log.
//!
//! - **Registration:** the node holding a terminal's connection sets
//!   `handoff:v1:{<id>}:node = <node>` with a [`REGISTRATION_TTL`] and refreshes it every
//!   [`REFRESH_EVERY`]; a node that dies stops refreshing, so its registrations expire. A
//!   terminal that fails over to another node is registered there at once (last writer wins).
//! - **Wake:** after appending to logs of terminals it does not hold, or to the stream of a
//!   terminal whose followers it does not hold, a node looks up their registrations and
//!   publishes [`Wake`]s on the holding node's channel `handoff:v1:node:<node>`. The holder
//!   raises that connection's `latest` (of its log, or of that stream) and wakes its writer,
//!   which reads the shared log. Wakes are hints: a lost one costs latency, never a push, since
//!   a terminal that reconnects reads its log and streams from its cursors.
//!
//! Every command touches one key (no MGET), so the layout works on Redis Cluster too. The Redis
//! calls are blocking and run on blocking threads; the subscriber has a thread of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::store::StoreError;
use crate::config::redact_url;
use crate::identity::TerminalId;

/// How long a registration lives without a refresh: a dead node's terminals are unregistered
/// within this.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(30);
/// How often a node refreshes its terminals' registrations.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// One wake entry on the wire: the 32-byte recipient, the 32-byte owner of the log that grew
/// (the recipient itself for its own log), and a big-endian u64 offset.
const ENTRY: usize = 72;

/// A recipient's log (`stream: None`), or the stream of a terminal it follows, grew up to
/// `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wake {
    pub to: TerminalId,
    pub stream: Option<TerminalId>,
    pub next: u64,
}

fn registration_key(id: &TerminalId) -> String {
    format!("handoff:v1:{{{id}}}:node")
}

fn node_channel(node: &str) -> String {
    format!("handoff:v1:node:{node}")
}

/// This node's view of the cluster. Cheap to share.
pub(crate) struct Cluster {
    /// This node's name: random per process, so a restarted node never inherits stale wakes.
    node: String,
    client: redis::Client,
    url: String,
    conn: Mutex<Option<redis::Connection>>,
    /// Deletes a registration only if it still names this node.
    unregister: redis::Script,
}

impl Cluster {
    pub fn connect(url: &str) -> Result<Arc<Self>, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Open {
            path: redact_url(url),
            reason: e.to_string(),
        })?;
        let node = format!("{:016x}", rand::random::<u64>());
        let cluster = Arc::new(Self {
            node,
            client,
            url: redact_url(url),
            conn: Mutex::new(None),
            unregister: redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            ),
        });
        cluster.with_conn(|c| redis::cmd("PING").query::<String>(c).map(|_| ()))?;
        Ok(cluster)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `f` on the shared connection, opening it first if needed; a failed call drops the
    /// connection so the next call reconnects.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(Duration::from_secs(5))
                .map_err(|e| StoreError::Backend(format!("redis {}: {e}", self.url)))?;
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            unreachable!("the connection was set just above")
        };
        f(conn).map_err(|e| {
            *slot = None;
            StoreError::Backend(format!("redis {}: {e}", self.url))
        })
    }

    /// Registers `ids` as attached to this node (blocking).
    pub fn register(&self, ids: &[TerminalId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("SET")
                .arg(registration_key(id))
                .arg(&self.node)
                .arg("EX")
                .arg(REGISTRATION_TTL.as_secs())
                .ignore();
        }
        self.with_conn(|c| pipe.query::<()>(c))
    }

    /// Removes `id`'s registration if it still names this node (blocking).
    pub fn unregister(&self, id: &TerminalId) -> Result<(), StoreError> {
        self.with_conn(|c| {
            self.unregister
                .key(registration_key(id))
                .arg(&self.node)
                .invoke::<i64>(c)
                .map(|_| ())
        })
    }

    /// Tells the nodes holding `targets` that their logs grew (blocking). Targets not attached
    /// anywhere, or attached here, are skipped.
    pub fn wake(&self, targets: &[Wake]) -> Result<(), StoreError> {
        if targets.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for wake in targets {
            pipe.cmd("GET").arg(registration_key(&wake.to));
        }
        let nodes: Vec<Option<String>> = self.with_conn(|c| pipe.query(c))?;
        let mut by_node: std::collections::HashMap<String, Vec<u8>> = Default::default();
        for (wake, node) in targets.iter().zip(nodes) {
            let Some(node) = node.filter(|n| *n != self.node) else {
                continue;
            };
            encode_wake(by_node.entry(node).or_default(), wake);
        }
        if by_node.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (node, payload) in by_node {
            pipe.cmd("PUBLISH")
                .arg(node_channel(&node))
                .arg(payload)
                .ignore();
        }
        self.with_conn(|c| pipe.query::<()>(c))
    }

    /// Listens on this node's channel until `cancel`, sending every wake to `tx`; reconnects
    /// after errors. Runs on a thread of its own.
    pub fn subscribe(self: Arc<Self>, tx: mpsc::Sender<Vec<Wake>>, cancel: CancellationToken) {
        let channel = node_channel(&self.node);
        while !cancel.is_cancelled() {
            let result = (|| -> redis::RedisResult<()> {
                let mut conn = self
                    .client
                    .get_connection_with_timeout(Duration::from_secs(5))?;
                let mut pubsub = conn.as_pubsub();
                pubsub.subscribe(&channel)?;
                // Wake up now and then to notice cancellation.
                pubsub.set_read_timeout(Some(Duration::from_millis(500)))?;
                while !cancel.is_cancelled() {
                    let msg = match pubsub.get_message() {
                        Ok(msg) => msg,
                        Err(e) if e.is_timeout() => continue,
                        Err(e) => return Err(e),
                    };
                    let payload = msg.get_payload_bytes();
                    let wakes = decode_wakes(payload);
                    if !wakes.is_empty() && tx.blocking_send(wakes).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            })();
            match result {
                Ok(()) => return,
                Err(e) => {
                    warn!("redis {} subscription: {e}; retrying in 1 s", self.url);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        debug!("cluster subscription ended");
    }
}

fn encode_wake(payload: &mut Vec<u8>, wake: &Wake) {
    payload.extend_from_slice(wake.to.as_bytes());
    payload.extend_from_slice(wake.stream.unwrap_or(wake.to).as_bytes());
    payload.extend_from_slice(&wake.next.to_be_bytes());
}

fn decode_wakes(payload: &[u8]) -> Vec<Wake> {
    payload
        .chunks_exact(ENTRY)
        .filter_map(|entry| {
            let to = TerminalId::from_bytes(entry[..32].try_into().ok()?);
            let owner = TerminalId::from_bytes(entry[32..64].try_into().ok()?);
            let next: [u8; 8] = entry[64..].try_into().ok()?;
            Some(Wake {
                to,
                stream: (owner != to).then_some(owner),
                next: u64::from_be_bytes(next),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_payloads_round_trip_and_ignore_torn_entries() {
        let a = TerminalId::from_bytes([1; 32]);
        let b = TerminalId::from_bytes([2; 32]);
        let wakes = [
            Wake {
                to: a,
                stream: None,
                next: 7,
            },
            Wake {
                to: b,
                stream: Some(a),
                next: u64::MAX,
            },
        ];
        let mut payload = Vec::new();
        for wake in &wakes {
            encode_wake(&mut payload, wake);
        }
        payload.extend_from_slice(&[9; 12]);
        assert_eq!(decode_wakes(&payload), wakes);
        assert!(decode_wakes(&[0; ENTRY - 1]).is_empty());
    }

    #[test]
    fn keys_are_versioned_and_hash_tagged() {
        let a = TerminalId::from_bytes([1; 32]);
        assert_eq!(registration_key(&a), format!("handoff:v1:{{{a}}}:node"));
        assert_eq!(node_channel("ab"), "handoff:v1:node:ab");
    }
}
