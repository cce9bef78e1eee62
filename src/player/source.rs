//! The source: this terminal's session follows what the desktop's player plays.
//!
//! The task follows every MPRIS player whose name matches `[player] share`, re-reads a player's
//! state on each of its signals, and picks the **active** one: the player that most recently
//! started playing, else a paused one (a paused video is what a person walks away from). Its
//! track is shared once it has been unchanged for `settle_secs` (players show provisional
//! metadata while loading), if its url has a scheme from `[player] schemes`.
//!
//! Positions are not signalled by players, so the position is read on every signal (a seek,
//! play/pause, a new track) and every `position_poll_secs` while playing. A session is a
//! timeline — `position` at `meta.position_at` (Unix milliseconds), `meta.status` playing or
//! paused — so it is sent again only when something really changed: another track, title or
//! status, or a position off the timeline by more than `tolerance_secs` (a seek, a stall). A
//! playing video costs no traffic while it simply plays on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::mpris::{self, Bus, PlayerState, Signal, Status};
use super::PlayerError;
use crate::config::PlayerConfig;
use crate::control::{ControlClient, ControlRequest, Reply};
use crate::wire::Session;

/// Longest title or artist list shared (characters); longer ones are cut.
const MAX_TEXT: usize = 512;

/// A player the source follows.
#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    owner: String,
    state: PlayerState,
    /// When it last started playing.
    playing_since: Option<Instant>,
    /// When its track last changed.
    track_since: Instant,
}

/// Every followed player, by well-known name.
#[derive(Debug, Default)]
pub(crate) struct Players {
    players: BTreeMap<String, Tracked>,
}

impl Players {
    fn update(&mut self, name: &str, owner: &str, state: PlayerState, now: Instant) {
        match self.players.get_mut(name) {
            Some(t) => {
                if t.state.track != state.track {
                    t.track_since = now;
                }
                if state.status == Status::Playing && t.state.status != Status::Playing {
                    t.playing_since = Some(now);
                }
                t.owner = owner.to_string();
                t.state = state;
            }
            None => {
                let playing_since = (state.status == Status::Playing).then_some(now);
                self.players.insert(
                    name.to_string(),
                    Tracked {
                        owner: owner.to_string(),
                        state,
                        playing_since,
                        track_since: now,
                    },
                );
            }
        }
    }

    fn remove(&mut self, name: &str) {
        self.players.remove(name);
    }

    fn names_owned_by(&self, owner: &str) -> Vec<String> {
        self.players
            .iter()
            .filter(|(_, t)| t.owner == owner)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The active player: the one that most recently started playing, else a paused one
    /// (the most recently playing first, then by name).
    fn active(&self) -> Option<(&str, &Tracked)> {
        self.players
            .iter()
            .filter(|(_, t)| t.state.status != Status::Stopped)
            .max_by(|(an, a), (bn, b)| {
                let key = |t: &Tracked| (t.state.status == Status::Playing, t.playing_since);
                key(a).cmp(&key(b)).then_with(|| bn.cmp(an))
            })
            .map(|(n, t)| (n.as_str(), t))
    }
}

/// What the session should be now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Desired {
    /// Nothing shareable plays.
    Nothing,
    /// The active track is still settling: wait until the instant given.
    Settling(Instant),
    /// Share this.
    Show(Shown),
}

/// A shareable state of the active player.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shown {
    pub uri: String,
    pub title: String,
    pub artist: Option<String>,
    pub length: Option<f64>,
    pub status: Status,
    pub rate: f64,
    /// Seconds, read at `read_at`.
    pub position: Option<f64>,
    pub read_at: Instant,
}

fn cut(text: String) -> String {
    let text = crate::text::clean(text);
    match text.char_indices().nth(MAX_TEXT) {
        Some((i, _)) => text[..i].to_string(),
        None => text,
    }
}

/// What to share for `active` (a player's state and position read at `now`).
pub(crate) fn desired(
    active: Option<&Tracked>,
    position: Option<f64>,
    now: Instant,
    config: &PlayerConfig,
) -> Desired {
    let Some(t) = active else {
        return Desired::Nothing;
    };
    let settled_at = t.track_since + config.settle;
    if now < settled_at {
        return Desired::Settling(settled_at);
    }
    let Some(uri) = t.state.track.url.clone() else {
        return Desired::Nothing;
    };
    if crate::hook::check_scheme(&uri, &config.schemes).is_err() || uri.starts_with('-') {
        return Desired::Nothing;
    }
    let artist = (!t.state.track.artists.is_empty()).then(|| cut(t.state.track.artists.join(", ")));
    Desired::Show(Shown {
        uri,
        title: cut(t.state.track.title.clone().unwrap_or_default()),
        artist,
        length: t.state.track.length(),
        status: t.state.status,
        rate: t.state.rate,
        position,
        read_at: now,
    })
}

/// What the session writer should do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Set(Session),
    Clear,
}

/// Decides which changes are real: it remembers what was sent last.
#[derive(Debug)]
pub(crate) struct Publisher {
    last: Option<Shown>,
    /// Whether a clear is the last thing sent (or nothing was sent yet).
    cleared: bool,
    clear_on_stop: bool,
    tolerance: f64,
}

impl Publisher {
    pub(crate) fn new(config: &PlayerConfig) -> Self {
        Self {
            last: None,
            cleared: true,
            clear_on_stop: config.clear_on_stop,
            tolerance: config.tolerance.as_secs_f64(),
        }
    }

    /// The action for `desired`, if it is a real change; `now_ms` is the Unix time in
    /// milliseconds at `desired`'s reading.
    pub(crate) fn decide(&mut self, desired: &Desired, now_ms: u64) -> Option<Action> {
        match desired {
            Desired::Settling(_) => None,
            Desired::Nothing => {
                if self.cleared || !self.clear_on_stop {
                    return None;
                }
                self.last = None;
                self.cleared = true;
                Some(Action::Clear)
            }
            Desired::Show(shown) => {
                let changed = match &self.last {
                    None => true,
                    Some(last) => {
                        last.uri != shown.uri
                            || last.title != shown.title
                            || last.artist != shown.artist
                            || last.length != shown.length
                            || last.status != shown.status
                            || self.off_timeline(last, shown)
                    }
                };
                if !changed {
                    return None;
                }
                self.last = Some(shown.clone());
                self.cleared = false;
                Some(Action::Set(session(shown, now_ms)))
            }
        }
    }

    /// Whether `shown`'s position is off the timeline the last sent state describes.
    fn off_timeline(&self, last: &Shown, shown: &Shown) -> bool {
        match (last.position, shown.position) {
            (None, None) => false,
            (Some(_), None) | (None, Some(_)) => true,
            (Some(then), Some(now)) => {
                let elapsed = shown.read_at.saturating_duration_since(last.read_at);
                let expected = if last.status == Status::Playing {
                    then + elapsed.as_secs_f64() * last.rate
                } else {
                    then
                };
                (now - expected).abs() > self.tolerance
            }
        }
    }
}

/// The session for `shown`, with its timeline in `meta`.
fn session(shown: &Shown, now_ms: u64) -> Session {
    let mut meta = BTreeMap::new();
    if let Some(artist) = &shown.artist {
        meta.insert("artist".to_string(), artist.clone());
    }
    if let Some(length) = shown.length {
        meta.insert("length".to_string(), format!("{length:.3}"));
    }
    meta.insert("status".to_string(), shown.status.word().to_string());
    if shown.position.is_some() {
        meta.insert("position_at".to_string(), now_ms.to_string());
    }
    Session {
        uri: shown.uri.clone(),
        title: shown.title.clone(),
        // Milliseconds are as precise as a session needs.
        position: shown.position.map(|p| (p * 1000.0).round() / 1000.0),
        meta,
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Follows the players and hands every real change to the session writer. Returns when
/// `cancel` fires, or with an error when the bus connection ends.
pub(crate) async fn run(
    bus: Bus,
    config: PlayerConfig,
    actions: watch::Sender<Option<Action>>,
    cancel: CancellationToken,
) -> Result<(), PlayerError> {
    let mut signals = bus.signals(None).await.map_err(PlayerError::Bus)?;
    let mut players = Players::default();
    let now = Instant::now();
    for (name, owner) in bus.players().await.map_err(PlayerError::Bus)? {
        if mpris::matches(&config.share, &name[mpris::PREFIX.len()..]) {
            if let Ok(state) = bus.state(&name).await {
                players.update(&name, &owner, state, now);
            }
        }
    }
    let mut publisher = Publisher::new(&config);
    let mut active_name: Option<String> = None;
    let mut unshareable: Option<String> = None;
    loop {
        // Read the active player's position and decide.
        let now = Instant::now();
        let active = players.active().map(|(n, t)| (n.to_string(), t.clone()));
        let position = match &active {
            Some((name, t)) if t.state.status != Status::Stopped => {
                bus.position(name).await.ok().flatten()
            }
            _ => None,
        };
        let want = desired(active.as_ref().map(|(_, t)| t), position, now, &config);
        if active.as_ref().map(|(n, _)| n) != active_name.as_ref() {
            active_name = active.as_ref().map(|(n, _)| n.clone());
            debug!(player = ?active_name, "active player");
        }
        if let (Desired::Nothing, Some((name, t))) = (&want, &active) {
            let url = t.state.track.url.clone();
            if url.is_some() && url != unshareable {
                info!(player = %name, "not shared: its url's scheme is not in [player] schemes");
                unshareable = url;
            }
        }
        if let Some(action) = publisher.decide(&want, unix_ms()) {
            match &action {
                Action::Set(s) => {
                    info!(uri = %s.uri, position = ?s.position, status = ?s.meta.get("status"), "sharing")
                }
                Action::Clear => info!("nothing plays: session cleared"),
            }
            actions.send_replace(Some(action));
        }
        // Sleep until a signal, the track settles, or the next position reading.
        let playing = active
            .as_ref()
            .is_some_and(|(_, t)| t.state.status == Status::Playing);
        let wake = match want {
            Desired::Settling(at) => Some(at),
            _ if playing => Some(now + config.position_poll),
            _ => None,
        };
        let signal = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = sleep_until(wake) => continue,
            s = signals.next() => s,
        };
        let Some(signal) = signal else {
            return Err(PlayerError::BusClosed);
        };
        let now = Instant::now();
        match signal {
            Signal::Owner { name, owner: None } => players.remove(&name),
            Signal::Owner {
                name,
                owner: Some(owner),
            } => {
                if mpris::matches(&config.share, &name[mpris::PREFIX.len()..]) {
                    match bus.state(&name).await {
                        Ok(state) => players.update(&name, &owner, state, now),
                        Err(e) => debug!(player = %name, "cannot read its state: {e}"),
                    }
                }
            }
            Signal::Changed { sender, .. } | Signal::Seeked { sender, .. } => {
                for name in players.names_owned_by(&sender) {
                    match bus.state(&name).await {
                        Ok(state) => players.update(&name, &sender, state, now),
                        Err(e) => debug!(player = %name, "cannot read its state: {e}"),
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Sends the latest action to the daemon's control socket, reconnecting as needed. After a
/// reconnect (the daemon restarted and forgot the session) the last session is sent again.
pub(crate) async fn write_sessions(
    socket: PathBuf,
    mut actions: watch::Receiver<Option<Action>>,
    cancel: CancellationToken,
) {
    let mut client: Option<ControlClient> = None;
    let mut pending: Option<Action> = None;
    let mut last_sent: Option<Action> = None;
    let mut backoff = Duration::from_millis(500);
    let mut reported = false;
    loop {
        if let Some(action) = pending.clone() {
            if client.is_none() {
                match ControlClient::connect(&socket).await {
                    Ok(c) => {
                        if reported {
                            info!("control socket {} reachable again", socket.display());
                        }
                        client = Some(c);
                        reported = false;
                        backoff = Duration::from_millis(500);
                    }
                    Err(e) => {
                        if !reported {
                            warn!("{e}; retrying");
                            reported = true;
                        }
                    }
                }
            }
            if let Some(c) = client.as_mut() {
                let request = match &action {
                    Action::Set(s) => ControlRequest::SessionSet {
                        uri: s.uri.clone(),
                        title: s.title.clone(),
                        position: s.position,
                        meta: s.meta.clone(),
                    },
                    Action::Clear => ControlRequest::SessionClear,
                };
                match c.call(&request).await {
                    Ok(Reply { ok: true, .. }) => {
                        last_sent = Some(action);
                        pending = None;
                    }
                    Ok(reply) => {
                        warn!(
                            "the daemon refused the session: {}",
                            reply.error.unwrap_or_default()
                        );
                        pending = None;
                    }
                    Err(e) => {
                        debug!("control socket: {e}");
                        client = None;
                    }
                }
            }
        }
        if pending.is_some() {
            // Not delivered: try again after a pause, or sooner with a newer action.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
                changed = actions.changed() => {
                    if changed.is_err() { return; }
                    pending = actions.borrow_and_update().clone();
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = actions.changed() => {
                if changed.is_err() { return; }
                pending = actions.borrow_and_update().clone();
            }
            // The daemon never writes unprompted: a read that ends means it went away.
            closed = read_closed(client.as_mut()) => {
                debug!("control connection ended: {closed}");
                client = None;
                // A restarted daemon has forgotten the session.
                pending = last_sent.clone();
            }
        }
    }
}

async fn read_closed(client: Option<&mut ControlClient>) -> String {
    match client {
        Some(c) => match c.read_line::<serde_json::Value>().await {
            Ok(v) => format!("unexpected line {v}"),
            Err(e) => e.to_string(),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::player::mpris::Track;

    fn config() -> PlayerConfig {
        PlayerConfig::default()
    }

    fn state(status: Status, url: &str, title: &str) -> PlayerState {
        PlayerState {
            status,
            track: Track {
                url: Some(url.to_string()),
                title: Some(title.to_string()),
                artists: vec!["Blender".into()],
                length_us: Some(120_000_000),
                trackid: Some("/0".into()),
            },
            rate: 1.0,
        }
    }

    #[test]
    fn the_most_recently_playing_player_is_active_else_a_paused_one() {
        let t0 = Instant::now();
        let mut p = Players::default();
        p.update(
            "org.mpris.MediaPlayer2.a",
            ":1.1",
            state(Status::Paused, "http://a/", "A"),
            t0,
        );
        p.update(
            "org.mpris.MediaPlayer2.b",
            ":1.2",
            state(Status::Stopped, "http://b/", "B"),
            t0,
        );
        assert_eq!(p.active().unwrap().0, "org.mpris.MediaPlayer2.a");
        let t1 = t0 + Duration::from_secs(1);
        p.update(
            "org.mpris.MediaPlayer2.b",
            ":1.2",
            state(Status::Playing, "http://b/", "B"),
            t1,
        );
        assert_eq!(p.active().unwrap().0, "org.mpris.MediaPlayer2.b");
        let t2 = t1 + Duration::from_secs(1);
        p.update(
            "org.mpris.MediaPlayer2.a",
            ":1.1",
            state(Status::Playing, "http://a/", "A"),
            t2,
        );
        assert_eq!(p.active().unwrap().0, "org.mpris.MediaPlayer2.a");
        p.remove("org.mpris.MediaPlayer2.a");
        assert_eq!(p.active().unwrap().0, "org.mpris.MediaPlayer2.b");
        p.update(
            "org.mpris.MediaPlayer2.b",
            ":1.2",
            state(Status::Stopped, "http://b/", "B"),
            t2,
        );
        assert!(p.active().is_none());
    }

    #[test]
    fn provisional_metadata_waits_for_the_track_to_settle() {
        let c = config();
        let t0 = Instant::now();
        let mut p = Players::default();
        // mpv first shows the file name as the title, then the real one.
        p.update(
            "n",
            ":1.1",
            state(Status::Playing, "http://h/bbb.wav", "bbb.wav"),
            t0,
        );
        let t1 = t0 + Duration::from_millis(200);
        p.update(
            "n",
            ":1.1",
            state(Status::Playing, "http://h/bbb.wav", "Big Buck Bunny"),
            t1,
        );
        let (_, t) = p.active().unwrap();
        assert_eq!(
            desired(Some(t), Some(0.2), t1, &c),
            Desired::Settling(t1 + c.settle)
        );
        let later = t1 + c.settle;
        match desired(Some(t), Some(1.2), later, &c) {
            Desired::Show(s) => {
                assert_eq!(s.title, "Big Buck Bunny");
                assert_eq!(s.length, Some(120.0));
                assert_eq!(s.artist.as_deref(), Some("Blender"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_allowed_schemes_are_shared() {
        let mut c = config();
        let t0 = Instant::now();
        let later = t0 + c.settle;
        for url in ["file:///home/u/a.mkv", "javascript:x", "-v", "relative.mkv"] {
            let mut p = Players::default();
            p.update("n", ":1", state(Status::Playing, url, "t"), t0);
            assert_eq!(
                desired(p.active().map(|x| x.1), None, later, &c),
                Desired::Nothing,
                "{url}"
            );
        }
        c.schemes = vec!["http".into(), "https".into(), "file".into()];
        let mut p = Players::default();
        p.update(
            "n",
            ":1",
            state(Status::Playing, "file:///srv/a.mkv", "t"),
            t0,
        );
        assert!(matches!(
            desired(p.active().map(|x| x.1), None, later, &c),
            Desired::Show(_)
        ));
    }

    fn shown(status: Status, position: f64, at: Instant) -> Desired {
        Desired::Show(Shown {
            uri: "http://h/a".into(),
            title: "A".into(),
            artist: None,
            length: Some(120.0),
            status,
            rate: 1.0,
            position: Some(position),
            read_at: at,
        })
    }

    #[test]
    fn only_real_changes_are_sent() {
        let mut p = Publisher::new(&config());
        let t0 = Instant::now();
        let Some(Action::Set(s)) = p.decide(&shown(Status::Playing, 20.0, t0), 1_000) else {
            panic!("the first state is sent");
        };
        assert_eq!(s.position, Some(20.0));
        assert_eq!(s.meta["status"], "playing");
        assert_eq!(s.meta["position_at"], "1000");
        assert_eq!(s.meta["length"], "120.000");
        // Playing on: 5 s later at 25 s is on the timeline, nothing to send.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(p.decide(&shown(Status::Playing, 25.3, t1), 6_000), None);
        // A seek to 40 s is off it.
        let Some(Action::Set(s)) = p.decide(&shown(Status::Playing, 40.0, t1), 6_000) else {
            panic!("a seek is sent");
        };
        assert_eq!(s.position, Some(40.0));
        // Pausing is a change; staying paused is not.
        let t2 = t1 + Duration::from_secs(3);
        assert!(p.decide(&shown(Status::Paused, 43.0, t2), 9_000).is_some());
        let t3 = t2 + Duration::from_secs(30);
        assert_eq!(p.decide(&shown(Status::Paused, 43.0, t3), 39_000), None);
        // A stall while "playing" (the position stays put) shows after the tolerance.
        assert!(p
            .decide(&shown(Status::Playing, 43.0, t3), 39_000)
            .is_some());
        let t4 = t3 + Duration::from_secs(1);
        assert_eq!(p.decide(&shown(Status::Playing, 43.0, t4), 40_000), None);
        let t5 = t3 + Duration::from_secs(10);
        assert!(p
            .decide(&shown(Status::Playing, 43.0, t5), 49_000)
            .is_some());
        // Stopping clears once.
        assert_eq!(p.decide(&Desired::Nothing, 50_000), Some(Action::Clear));
        assert_eq!(p.decide(&Desired::Nothing, 51_000), None);
        // Nothing to clear before anything was shared.
        assert_eq!(Publisher::new(&config()).decide(&Desired::Nothing, 0), None);
    }

    #[test]
    fn without_clear_on_stop_the_last_session_stays() {
        let mut c = config();
        c.clear_on_stop = false;
        let mut p = Publisher::new(&c);
        assert!(p
            .decide(&shown(Status::Playing, 1.0, Instant::now()), 0)
            .is_some());
        assert_eq!(p.decide(&Desired::Nothing, 1), None);
    }
}
