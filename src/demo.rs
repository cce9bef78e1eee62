//! `handoff demo`: a content server and two terminals in one process, on loopback, doing a real
//! handoff — real mDNS (restricted to `lo`), real QUIC with pinned mutual TLS, a real signed
//! ticket — and printing the timeline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::{DaemonConfig, ServerConfig, ServerRef, StoreKind};
use crate::control::{self, ControlClient, ControlRequest, WatchLine};
use crate::daemon::{Daemon, DaemonOptions};
use crate::identity::Identity;
use crate::server::Server;

const STEP_TIMEOUT: Duration = Duration::from_secs(15);

struct Timeline {
    start: Instant,
}

impl Timeline {
    fn say(&self, text: impl AsRef<str>) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        println!("[{ms:8.1} ms] {}", text.as_ref());
    }
}

fn terminal_config(
    dir: &Path,
    name: &str,
    server: Option<ServerRef>,
    trusted: Vec<crate::identity::TerminalId>,
) -> DaemonConfig {
    let mut config =
        DaemonConfig::with_defaults(name, dir.join(name), dir.join(format!("{name}.sock")));
    config.interfaces = vec!["lo".to_string()];
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server = server;
    config.trusted_peers = trusted;
    config
}

/// Runs the demo in `dir` (which it may fill), printing the timeline to stdout.
pub async fn run(dir: &Path) -> anyhow::Result<()> {
    let t = Timeline {
        start: Instant::now(),
    };
    println!("handoff demo: a content server and two terminals on loopback (mDNS on lo only)\n");

    let server_config = ServerConfig::with_defaults(
        dir.join("server"),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        StoreKind::Embedded,
    );
    let server_identity = Identity::load_or_create(&server_config.state_dir)?;
    let server = Server::start(server_identity, &server_config).await?;
    t.say(format!(
        "server S {} listening on {}",
        server.id().short(),
        server.local_addr()
    ));

    // B's identity exists first so that A's config can trust it, as a paired pair would.
    let b_id = Identity::load_or_create(&dir.join("phone"))?.id();
    let home = ServerRef {
        id: server.id(),
        addrs: vec![server.local_addr().to_string()],
    };
    let a_config = terminal_config(dir, "living-room-pc", Some(home), vec![b_id]);
    let b_config = terminal_config(dir, "phone", None, Vec::new());
    let (a_socket, b_socket) = (
        a_config.control_socket.clone(),
        b_config.control_socket.clone(),
    );

    let a = Daemon::start(a_config, DaemonOptions::default())
        .await
        .context("starting terminal A")?;
    t.say(format!(
        "terminal A \"living-room-pc\" {} advertised on mDNS, QUIC on {}",
        a.id().short(),
        a.quic_addr()
    ));
    let b = Daemon::start(b_config, DaemonOptions::default())
        .await
        .context("starting terminal B")?;
    let b_started = Instant::now();
    t.say(format!(
        "terminal B \"phone\" {} browsing, QUIC on {}",
        b.id().short(),
        b.quic_addr()
    ));

    let title = "Big Buck Bunny";
    let set = ControlRequest::SessionSet {
        uri: "https://media.example/bbb.mp4".into(),
        title: title.into(),
        position: Some(12.0),
        meta: BTreeMap::from([("kind".to_string(), "video".to_string())]),
    };
    let reply = control::call(&a_socket, &set, STEP_TIMEOUT).await?;
    if !reply.ok || reply.server_synced != Some(true) {
        bail!(
            "A could not store its session on the server: {:?}",
            reply.error
        );
    }
    t.say(format!("A shows \"{title}\" at 12 s; S stored A's session"));

    let a_id = a.id().to_string();
    tokio::time::timeout(STEP_TIMEOUT, async {
        while !b.peers().iter().any(|p| p.id == a_id) {
            b.peers_changed().await;
        }
    })
    .await
    .context("B did not discover A over mDNS")?;
    t.say(format!(
        "B discovered A after {:.0} ms",
        b_started.elapsed().as_secs_f64() * 1000.0
    ));

    let pull = ControlRequest::Pull {
        peer: "living-room-pc".into(),
        timeout_secs: Some(10.0),
    };
    let reply = control::call(&b_socket, &pull, STEP_TIMEOUT).await?;
    if !reply.ok {
        bail!("pull failed: {}", reply.error.unwrap_or_default());
    }
    let (Some(push), Some(timing)) = (reply.push, reply.timing) else {
        bail!("pull returned no push");
    };
    t.say(format!(
        "B fetched A's interface info (server S, a ticket signed for B) in {:.1} ms",
        timing.interface_info_ms
    ));
    t.say(format!(
        "S checked the ticket and linked B to A ({:.1} ms into the pull)",
        timing.linked_ms
    ));
    t.say(format!(
        "S pushed \"{}\" to B after {:.1} ms: {} @ {}s",
        push.title,
        timing.pushed_ms.unwrap_or_default(),
        push.uri,
        push.position.unwrap_or_default()
    ));

    let mut watch = ControlClient::connect(&b_socket).await?;
    if !watch.call(&ControlRequest::Watch).await?.ok {
        bail!("B refused the watch");
    }
    let changed = Instant::now();
    let update = ControlRequest::SessionSet {
        uri: "https://media.example/bbb.mp4".into(),
        title: title.into(),
        position: Some(42.0),
        meta: BTreeMap::new(),
    };
    control::call(&a_socket, &update, STEP_TIMEOUT).await?;
    let line: WatchLine = tokio::time::timeout(STEP_TIMEOUT, watch.read_line())
        .await
        .context("B's watch did not see A's change")??;
    t.say(format!(
        "A jumped to {} s; S pushed the change to B after {:.1} ms",
        line.push.position.unwrap_or_default(),
        changed.elapsed().as_secs_f64() * 1000.0
    ));

    let leaving = Instant::now();
    a.shutdown().await;
    tokio::time::timeout(STEP_TIMEOUT, async {
        while b.peers().iter().any(|p| p.id == a_id) {
            b.peers_changed().await;
        }
    })
    .await
    .context("B did not see A leave")?;
    t.say(format!(
        "A stopped and said goodbye; B dropped it after {:.0} ms",
        leaving.elapsed().as_secs_f64() * 1000.0
    ));

    let inbox = b.inbox().await?;
    b.shutdown().await;
    server.shutdown().await;
    t.say(format!(
        "done: B's inbox holds {} pushes from A",
        inbox.len()
    ));
    Ok(())
}

/// A fresh scratch directory for the demo's state.
pub fn scratch_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("handoff-demo-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
