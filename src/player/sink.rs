//! The sink: what a followed terminal shows opens in a player here, at its position.
//!
//! Pushes come from the daemon's `watch` stream and are handled one at a time, in order. Only
//! session pushes of followed terminals (`from` set) are opened, and only absolute URIs whose
//! scheme is in `[player] schemes` reach a player (so never one starting with `-`); a push's uri
//! has already lost its control and bidi characters ([`crate::text::clean`]).
//!
//! Opening goes: pick a player (one already showing the uri; else an idle, then a paused one;
//! one playing something else only if it plays what this sink opened before, or with
//! `replace_playing`; none → start `[player] command`), `OpenUri`, wait until its `Metadata`
//! shows the uri with a length (taking the track id), `SetPosition`, wait for `Seeked` near the
//! target, `Play`. Players differ: mpv replaces its playlist and stays paused until `Play`, VLC
//! appends and starts playing. A load that fails (the player stops without the track, or does
//! not load it within `load_timeout_secs`) is reported and that uri is not tried again until
//! another one was pushed: never a retry loop.
//!
//! A later push of the uri already opened is a position update: the player is moved only when
//! the pushed timeline jumped (a seek on the other terminal), never to fight a local pause or
//! seek.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::mpris::{self, Bus, PlayerState, Signal, Signals, Status};
use super::{PlayerEvent, Refusal};
use crate::config::PlayerConfig;
use crate::control::{ControlClient, ControlRequest, PushRecord, WatchLine};
use crate::hook::HookRefusal;

/// How often a player's state is read again while waiting, for players that signal little.
const POLL: Duration = Duration::from_millis(500);
/// How long a player may show `Stopped` without the track before the load counts as failed.
const STOPPED_GRACE: Duration = Duration::from_secs(1);
/// How long a player may take to report a new status.
const STATUS_WAIT: Duration = Duration::from_secs(5);
/// How long a player may take to seek.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest extrapolation of a playing timeline (clocks far apart must not send a player to the
/// end of a long stream).
const MAX_AGE: f64 = 86_400.0;

/// Whether `uri` may be handed to a player.
pub(crate) fn check_uri(uri: &str, schemes: &[String]) -> Result<(), Refusal> {
    if uri.starts_with('-') {
        return Err(Refusal::LeadingDash);
    }
    crate::hook::check_scheme(uri, schemes).map_err(|e| match e {
        HookRefusal::Scheme(scheme) => Refusal::Scheme(scheme),
        HookRefusal::NotAbsolute | HookRefusal::LeadingDash(_) => Refusal::NotAbsolute,
    })
}

/// A terminal's playback as a push describes it: at `at` (when it arrived here) it was at
/// `position`, playing or not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timeline {
    position: f64,
    at: Instant,
    playing: bool,
}

impl Timeline {
    /// Reads `push`'s position, moved on by the time since the sender read it
    /// (`meta.position_at`, Unix ms) if it was playing, and kept within `meta.length`.
    pub(crate) fn of(push: &PushRecord, now: Instant, now_ms: u64) -> Self {
        let playing = push.meta.get("status").is_some_and(|s| s == "playing");
        let mut position = push
            .position
            .filter(|p| p.is_finite() && *p >= 0.0)
            .unwrap_or(0.0);
        if playing {
            if let Some(at) = push
                .meta
                .get("position_at")
                .and_then(|v| v.parse::<u64>().ok())
            {
                let age = now_ms.saturating_sub(at) as f64 / 1000.0;
                position += age.min(MAX_AGE);
            }
        }
        if let Some(length) = push
            .meta
            .get("length")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|l| l.is_finite() && *l > 0.0)
        {
            position = position.min(length);
        }
        Self {
            position,
            at: now,
            playing,
        }
    }

    /// The position at `now`.
    pub(crate) fn at(&self, now: Instant) -> f64 {
        if self.playing {
            self.position + now.saturating_duration_since(self.at).as_secs_f64()
        } else {
            self.position
        }
    }
}

/// Which player to open a push in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    Use(usize),
    /// Every player is playing something else.
    Busy(usize),
    NoPlayer,
}

/// Picks the player for `uri` among `players` (name, state), given what this sink opened last
/// (`ours`: player and uri).
pub(crate) fn choose(
    players: &[(String, PlayerState)],
    uri: &str,
    ours: Option<(&str, &str)>,
    replace_playing: bool,
) -> Choice {
    let find = |f: &dyn Fn(&(String, PlayerState)) -> bool| players.iter().position(f);
    if let Some(i) = find(&|(_, s)| s.track.url.as_deref() == Some(uri)) {
        return Choice::Use(i);
    }
    // Idle: stopped, or showing no track (an idle mpv-mpris 0.7 may say Playing).
    if let Some(i) = find(&|(_, s)| s.status == Status::Stopped || s.track.url.is_none()) {
        return Choice::Use(i);
    }
    if let Some(i) = find(&|(_, s)| s.status == Status::Paused) {
        return Choice::Use(i);
    }
    if let Some((player, opened)) = ours {
        if let Some(i) = find(&|(n, s)| n == player && s.track.url.as_deref() == Some(opened)) {
            return Choice::Use(i);
        }
    }
    match players.is_empty() {
        true => Choice::NoPlayer,
        false if replace_playing => Choice::Use(0),
        false => Choice::Busy(0),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long a catch-up pull may wait for the followed terminal's session.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Pulls again, on a connection of its own, from every terminal the daemon follows: each
/// answers with its session as it is now (or none), which the server pushes again and so
/// reaches the `watch` stream. Run once that stream is in place, it catches up on what was
/// pushed while no bridge watched (the daemon and the bridge start together at login, and a
/// followed terminal's session is pushed the moment the link is made) — and, unlike the inbox,
/// never opens a session the other terminal has cleared since. Returns the terminals pulled.
async fn catch_up(socket: &std::path::Path) -> Result<usize, String> {
    let status = crate::control::call(socket, &ControlRequest::Status, CATCH_UP_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let Some(status) = status.status else {
        return Err(status.error.unwrap_or_else(|| "no status".into()));
    };
    let mut pulled = 0;
    for follow in status.follows {
        let pull = ControlRequest::Pull {
            peer: follow.id.clone(),
            timeout_secs: Some(CATCH_UP_TIMEOUT.as_secs_f64()),
        };
        match crate::control::call(socket, &pull, CATCH_UP_TIMEOUT * 2).await {
            Ok(reply) if reply.ok => pulled += 1,
            Ok(reply) => debug!(
                peer = %follow.id,
                "catch-up pull: {}",
                reply.refused.or(reply.error).unwrap_or_default()
            ),
            Err(e) => debug!(peer = %follow.id, "catch-up pull: {e}"),
        }
    }
    Ok(pulled)
}

/// Reads the daemon's `watch` stream into `pushes`, reconnecting while the daemon is away.
/// Each time the stream starts, the followed terminals are pulled again ([`catch_up`]): a
/// session pushed while the bridge was starting or the daemon restarting is not lost.
pub(crate) async fn watch_pushes(
    socket: PathBuf,
    pushes: mpsc::Sender<PushRecord>,
    watching: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    let mut reported = false;
    loop {
        let session = async {
            let mut client = ControlClient::connect(&socket).await?;
            let reply = client.call(&ControlRequest::Watch).await?;
            if !reply.ok {
                return Err(crate::control::ClientError::BadLine(
                    reply.error.unwrap_or_default(),
                ));
            }
            info!("watching pushes on {}", socket.display());
            watching.send_replace(true);
            // Watching already, so what the pulls bring comes on the stream; they run beside
            // it (its lines wait in the socket meanwhile), and end with the bridge.
            let (socket, cancel) = (socket.clone(), cancel.clone());
            tokio::spawn(async move {
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    result = catch_up(&socket) => result,
                };
                match result {
                    Ok(0) => {}
                    Ok(n) => info!("pulled again from {n} followed terminal(s), to catch up"),
                    Err(e) => warn!("cannot catch up on the followed terminals: {e}"),
                }
            });
            loop {
                let line: WatchLine = client.read_line().await?;
                if pushes.send(line.push).await.is_err() {
                    return Ok(());
                }
            }
        };
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            ended = session => ended,
        };
        watching.send_replace(false);
        match ended {
            Ok(()) => return,
            Err(e) if !reported => {
                warn!("{e}; retrying");
                reported = true;
            }
            Err(e) => debug!("{e}"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// What this sink opened last.
#[derive(Debug, Clone)]
struct Opened {
    from: String,
    uri: String,
    player: String,
    timeline: Timeline,
}

/// Opens pushes in players, one at a time.
pub(crate) struct Opener {
    bus: Bus,
    config: PlayerConfig,
    /// The bus's address for a started player (None: the session bus it finds itself).
    bus_address: Option<String>,
    events: broadcast::Sender<PlayerEvent>,
    current: Option<Opened>,
    /// A uri whose load failed: not tried again until another one is pushed.
    failed: Option<String>,
    child: Option<tokio::process::Child>,
}

impl Opener {
    pub(crate) fn new(
        bus: Bus,
        config: PlayerConfig,
        bus_address: Option<String>,
        events: broadcast::Sender<PlayerEvent>,
    ) -> Self {
        Self {
            bus,
            config,
            bus_address,
            events,
            current: None,
            failed: None,
            child: None,
        }
    }

    /// Handles pushes until `pushes` ends or `cancel` fires.
    pub(crate) async fn run(
        mut self,
        mut pushes: mpsc::Receiver<PushRecord>,
        cancel: CancellationToken,
    ) {
        loop {
            let push = tokio::select! {
                _ = cancel.cancelled() => return,
                p = pushes.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                () = self.handle(push) => {}
            }
        }
    }

    fn emit(&self, event: PlayerEvent) {
        match &event {
            PlayerEvent::Opened {
                uri,
                player,
                position,
            } => {
                info!(%uri, %player, ?position, "opened a push")
            }
            PlayerEvent::Followed {
                uri,
                player,
                position,
            } => {
                info!(%uri, %player, ?position, "followed a jump")
            }
            PlayerEvent::Refused { uri, reason } => warn!(%uri, "push not opened: {reason}"),
            PlayerEvent::Failed {
                uri,
                player,
                reason,
            } => {
                warn!(%uri, ?player, "push could not be opened: {reason}")
            }
        }
        let _ = self.events.send(event);
    }

    pub(crate) async fn handle(&mut self, push: PushRecord) {
        let Some(from) = push.from.clone() else {
            debug!(
                offset = push.offset,
                "a publisher's push: not opened in a player"
            );
            return;
        };
        let uri = push.uri.clone();
        if let Err(reason) = check_uri(&uri, &self.config.schemes) {
            self.emit(PlayerEvent::Refused { uri, reason });
            return;
        }
        let timeline = Timeline::of(&push, Instant::now(), unix_ms());
        // A later push of what is open: follow a jump, nothing else.
        if let Some(cur) = self
            .current
            .clone()
            .filter(|c| c.from == from && c.uri == uri)
        {
            if let Ok(state) = self.bus.state(&cur.player).await {
                if state.track.url.as_deref() == Some(uri.as_str()) {
                    let now = Instant::now();
                    let jump = (timeline.at(now) - cur.timeline.at(now)).abs();
                    if let Some(c) = self.current.as_mut() {
                        c.timeline = timeline;
                    }
                    if jump > self.config.tolerance.as_secs_f64() {
                        self.follow(&cur.player, &uri, state, timeline).await;
                    }
                    return;
                }
            }
        }
        if self.failed.as_deref() == Some(uri.as_str()) {
            debug!(%uri, "its load failed before: not tried again");
            return;
        }
        self.open(from, uri, timeline).await;
    }

    async fn follow(&mut self, player: &str, uri: &str, state: PlayerState, timeline: Timeline) {
        let Some(trackid) = state.track.trackid.clone() else {
            return;
        };
        let owner = match self.owner_of(player).await {
            Some(o) => o,
            None => return,
        };
        let mut signals = match self.bus.signals(Some(&owner)).await {
            Ok(s) => s,
            Err(e) => {
                self.fail(uri, Some(player), format!("D-Bus: {e}"));
                return;
            }
        };
        match seek(
            &self.bus,
            player,
            &trackid,
            timeline,
            &mut signals,
            self.config.tolerance,
        )
        .await
        {
            Ok(position) => self.emit(PlayerEvent::Followed {
                uri: uri.to_string(),
                player: player.to_string(),
                position: Some(position),
            }),
            Err(reason) => self.fail(uri, Some(player), reason),
        }
    }

    fn fail(&self, uri: &str, player: Option<&str>, reason: String) {
        self.emit(PlayerEvent::Failed {
            uri: uri.to_string(),
            player: player.map(str::to_string),
            reason,
        });
    }

    async fn owner_of(&self, player: &str) -> Option<String> {
        let players = self.bus.players().await.ok()?;
        players
            .into_iter()
            .find(|(n, _)| n == player)
            .map(|(_, o)| o)
    }

    /// The players this sink may drive, with their owners and states.
    async fn drivable(&self) -> Vec<(String, String, PlayerState)> {
        let mut out = Vec::new();
        for (name, owner) in self.bus.players().await.unwrap_or_default() {
            if !mpris::matches(&self.config.drive, &name[mpris::PREFIX.len()..]) {
                continue;
            }
            if let Ok(state) = self.bus.state(&name).await {
                out.push((name, owner, state));
            }
        }
        out
    }

    async fn open(&mut self, from: String, uri: String, timeline: Timeline) {
        let players = self.drivable().await;
        let states: Vec<(String, PlayerState)> = players
            .iter()
            .map(|(n, _, s)| (n.clone(), s.clone()))
            .collect();
        let ours = self
            .current
            .as_ref()
            .map(|c| (c.player.as_str(), c.uri.as_str()));
        let (player, owner, state) = match choose(&states, &uri, ours, self.config.replace_playing)
        {
            Choice::Use(i) => players[i].clone(),
            Choice::Busy(i) => {
                let (player, _, state) = &players[i];
                self.emit(PlayerEvent::Refused {
                    uri,
                    reason: Refusal::PlayingSomethingElse {
                        player: player.clone(),
                        playing: state.track.url.clone(),
                    },
                });
                return;
            }
            Choice::NoPlayer => match self.start_command().await {
                Ok(found) => found,
                Err(None) => {
                    self.emit(PlayerEvent::Refused {
                        uri,
                        reason: Refusal::NoPlayer,
                    });
                    return;
                }
                Err(Some(reason)) => {
                    self.fail(&uri, None, reason);
                    return;
                }
            },
        };
        // Subscribe before acting, so no signal the calls cause is missed.
        let mut signals = match self.bus.signals(Some(&owner)).await {
            Ok(s) => s,
            Err(e) => {
                self.fail(&uri, Some(&player), format!("D-Bus: {e}"));
                return;
            }
        };
        let loaded =
            state.track.url.as_deref() == Some(uri.as_str()) && state.track.length().is_some();
        // Paused first: mpv keeps its pause state across files, so it loads paused and `Play`
        // is a change it reports (mpv-mpris 0.7 reports a load into an idle mpv as Stopped
        // until `pause` changes). Players that play on their own (VLC) lose nothing.
        if state.status == Status::Playing {
            let _ = self.bus.pause(&player).await;
            wait_status(&self.bus, &player, &mut signals, |s| s != Status::Playing).await;
        } else if state.status == Status::Stopped {
            let _ = self.bus.pause(&player).await;
        }
        let trackid = match (loaded, state.track.trackid.clone()) {
            (true, Some(trackid)) => trackid,
            _ => {
                if let Err(e) = self.bus.open_uri(&player, &uri).await {
                    self.failed = Some(uri.clone());
                    self.fail(&uri, Some(&player), format!("OpenUri failed: {e}"));
                    return;
                }
                let deadline = Instant::now() + self.config.load_timeout;
                match wait_loaded(&self.bus, &player, &uri, &mut signals, deadline).await {
                    Ok(trackid) => trackid,
                    Err(reason) => {
                        self.failed = Some(uri.clone());
                        self.fail(&uri, Some(&player), reason);
                        return;
                    }
                }
            }
        };
        let position = match seek(
            &self.bus,
            &player,
            &trackid,
            timeline,
            &mut signals,
            self.config.tolerance,
        )
        .await
        {
            Ok(p) => Some(p),
            Err(reason) => {
                // Playing from where it is still beats not playing.
                warn!(%uri, %player, "{reason}");
                None
            }
        };
        if let Err(e) = self.bus.play(&player).await {
            self.fail(&uri, Some(&player), format!("Play failed: {e}"));
            return;
        }
        // Confirm it plays. mpv-mpris 0.7 may miss a pause change that came too soon after
        // another: a second pause/play pair, each waited for, makes it tell the truth (so this
        // terminal's own source shares what now plays).
        if !wait_status(&self.bus, &player, &mut signals, |s| s == Status::Playing).await {
            let _ = self.bus.pause(&player).await;
            wait_status(&self.bus, &player, &mut signals, |s| s == Status::Paused).await;
            let _ = self.bus.play(&player).await;
            if !wait_status(&self.bus, &player, &mut signals, |s| s == Status::Playing).await {
                warn!(%uri, %player, "the player does not report playing it");
            }
        }
        self.failed = None;
        self.current = Some(Opened {
            from,
            uri: uri.clone(),
            player: player.clone(),
            timeline,
        });
        self.emit(PlayerEvent::Opened {
            uri,
            player,
            position,
        });
    }

    /// Starts `[player] command` (unless the one started before still runs) and waits for a
    /// player to drive to appear. `Err(None)`: no command is configured.
    async fn start_command(&mut self) -> Result<(String, String, PlayerState), Option<String>> {
        let Some((program, args)) = self.config.command.split_first() else {
            return Err(None);
        };
        let mut signals = self
            .bus
            .signals(None)
            .await
            .map_err(|e| Some(format!("D-Bus: {e}")))?;
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if !running {
            // The player's own output is not the bridge's: mpv alone writes a status line
            // every second while it plays, which would fill the bridge's journal.
            let mut command = tokio::process::Command::new(program);
            command
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(false);
            if let Some(address) = &self.bus_address {
                command.env("DBUS_SESSION_BUS_ADDRESS", address);
            }
            let child = command
                .spawn()
                .map_err(|e| Some(format!("cannot start {program:?} ([player] command): {e}")))?;
            info!(program = %program, pid = ?child.id(), "started a player");
            self.child = Some(child);
        }
        let deadline = Instant::now() + self.config.load_timeout;
        loop {
            let players = self.drivable().await;
            if let Some(found) = players.into_iter().next() {
                return Ok(found);
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Some(format!(
                        "{program:?} ([player] command) exited: {status}"
                    )));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(Some(format!(
                        "{program:?} ([player] command) showed no player matching [player] drive within {:?}",
                        self.config.load_timeout
                    )));
                }
                _ = tokio::time::sleep(POLL) => {}
                s = signals.next() => if s.is_none() {
                    return Err(Some("the bus connection ended".into()));
                },
            }
        }
    }
}

/// Waits (up to [`STATUS_WAIT`]) until `player`'s status satisfies `want`; whether it did.
async fn wait_status(
    bus: &Bus,
    player: &str,
    signals: &mut Signals,
    want: impl Fn(Status) -> bool,
) -> bool {
    let deadline = Instant::now() + STATUS_WAIT;
    loop {
        if bus.state(player).await.is_ok_and(|s| want(s.status)) {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => return false,
            _ = tokio::time::sleep(POLL) => {}
            s = signals.next() => if s.is_none() {
                return false;
            },
        }
    }
}

/// Waits until `player` shows `uri` with a length; returns its track id.
async fn wait_loaded(
    bus: &Bus,
    player: &str,
    uri: &str,
    signals: &mut Signals,
    deadline: Instant,
) -> Result<String, String> {
    let mut stopped_since: Option<Instant> = None;
    loop {
        let state = bus
            .state(player)
            .await
            .map_err(|e| format!("cannot read the player's state: {e}"))?;
        let shows = state.track.url.as_deref() == Some(uri);
        if shows && state.track.length().is_some() {
            return state
                .track
                .trackid
                .ok_or_else(|| "the player gives the track no id".to_string());
        }
        if let Some(since) = stopped_since {
            if since.elapsed() >= STOPPED_GRACE && state.status == Status::Stopped {
                return Err(if shows {
                    "the player stopped: it could not play it (length unknown)".into()
                } else {
                    "the player stopped without loading it".into()
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                return Err("the player did not load it in time ([player] load_timeout_secs)".into());
            }
            _ = tokio::time::sleep(POLL) => {}
            s = signals.next() => match s {
                None => return Err("the bus connection ended".into()),
                Some(Signal::Owner { name, owner: None }) if name == player => {
                    return Err("the player quit".into());
                }
                Some(Signal::Changed { status: Some(Status::Stopped), .. }) => {
                    stopped_since.get_or_insert_with(Instant::now);
                }
                Some(Signal::Changed { status: Some(_), .. }) => stopped_since = None,
                Some(_) => {}
            },
        }
    }
}

/// Moves `player` to where `timeline` is now and waits for it to get there (its `Seeked`
/// signal, or its position for players that do not send one); returns the position reached.
async fn seek(
    bus: &Bus,
    player: &str,
    trackid: &str,
    timeline: Timeline,
    signals: &mut Signals,
    tolerance: Duration,
) -> Result<f64, String> {
    let tolerance = tolerance.as_secs_f64();
    // Already there (e.g. the other terminal follows this one): no seek, no glitch.
    if let Ok(Some(p)) = bus.position(player).await {
        if (p - timeline.at(Instant::now())).abs() <= tolerance / 2.0 {
            return Ok(p);
        }
    }
    let target = timeline.at(Instant::now());
    bus.set_position(player, trackid, target)
        .await
        .map_err(|e| format!("SetPosition failed: {e}"))?;
    let deadline = Instant::now() + SEEK_TIMEOUT;
    loop {
        // The target moves on while the timeline plays.
        let close = |p: f64| (p - timeline.at(Instant::now())).abs() <= tolerance;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                return Err(format!("the player did not seek to {target:.1} s"));
            }
            _ = tokio::time::sleep(POLL) => {
                if let Ok(Some(p)) = bus.position(player).await {
                    if close(p) {
                        return Ok(p);
                    }
                }
            }
            s = signals.next() => match s {
                None => return Err("the bus connection ended".into()),
                Some(Signal::Seeked { position, .. }) if close(position) => return Ok(position),
                Some(Signal::Owner { name, owner: None }) if name == player => {
                    return Err("the player quit".into());
                }
                Some(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::player::mpris::Track;
    use std::collections::BTreeMap;

    fn web() -> Vec<String> {
        vec!["http".into(), "https".into()]
    }

    #[test]
    fn only_absolute_uris_from_the_allowlist_reach_a_player() {
        assert_eq!(check_uri("https://media.example/a.mp4", &web()), Ok(()));
        assert_eq!(
            check_uri("--script=/tmp/x.lua", &web()),
            Err(Refusal::LeadingDash)
        );
        assert_eq!(check_uri("-", &web()), Err(Refusal::LeadingDash));
        assert_eq!(
            check_uri("file:///etc/passwd", &web()),
            Err(Refusal::Scheme("file".into()))
        );
        assert_eq!(
            check_uri("javascript:alert(1)", &web()),
            Err(Refusal::Scheme("javascript".into()))
        );
        for bad in ["", "a.mp4", "http://x/ a", "https://x/\u{202E}"] {
            assert_eq!(check_uri(bad, &web()), Err(Refusal::NotAbsolute), "{bad:?}");
        }
    }

    fn push(position: Option<f64>, meta: &[(&str, &str)]) -> PushRecord {
        PushRecord {
            from: Some("a".into()),
            uri: "http://h/a".into(),
            title: "A".into(),
            body: None,
            position,
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            offset: 0,
        }
    }

    #[test]
    fn a_playing_timeline_moves_on_from_when_it_was_read() {
        let now = Instant::now();
        let t = Timeline::of(
            &push(
                Some(20.0),
                &[("status", "playing"), ("position_at", "10000")],
            ),
            now,
            13_500,
        );
        assert_eq!(t.at(now), 23.5);
        assert_eq!(t.at(now + Duration::from_secs(2)), 25.5);
        // Paused: it stays.
        let t = Timeline::of(
            &push(
                Some(20.0),
                &[("status", "paused"), ("position_at", "10000")],
            ),
            now,
            13_500,
        );
        assert_eq!(t.at(now + Duration::from_secs(2)), 20.0);
        // A clock behind the sender's does not move it backwards; the length bounds it.
        let t = Timeline::of(
            &push(
                Some(20.0),
                &[
                    ("status", "playing"),
                    ("position_at", "90000"),
                    ("length", "30"),
                ],
            ),
            now,
            13_500,
        );
        assert_eq!(t.at(now), 20.0);
        let t = Timeline::of(
            &push(
                Some(20.0),
                &[
                    ("status", "playing"),
                    ("position_at", "0"),
                    ("length", "30"),
                ],
            ),
            now,
            13_500_000,
        );
        assert_eq!(t.at(now), 30.0);
        // No position at all: from the start.
        assert_eq!(Timeline::of(&push(None, &[]), now, 0).at(now), 0.0);
        assert_eq!(
            Timeline::of(&push(Some(f64::NAN), &[]), now, 0).at(now),
            0.0
        );
    }

    fn player(name: &str, status: Status, url: Option<&str>) -> (String, PlayerState) {
        (
            name.to_string(),
            PlayerState {
                status,
                track: Track {
                    url: url.map(str::to_string),
                    ..Track::default()
                },
                rate: 1.0,
            },
        )
    }

    #[test]
    fn a_player_playing_something_else_is_not_taken_over() {
        let busy = vec![player("mpv", Status::Playing, Some("http://h/other"))];
        assert_eq!(choose(&busy, "http://h/a", None, false), Choice::Busy(0));
        assert_eq!(choose(&busy, "http://h/a", None, true), Choice::Use(0));
        // ... unless it plays what this sink opened there.
        assert_eq!(
            choose(&busy, "http://h/a", Some(("mpv", "http://h/other")), false),
            Choice::Use(0)
        );
        assert_eq!(
            choose(&busy, "http://h/a", Some(("vlc", "http://h/other")), false),
            Choice::Busy(0)
        );
        // An idle player wins over a paused one; one already showing the uri over both.
        let mixed = vec![
            player("a", Status::Paused, Some("http://h/x")),
            player("b", Status::Stopped, None),
            player("c", Status::Playing, Some("http://h/a")),
        ];
        assert_eq!(choose(&mixed, "http://h/a", None, false), Choice::Use(2));
        assert_eq!(choose(&mixed, "http://h/z", None, false), Choice::Use(1));
        assert_eq!(
            choose(&mixed[..1], "http://h/z", None, false),
            Choice::Use(0)
        );
        assert_eq!(choose(&[], "http://h/z", None, true), Choice::NoPlayer);
        // "Playing" nothing is idle.
        let idle = vec![player("mpv", Status::Playing, None)];
        assert_eq!(choose(&idle, "http://h/z", None, false), Choice::Use(0));
    }
}
