//! `handoff player`: the desktop's media players at both ends of a handoff.
//!
//! A program for the user's session that talks MPRIS on the D-Bus session bus ([`mpris`]) and
//! JSON Lines on the daemon's control socket ([`crate::control`]):
//!
//! - the **source** ([`source`]) sets this terminal's session from the player that plays (url,
//!   title, artist, length, position), so a peer that pulls gets what is on screen;
//! - the **sink** ([`sink`]) opens what a followed terminal pushes in a player here, at the
//!   pushed position.
//!
//! Tasks, all ending when the [`Player`] is shut down: the source (which also notices the bus
//! going away: the program then exits with an error and its unit restarts it), the session
//! writer (one control connection, reconnecting; the latest session wins), and with `[player]
//! open` the push watcher (a `watch` stream, reconnecting) feeding the opener through a bounded
//! queue. Settings: [`PlayerConfig`] (`[player]` in the daemon's config).

pub mod mpris;
pub mod sink;
pub mod source;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PlayerConfig;

/// Pushes queued for the opener before the watcher waits.
const PUSH_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PlayerError {
    #[error(
        "cannot connect to the D-Bus session bus: {0} (`handoff player` runs in the user's \
         desktop session, where DBUS_SESSION_BUS_ADDRESS or $XDG_RUNTIME_DIR/bus leads to it)"
    )]
    Connect(zbus::Error),
    #[error("D-Bus: {0}")]
    Bus(zbus::Error),
    #[error("the D-Bus connection ended")]
    BusClosed,
}

/// Why a push was not handed to a player.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its uri scheme {0:?} is not in [player] schemes")]
    Scheme(String),
    #[error("its uri is not an absolute URI")]
    NotAbsolute,
    #[error("its uri starts with '-'")]
    LeadingDash,
    #[error(
        "{player} is playing something else ({}); set [player] replace_playing = true to take it over",
        playing.as_deref().unwrap_or("no url")
    )]
    PlayingSomethingElse {
        player: String,
        playing: Option<String>,
    },
    #[error("no media player is running (start one, or set [player] command)")]
    NoPlayer,
}

/// What the sink did with a push (also logged).
#[derive(Debug, Clone, PartialEq)]
pub enum PlayerEvent {
    /// `uri` was opened in `player` and plays from `position` (None: it did not seek).
    Opened {
        uri: String,
        player: String,
        position: Option<f64>,
    },
    /// The followed terminal jumped; `player` followed to `position`.
    Followed {
        uri: String,
        player: String,
        position: Option<f64>,
    },
    /// The push never reached a player.
    Refused { uri: String, reason: Refusal },
    /// A player was asked and could not do it; not retried.
    Failed {
        uri: String,
        player: Option<String>,
        reason: String,
    },
}

/// Where `handoff player` connects.
#[derive(Debug, Clone)]
pub struct PlayerOptions {
    /// The D-Bus address; None for the user's session bus.
    pub bus: Option<String>,
    /// The daemon's control socket.
    pub control_socket: PathBuf,
}

/// A running bridge.
pub struct Player {
    cancel: CancellationToken,
    tasks: TaskTracker,
    events: broadcast::Sender<PlayerEvent>,
    failed: watch::Receiver<Option<String>>,
    watching: watch::Receiver<bool>,
}

impl Player {
    /// Connects to the bus and starts the source, the session writer and (with `[player]
    /// open`) the sink. The control socket need not be there yet.
    pub async fn start(config: PlayerConfig, options: PlayerOptions) -> Result<Self, PlayerError> {
        let bus = mpris::Bus::connect(options.bus.as_deref())
            .await
            .map_err(PlayerError::Connect)?;
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (events, _) = broadcast::channel(64);
        let (failed_tx, failed) = watch::channel(None);
        let (actions_tx, actions) = watch::channel(None);

        let source = source::run(bus.clone(), config.clone(), actions_tx, cancel.clone());
        let stop = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = source.await {
                tracing::error!("{e}");
                failed_tx.send_replace(Some(e.to_string()));
                stop.cancel();
            }
        });
        tasks.spawn(source::write_sessions(
            options.control_socket.clone(),
            actions,
            cancel.clone(),
        ));
        let (watching_tx, watching) = watch::channel(false);
        if config.open {
            let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
            tasks.spawn(sink::watch_pushes(
                options.control_socket.clone(),
                push_tx,
                watching_tx,
                cancel.clone(),
            ));
            let opener = sink::Opener::new(bus, config, options.bus.clone(), events.clone());
            tasks.spawn(opener.run(push_rx, cancel.clone()));
        }
        tasks.close();
        Ok(Self {
            cancel,
            tasks,
            events,
            failed,
            watching,
        })
    }

    /// Every event of the sink from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PlayerEvent> {
        self.events.subscribe()
    }

    /// Resolves once the sink watches the daemon's pushes (never without `[player] open`):
    /// pushes delivered from then on reach it.
    pub async fn watching(&self) {
        let mut watching = self.watching.clone();
        if watching.wait_for(|w| *w).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves with the reason when the bridge cannot go on (the bus went away).
    pub async fn failed(&self) -> String {
        let mut failed = self.failed.clone();
        let reason = match failed.wait_for(|f| f.is_some()).await {
            Ok(reason) => reason.clone(),
            // The source ended without failing: nothing will fail any more.
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Stops every task (waiting up to 3 s for them).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(3), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("the player's tasks did not end within 3 s");
        }
        tracing::debug!("player tasks ended");
    }
}
