//! MPRIS on the session bus: the players' names, their state, the signals they send and the
//! calls `handoff player` makes (spec: <https://specifications.freedesktop.org/mpris-spec/latest/>).
//!
//! Every player owns a name `org.mpris.MediaPlayer2.<suffix>` and serves the object
//! `/org/mpris/MediaPlayer2` with the interface `org.mpris.MediaPlayer2.Player`. Players differ in
//! what they signal (mpv-mpris 0.7 keeps reporting `Stopped` after loading a file into an idle
//! mpv until it is played or paused), so a signal here is only a reason to read the state again,
//! never the state itself.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, Message, MessageStream, OwnedVariant, Variant};

/// The bus name prefix every MPRIS player owns a name under.
pub const PREFIX: &str = "org.mpris.MediaPlayer2.";
const PATH: &str = "/org/mpris/MediaPlayer2";
const PLAYER: &str = "org.mpris.MediaPlayer2.Player";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const DBUS: &str = "org.freedesktop.DBus";
/// Signals queued per stream before the oldest are dropped (they only prompt a re-read).
const QUEUE: usize = 256;

/// Whether the player named `org.mpris.MediaPlayer2.<suffix>` matches one of `patterns`: `*`
/// matches any run of characters, and a pattern also matches the player's instances (`vlc`
/// matches `vlc.instance7389`, as the MPRIS spec names a second instance).
pub fn matches(patterns: &[String], suffix: &str) -> bool {
    patterns.iter().any(|p| {
        glob(p.as_bytes(), suffix.as_bytes())
            || suffix
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// `PlaybackStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Playing,
    Paused,
    Stopped,
}

impl Status {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "Playing" => Some(Self::Playing),
            "Paused" => Some(Self::Paused),
            "Stopped" => Some(Self::Stopped),
            _ => None,
        }
    }

    /// The word used in a session's `meta` (`status`).
    pub fn word(self) -> &'static str {
        match self {
            Self::Playing => "playing",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }
}

/// What a player's `Metadata` says about the current track.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Track {
    /// `xesam:url`.
    pub url: Option<String>,
    /// `xesam:title`.
    pub title: Option<String>,
    /// `xesam:artist`.
    pub artists: Vec<String>,
    /// `mpris:length` in microseconds, as the player gave it (VLC says -1 for a failed load).
    pub length_us: Option<i64>,
    /// `mpris:trackid`, which `SetPosition` must name.
    pub trackid: Option<String>,
}

impl Track {
    /// The length in seconds, when the player knows a positive one.
    pub fn length(&self) -> Option<f64> {
        self.length_us
            .filter(|&us| us > 0)
            .map(|us| us as f64 / 1e6)
    }
}

/// The part of a player's state that `handoff player` uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PlayerState {
    pub status: Status,
    pub track: Track,
    /// `Rate`: 1.0 is normal speed.
    pub rate: f64,
}

impl PlayerState {
    /// Reads the state from the `org.mpris.MediaPlayer2.Player` properties; missing or
    /// ill-typed properties read as stopped, no track, normal speed.
    pub fn from_properties(props: &HashMap<String, OwnedVariant>) -> Self {
        let status = props
            .get("PlaybackStatus")
            .and_then(|v| text(v))
            .and_then(Status::parse)
            .unwrap_or(Status::Stopped);
        let track = props
            .get("Metadata")
            .map(|v| parse_metadata(v))
            .unwrap_or_default();
        let rate = props
            .get("Rate")
            .and_then(|v| number(v))
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(1.0);
        Self {
            status,
            track,
            rate,
        }
    }
}

/// The value inside any number of `v` wrappers.
fn unwrap<'a>(value: &'a Variant<'a>) -> &'a Variant<'a> {
    match value {
        Variant::Variant(inner) => unwrap(inner),
        other => other,
    }
}

fn text<'a>(value: &'a Variant<'a>) -> Option<&'a str> {
    match unwrap(value) {
        Variant::Str(s) => Some(s),
        Variant::ObjectPath(p) => Some(p.as_str()),
        _ => None,
    }
}

fn number(value: &Variant<'_>) -> Option<f64> {
    match unwrap(value) {
        Variant::F64(n) => Some(*n),
        Variant::I64(n) => Some(*n as f64),
        Variant::U64(n) => Some(*n as f64),
        Variant::I32(n) => Some(f64::from(*n)),
        Variant::U32(n) => Some(f64::from(*n)),
        _ => None,
    }
}

fn integer(value: &Variant<'_>) -> Option<i64> {
    match unwrap(value) {
        Variant::I64(n) => Some(*n),
        Variant::U64(n) => i64::try_from(*n).ok(),
        Variant::I32(n) => Some(i64::from(*n)),
        Variant::U32(n) => Some(i64::from(*n)),
        // Some players send the length as a double.
        Variant::F64(n) if n.is_finite() => Some(*n as i64),
        _ => None,
    }
}

/// Parses a `Metadata` value (`a{sv}`).
pub fn parse_metadata(value: &Variant<'_>) -> Track {
    let mut track = Track::default();
    let Variant::Dict(dict) = unwrap(value) else {
        return track;
    };
    for (key, value) in dict.iter() {
        let Some(key) = text(key) else { continue };
        match key {
            "xesam:url" => track.url = text(value).map(str::to_string),
            "xesam:title" => track.title = text(value).map(str::to_string),
            "xesam:artist" => {
                track.artists = match unwrap(value) {
                    Variant::Array(list) => list
                        .inner()
                        .iter()
                        .filter_map(|v| text(v).map(str::to_string))
                        .collect(),
                    other => text(other).map(str::to_string).into_iter().collect(),
                }
            }
            "mpris:length" => track.length_us = integer(value),
            "mpris:trackid" => track.trackid = text(value).map(str::to_string),
            _ => {}
        }
    }
    track
}

/// A signal that matters to `handoff player`.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// A player name appeared (`owner` set) or went away (`owner` None).
    Owner { name: String, owner: Option<String> },
    /// A player changed properties; `status` when `PlaybackStatus` was among them.
    Changed {
        sender: String,
        status: Option<Status>,
    },
    /// A player jumped to `position` seconds.
    Seeked { sender: String, position: f64 },
}

impl Signal {
    /// The unique name of the player that sent it (None for name changes).
    pub fn sender(&self) -> Option<&str> {
        match self {
            Self::Owner { .. } => None,
            Self::Changed { sender, .. } | Self::Seeked { sender, .. } => Some(sender),
        }
    }

    fn parse(message: &Message) -> Option<Self> {
        if message.message_type() != MessageType::Signal {
            return None;
        }
        let header = message.header();
        let sender = header.sender().map(|s| s.to_string());
        let member = header.member()?.as_str().to_string();
        let interface = header.interface()?.as_str().to_string();
        let body = message.body();
        match (interface.as_str(), member.as_str()) {
            (DBUS, "NameOwnerChanged") => {
                let (name, _old, new): (String, String, String) = body.deserialize().ok()?;
                let suffix_ok = name.starts_with(PREFIX);
                suffix_ok.then(|| Self::Owner {
                    name,
                    owner: (!new.is_empty()).then_some(new),
                })
            }
            (PROPERTIES, "PropertiesChanged") => {
                let (iface, changed, _invalidated): (
                    String,
                    HashMap<String, OwnedVariant>,
                    Vec<String>,
                ) = body.deserialize().ok()?;
                (iface == PLAYER).then(|| Self::Changed {
                    sender: sender.unwrap_or_default(),
                    status: changed
                        .get("PlaybackStatus")
                        .and_then(|v| text(v))
                        .and_then(Status::parse),
                })
            }
            (PLAYER, "Seeked") => {
                let (us,): (i64,) = body.deserialize().ok()?;
                Some(Self::Seeked {
                    sender: sender.unwrap_or_default(),
                    position: us as f64 / 1e6,
                })
            }
            _ => None,
        }
    }
}

/// A stream of [`Signal`]s.
pub type Signals = Pin<Box<dyn Stream<Item = Signal> + Send>>;

/// A connection to the session bus (or another bus by address) and the MPRIS calls made on it.
#[derive(Clone, Debug)]
pub struct Bus {
    conn: Connection,
}

impl Bus {
    /// Connects to the bus at `address`, or to the user's session bus
    /// (`DBUS_SESSION_BUS_ADDRESS`, else `$XDG_RUNTIME_DIR/bus`).
    pub async fn connect(address: Option<&str>) -> zbus::Result<Self> {
        let builder = match address {
            Some(address) => zbus::connection::Builder::address(address),
            None => zbus::connection::Builder::session(),
        };
        Ok(Self {
            conn: builder.build().await?,
        })
    }

    /// Every MPRIS player on the bus: its well-known name and its owner's unique name.
    pub async fn players(&self) -> zbus::Result<Vec<(String, String)>> {
        let reply = self
            .conn
            .call_method(
                Some(DBUS),
                "/org/freedesktop/DBus",
                Some(DBUS),
                "ListNames",
                &(),
            )
            .await?;
        let names: Vec<String> = reply.body().deserialize()?;
        let mut players = Vec::new();
        for name in names.into_iter().filter(|n| n.starts_with(PREFIX)) {
            // The name may have gone since the list was made.
            if let Ok(owner) = self.owner(&name).await {
                players.push((name, owner));
            }
        }
        players.sort();
        Ok(players)
    }

    async fn owner(&self, name: &str) -> zbus::Result<String> {
        let reply = self
            .conn
            .call_method(
                Some(DBUS),
                "/org/freedesktop/DBus",
                Some(DBUS),
                "GetNameOwner",
                &(name,),
            )
            .await?;
        reply.body().deserialize()
    }

    /// The player's state.
    pub async fn state(&self, name: &str) -> zbus::Result<PlayerState> {
        let reply = self
            .conn
            .call_method(Some(name), PATH, Some(PROPERTIES), "GetAll", &(PLAYER,))
            .await?;
        let props: HashMap<String, OwnedVariant> = reply.body().deserialize()?;
        Ok(PlayerState::from_properties(&props))
    }

    /// The player's position in seconds (`Position`, which players do not signal).
    pub async fn position(&self, name: &str) -> zbus::Result<Option<f64>> {
        let reply = self
            .conn
            .call_method(
                Some(name),
                PATH,
                Some(PROPERTIES),
                "Get",
                &(PLAYER, "Position"),
            )
            .await?;
        let value: OwnedVariant = reply.body().deserialize()?;
        Ok(integer(&value)
            .map(|us| us as f64 / 1e6)
            .filter(|p| *p >= 0.0))
    }

    async fn player_call<B>(&self, name: &str, method: &str, body: &B) -> zbus::Result<()>
    where
        B: serde::Serialize + zbus::Type,
    {
        self.conn
            .call_method(Some(name), PATH, Some(PLAYER), method, body)
            .await
            .map(drop)
    }

    /// `OpenUri`.
    pub async fn open_uri(&self, name: &str, uri: &str) -> zbus::Result<()> {
        self.player_call(name, "OpenUri", &(uri,)).await
    }

    /// `SetPosition` of track `trackid` to `position` seconds.
    pub async fn set_position(&self, name: &str, trackid: &str, position: f64) -> zbus::Result<()> {
        let path = zbus::ObjectPath::try_from(trackid)?;
        let us = (position * 1e6).round() as i64;
        self.player_call(name, "SetPosition", &(path, us)).await
    }

    /// `Play`.
    pub async fn play(&self, name: &str) -> zbus::Result<()> {
        self.player_call(name, "Play", &()).await
    }

    /// `Pause`.
    pub async fn pause(&self, name: &str) -> zbus::Result<()> {
        self.player_call(name, "Pause", &()).await
    }

    /// Name changes of MPRIS players, and property changes and seeks of `sender` (a unique
    /// name), or of every player when `sender` is None. Subscribe before making the calls whose
    /// effects you wait for.
    pub async fn signals(&self, sender: Option<&str>) -> zbus::Result<Signals> {
        let owners = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(DBUS)
            .interface(DBUS)
            .member("NameOwnerChanged")
            .arg0ns("org.mpris.MediaPlayer2")
            .build()?;
        let mut changed = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .interface(PROPERTIES)
            .member("PropertiesChanged")
            .path(PATH);
        let mut seeked = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .interface(PLAYER)
            .member("Seeked")
            .path(PATH);
        if let Some(sender) = sender {
            changed = changed.sender(sender);
            seeked = seeked.sender(sender);
        }
        let queue = NonZeroUsize::new(QUEUE);
        let mut streams = Vec::new();
        for rule in [owners, changed.build()?, seeked.build()?] {
            streams.push(MessageStream::for_match_rule(rule, &self.conn, queue).await?);
        }
        // The stream ends when the connection does; errors inside it are skipped.
        let merged = futures_util::stream::select_all(streams)
            .filter_map(|message| async move { message.ok().and_then(|m| Signal::parse(&m)) });
        Ok(Box::pin(merged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::{Dict, ObjectPath, Signature};

    fn pats(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_match_names_and_instances() {
        assert!(matches(&pats(&["*"]), "mpv"));
        assert!(matches(&pats(&["mpv"]), "mpv"));
        assert!(matches(&pats(&["mpv"]), "mpv.instance-ab12"));
        assert!(matches(&pats(&["vlc"]), "vlc.instance7389"));
        assert!(!matches(&pats(&["mpv"]), "mpvx"));
        assert!(!matches(&pats(&["vlc"]), "mpv"));
        assert!(matches(&pats(&["vlc", "fire*"]), "firefox.instance_1_23"));
        assert!(matches(&pats(&["*.instance*"]), "chromium.instance42"));
        assert!(!matches(&pats(&[]), "mpv"));
    }

    fn dict(entries: Vec<(&str, Variant<'static>)>) -> Variant<'static> {
        let mut d = Dict::new(&Signature::Str, &Signature::Variant);
        for (k, v) in entries {
            d.append(Variant::from(k.to_string()), Variant::Variant(Box::new(v)))
                .unwrap();
        }
        Variant::Dict(d)
    }

    #[test]
    fn metadata_is_read_from_what_players_send() {
        let artists = Variant::from(vec!["Blender".to_string(), "Sacha".to_string()]);
        let metadata = dict(vec![
            (
                "xesam:url",
                Variant::from("http://127.0.0.1:8000/a.wav".to_string()),
            ),
            ("xesam:title", Variant::from("Big Buck Bunny".to_string())),
            ("xesam:artist", artists),
            ("mpris:length", Variant::I64(120_000_000)),
            (
                "mpris:trackid",
                Variant::ObjectPath(ObjectPath::try_from("/0").unwrap()),
            ),
            ("xesam:album", Variant::U32(7)),
        ]);
        let track = parse_metadata(&metadata);
        assert_eq!(track.url.as_deref(), Some("http://127.0.0.1:8000/a.wav"));
        assert_eq!(track.title.as_deref(), Some("Big Buck Bunny"));
        assert_eq!(track.artists, ["Blender", "Sacha"]);
        assert_eq!(track.length(), Some(120.0));
        assert_eq!(track.trackid.as_deref(), Some("/0"));

        // A failed load in VLC: the url with length -1; a single artist string; u64 length.
        let track = parse_metadata(&dict(vec![
            ("xesam:url", Variant::from("http://x/y".to_string())),
            ("mpris:length", Variant::I64(-1)),
            ("xesam:artist", Variant::from("One".to_string())),
        ]));
        assert_eq!(track.length_us, Some(-1));
        assert_eq!(track.length(), None);
        assert_eq!(track.artists, ["One"]);
        assert_eq!(
            parse_metadata(&dict(vec![("mpris:length", Variant::U64(5_000_000))])).length(),
            Some(5.0)
        );
        // Not a dictionary at all: no track.
        assert_eq!(parse_metadata(&Variant::I32(3)), Track::default());
    }

    #[test]
    fn state_defaults_when_properties_are_missing_or_odd() {
        let mut props = HashMap::new();
        props.insert(
            "PlaybackStatus".to_string(),
            OwnedVariant::try_from(Variant::from("Paused".to_string())).unwrap(),
        );
        props.insert(
            "Rate".to_string(),
            OwnedVariant::try_from(Variant::F64(f64::NAN)).unwrap(),
        );
        let state = PlayerState::from_properties(&props);
        assert_eq!(state.status, Status::Paused);
        assert_eq!(state.rate, 1.0);
        assert_eq!(state.track, Track::default());
        let state = PlayerState::from_properties(&HashMap::new());
        assert_eq!(state.status, Status::Stopped);
    }
}
