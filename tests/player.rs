//! `handoff player` with real media players: mpv with the mpv-mpris plugin, headless
//! (`--no-video --ao=null`), each terminal on its own private D-Bus bus (a `dbus-daemon` the test
//! starts with its own config: no service activation, never the host's session bus), a media
//! file the test makes (a WAV) served by an HTTP server in the test on 127.0.0.1, and real
//! daemons and a content server in process on loopback (no mDNS: peers are introduced by hand).
//!
//! Positions are compared with positions (the player's own `Seeked` and `Position`), never with
//! wall-clock time. Without mpv, mpv-mpris or dbus-daemon the tests say SKIPPED, except under
//! `CI=true`, where that is a failure (`.ci/run` installs them).

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use handoff::config::PlayerConfig;
use handoff::daemon::Daemon;
use handoff::player::mpris::{Bus, Status};
use handoff::player::{Player, PlayerEvent, PlayerOptions, Refusal};
use handoff::wire::Session;
use support::inproc::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

/// Generous: a loaded 2-core machine may take a while to start mpv and load a file.
const LONG: Duration = Duration::from_secs(30);

/// Where Debian's mpv-mpris puts the plugin (the first is what mpv loads by itself).
const MPRIS_PLUGINS: [&str; 2] = ["/etc/mpv/scripts/mpris.so", "/usr/lib/mpv-mpris/mpris.so"];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The mpris plugin, if mpv, the plugin and dbus-daemon are all installed. Otherwise the test
/// is skipped with a message, or fails under `CI=true`.
fn require_players(test: &str) -> Option<PathBuf> {
    let plugin = MPRIS_PLUGINS.iter().map(PathBuf::from).find(|p| p.exists());
    let missing: Vec<&str> = [
        ("mpv", on_path("mpv")),
        ("mpv-mpris", plugin.is_some()),
        ("dbus-daemon", on_path("dbus-daemon")),
    ]
    .into_iter()
    .filter(|(_, found)| !found)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return plugin;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs {missing:?} (apt-get install mpv mpv-mpris dbus-daemon), and CI=true forbids skipping it");
    }
    eprintln!("SKIPPED {test}: needs {missing:?} (apt-get install mpv mpv-mpris dbus-daemon)");
    None
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private session bus for one terminal.
struct PrivateBus {
    address: String,
    _daemon: Proc,
}

impl PrivateBus {
    fn start(dir: &Path, name: &str) -> Self {
        let socket = dir.join(format!("{name}-bus"));
        let config = dir.join(format!("{name}-bus.conf"));
        // A session bus with no service activation, reachable by every local user (so a player
        // running as another user could join it).
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // It says it cannot raise its fd limit when not run as root: not a problem here.
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        let stdout = child.stdout.take().unwrap();
        let daemon = Proc(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:"), "dbus-daemon printed {line:?}");
        Self {
            address,
            _daemon: daemon,
        }
    }
}

/// mpv, headless, with the MPRIS plugin, on `bus`.
struct Mpv {
    log: PathBuf,
    _proc: Proc,
}

impl Mpv {
    fn start(plugin: &Path, bus: &PrivateBus, dir: &Path, name: &str, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("mpv")
            .args([
                "--no-config",
                &format!("--script={}", plugin.display()),
                "--no-video",
                "--vo=null",
                "--ao=null",
                "--idle=yes",
                "--ytdl=no",
                "--no-terminal",
                &format!("--log-file={}", log.display()),
            ])
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mpv");
        Self {
            log,
            _proc: Proc(child),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(self) {}
}

/// Waits until `check` returns Some, polling every 50 ms, for at most [`LONG`].
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    tokio::time::timeout(LONG, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The name of the one MPRIS player on `bus`, once it is there.
async fn player_name(bus: &Bus) -> String {
    eventually("an MPRIS player on the bus", || async {
        bus.players().await.ok()?.into_iter().next().map(|(n, _)| n)
    })
    .await
}

/// A WAV file of `secs` seconds of silence (8 kHz, mono, 8 bit) titled `title`.
fn wav(secs: u32, title: &str) -> Vec<u8> {
    let rate = 8000u32;
    let samples = rate * secs;
    let mut name = title.as_bytes().to_vec();
    name.push(0);
    if name.len() % 2 == 1 {
        name.push(0);
    }
    let info_len = 4 + 8 + name.len() as u32;
    let riff_len = 4 + (8 + 16) + (8 + info_len) + (8 + samples);
    let mut out = Vec::with_capacity(riff_len as usize + 8);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&riff_len.to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes()); // bytes per second
    out.extend_from_slice(&1u16.to_le_bytes()); // block align
    out.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"LIST");
    out.extend_from_slice(&info_len.to_le_bytes());
    out.extend_from_slice(b"INFOINAM");
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&name);
    out.extend_from_slice(b"data");
    out.extend_from_slice(&samples.to_le_bytes());
    out.resize(out.len() + samples as usize, 128);
    out
}

/// Serves `files` over HTTP/1.1 on 127.0.0.1 with byte ranges (players seek with them).
async fn media_server(files: Vec<(&'static str, Vec<u8>)>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let files = Arc::new(files);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let files = files.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let Some((_, body)) = files.iter().find(|(name, _)| *name == path) else {
                    let _ = stream
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let range = head.lines().find_map(|l| {
                    let l = l.to_ascii_lowercase();
                    let spec = l.strip_prefix("range: bytes=")?.to_string();
                    let (from, to) = spec.split_once('-')?;
                    let from: usize = from.trim().parse().ok()?;
                    let to: usize = to.trim().parse().unwrap_or(body.len() - 1);
                    (from < body.len()).then_some((from, to.min(body.len() - 1)))
                });
                let (status, from, to) = match range {
                    Some((from, to)) => ("206 Partial Content", from, to),
                    None => ("200 OK", 0, body.len() - 1),
                };
                let mut reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: audio/wav\r\nAccept-Ranges: bytes\r\nContent-Length: {}\r\nConnection: close\r\n",
                    to + 1 - from
                );
                if range.is_some() {
                    reply.push_str(&format!(
                        "Content-Range: bytes {from}-{to}/{}\r\n",
                        body.len()
                    ));
                }
                reply.push_str("\r\n");
                // The player hangs up when it seeks elsewhere.
                if stream.write_all(reply.as_bytes()).await.is_ok() {
                    let _ = stream.write_all(&body[from..=to]).await;
                }
            });
        }
    });
    addr
}

/// A content server, terminal A attached to it and trusting B, B knowing A.
struct Terminals {
    dir: tempfile::TempDir,
    _server: handoff::server::Server,
    a: Daemon,
    b: Daemon,
}

async fn terminals() -> Terminals {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b = start(terminal(dir.path(), "b", None, vec![])).await;
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b.id()])).await;
    introduce(&b, "a", a.id(), a.quic_addr());
    wait_connected(&a).await;
    Terminals {
        dir,
        _server: server,
        a,
        b,
    }
}

impl Terminals {
    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    async fn bridge(&self, name: &str, bus: &PrivateBus, config: PlayerConfig) -> Player {
        Player::start(
            config,
            PlayerOptions {
                bus: Some(bus.address.clone()),
                control_socket: self.socket(name),
            },
        )
        .await
        .unwrap()
    }
}

/// Waits until `bridge`'s sink watches B's pushes.
async fn watching(bridge: &Player) {
    tokio::time::timeout(LONG, bridge.watching())
        .await
        .expect("the bridge watches the daemon's pushes");
}

/// The next sink event, skipping none.
async fn next_event(events: &mut broadcast::Receiver<PlayerEvent>) -> PlayerEvent {
    tokio::time::timeout(LONG, events.recv())
        .await
        .expect("a player event in time")
        .expect("the event stream")
}

fn test_config() -> PlayerConfig {
    PlayerConfig {
        // Quick to share once loaded; the test file's metadata does not change while loading.
        settle: Duration::from_millis(300),
        ..PlayerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_playing_on_a_continues_on_b_at_the_same_second() {
    let Some(plugin) = require_players("a_video_playing_on_a_continues_on_b_at_the_same_second")
    else {
        return;
    };
    let t = terminals().await;
    let http = media_server(vec![("bbb.wav", wav(120, "Big Buck Bunny"))]).await;
    let url = format!("http://{http}/bbb.wav");
    let (bus_a, bus_b) = (
        PrivateBus::start(t.dir.path(), "a"),
        PrivateBus::start(t.dir.path(), "b"),
    );

    // A's mpv has the video open at 20 s (paused, so the position is exact).
    let mpv_a = Mpv::start(
        &plugin,
        &bus_a,
        t.dir.path(),
        "mpv-a",
        &["--pause", "--start=20", &url],
    );
    let mpv_b = Mpv::start(&plugin, &bus_b, t.dir.path(), "mpv-b", &[]);
    let (dbus_a, dbus_b) = (
        Bus::connect(Some(&bus_a.address)).await.unwrap(),
        Bus::connect(Some(&bus_b.address)).await.unwrap(),
    );
    let (name_a, name_b) = (player_name(&dbus_a).await, player_name(&dbus_b).await);

    let bridge_a = t.bridge("a", &bus_a, test_config()).await;
    let bridge_b = t.bridge("b", &bus_b, test_config()).await;
    let mut events = bridge_b.subscribe();

    // A's session shows the url, the title and a position within 2 s of 20.
    let session: Session = eventually("A's session", || async {
        t.a.session().filter(|s| s.uri == url)
    })
    .await;
    assert_eq!(session.title, "Big Buck Bunny");
    let shared = session.position.expect("a position");
    assert!((shared - 20.0).abs() <= 2.0, "A shared position {shared}");
    assert_eq!(
        session.meta.get("length").map(String::as_str),
        Some("120.000")
    );
    assert_eq!(
        session.meta.get("status").map(String::as_str),
        Some("paused")
    );

    watching(&bridge_b).await;
    // B pulls: its mpv opens the url and plays it within 2 s of A's position.
    let pulled = t.b.pull("a", LONG).await.expect("pull");
    assert_eq!(pulled.push.expect("a push").uri, url);
    let opened = next_event(&mut events).await;
    let PlayerEvent::Opened {
        uri,
        player,
        position,
    } = opened
    else {
        panic!("expected Opened, got {opened:?}\n{}", mpv_b.log());
    };
    assert_eq!(
        (uri.as_str(), player.as_str()),
        (url.as_str(), name_b.as_str())
    );
    let at_a = dbus_a
        .position(&name_a)
        .await
        .unwrap()
        .expect("A's position");
    let at_b = position.expect("B seeked");
    assert!((at_b - at_a).abs() <= 2.0, "B at {at_b}, A at {at_a}");
    let state_b = eventually("B playing", || async {
        dbus_b
            .state(&name_b)
            .await
            .ok()
            .filter(|s| s.status == Status::Playing)
    })
    .await;
    assert_eq!(state_b.track.url.as_deref(), Some(url.as_str()));
    // ... and really plays: its position moves on from where it seeked.
    eventually("B's position moving on", || async {
        let now = dbus_b.position(&name_b).await.ok().flatten()?;
        (now > at_b + 0.5).then_some(())
    })
    .await;

    // A seeks to 40 s: B follows, within 2 s of 40.
    let trackid = dbus_a.state(&name_a).await.unwrap().track.trackid.unwrap();
    dbus_a.set_position(&name_a, &trackid, 40.0).await.unwrap();
    let followed = next_event(&mut events).await;
    let PlayerEvent::Followed { position, .. } = followed else {
        panic!("expected Followed, got {followed:?}");
    };
    let at_b = position.expect("B seeked");
    assert!((at_b - 40.0).abs() <= 2.0, "B followed to {at_b}");

    // A's player quits: A's session clears.
    mpv_a.kill();
    eventually("A's session cleared", || async {
        t.a.session().is_none().then_some(())
    })
    .await;
    // B's player goes on playing what it opened.
    assert_eq!(
        dbus_b.state(&name_b).await.unwrap().track.url.as_deref(),
        Some(url.as_str())
    );

    bridge_a.shutdown().await;
    bridge_b.shutdown().await;
    drop(mpv_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_with_a_forbidden_scheme_or_a_leading_dash_never_reach_the_player() {
    let Some(plugin) =
        require_players("pushes_with_a_forbidden_scheme_or_a_leading_dash_never_reach_the_player")
    else {
        return;
    };
    let t = terminals().await;
    let http = media_server(vec![("ok.wav", wav(60, "OK"))]).await;
    let good = format!("http://{http}/ok.wav");
    let bus_b = PrivateBus::start(t.dir.path(), "b");
    let mpv_b = Mpv::start(&plugin, &bus_b, t.dir.path(), "mpv-b", &[]);
    let dbus_b = Bus::connect(Some(&bus_b.address)).await.unwrap();
    let name_b = player_name(&dbus_b).await;
    let bridge_b = t.bridge("b", &bus_b, test_config()).await;
    let mut events = bridge_b.subscribe();

    let show = |uri: &str| Session {
        uri: uri.to_string(),
        title: "t".into(),
        position: Some(5.0),
        meta: Default::default(),
    };
    let evil = evil_script(t.dir.path());
    let bad = [
        (
            "file:///etc/passwd".to_string(),
            Refusal::Scheme("file".into()),
        ),
        (format!("--script={evil}"), Refusal::LeadingDash),
        (
            "javascript:alert(1)".to_string(),
            Refusal::Scheme("javascript".into()),
        ),
        (format!("-{good}"), Refusal::LeadingDash),
    ];
    assert!(t.a.set_session(Some(show(&bad[0].0)), LONG).await);
    watching(&bridge_b).await;
    t.b.pull("a", LONG).await.expect("pull");
    for (i, (uri, reason)) in bad.iter().enumerate() {
        if i > 0 {
            assert!(t.a.set_session(Some(show(uri)), LONG).await);
        }
        let event = next_event(&mut events).await;
        assert_eq!(
            event,
            PlayerEvent::Refused {
                uri: uri.clone(),
                reason: reason.clone()
            }
        );
    }
    // A good one after them is opened, so the bad ones were handled, not lost.
    assert!(t.a.set_session(Some(show(&good)), LONG).await);
    let event = next_event(&mut events).await;
    assert!(
        matches!(&event, PlayerEvent::Opened { uri, .. } if *uri == good),
        "{event:?}\n{}",
        mpv_b.log()
    );
    assert_eq!(
        dbus_b.state(&name_b).await.unwrap().track.url.as_deref(),
        Some(good.as_str())
    );
    let log = mpv_b.log();
    for needle in ["/etc/passwd", "javascript:", evil.as_str()] {
        assert!(!log.contains(needle), "mpv was given {needle}:\n{log}");
    }
    assert!(
        log.contains("ok.wav"),
        "the log shows what mpv opened:\n{log}"
    );
    bridge_b.shutdown().await;
}

/// A path whose appearance in mpv's log would show a `--script=` push got through.
fn evil_script(dir: &Path) -> String {
    dir.join("evil-script.lua").display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_playing_something_else_is_taken_over_only_with_replace_playing() {
    let Some(plugin) =
        require_players("a_player_playing_something_else_is_taken_over_only_with_replace_playing")
    else {
        return;
    };
    let t = terminals().await;
    let http = media_server(vec![
        ("shown.wav", wav(60, "Shown")),
        ("mine.wav", wav(60, "Mine")),
    ])
    .await;
    let (shown, mine) = (
        format!("http://{http}/shown.wav"),
        format!("http://{http}/mine.wav"),
    );
    let bus_b = PrivateBus::start(t.dir.path(), "b");
    // B's user is playing something of their own.
    let mpv_b = Mpv::start(&plugin, &bus_b, t.dir.path(), "mpv-b", &[&mine]);
    let dbus_b = Bus::connect(Some(&bus_b.address)).await.unwrap();
    let name_b = player_name(&dbus_b).await;
    eventually("B's own playback", || async {
        dbus_b.state(&name_b).await.ok().filter(|s| {
            s.status == Status::Playing && s.track.url.as_deref() == Some(mine.as_str())
        })
    })
    .await;

    let session = |position: f64| Session {
        uri: shown.clone(),
        title: "Shown".into(),
        position: Some(position),
        meta: Default::default(),
    };
    assert!(t.a.set_session(Some(session(10.0)), LONG).await);
    let bridge = t.bridge("b", &bus_b, test_config()).await;
    let mut events = bridge.subscribe();
    watching(&bridge).await;
    t.b.pull("a", LONG).await.expect("pull");
    let event = next_event(&mut events).await;
    assert_eq!(
        event,
        PlayerEvent::Refused {
            uri: shown.clone(),
            reason: Refusal::PlayingSomethingElse {
                player: name_b.clone(),
                playing: Some(mine.clone())
            }
        }
    );
    let state = dbus_b.state(&name_b).await.unwrap();
    assert_eq!(state.track.url.as_deref(), Some(mine.as_str()));
    assert_eq!(state.status, Status::Playing);
    bridge.shutdown().await;

    // With replace_playing, a bridge started while B follows A takes the player over with A's
    // session (the push it catches up on), and follows A's next jump.
    let bridge = t
        .bridge(
            "b",
            &bus_b,
            PlayerConfig {
                replace_playing: true,
                ..test_config()
            },
        )
        .await;
    let mut events = bridge.subscribe();
    watching(&bridge).await;
    eventually("B's player taken over", || async {
        dbus_b
            .state(&name_b)
            .await
            .ok()
            .filter(|s| s.track.url.as_deref() == Some(shown.as_str()))
    })
    .await;
    assert!(t.a.set_session(Some(session(30.0)), LONG).await);
    // The catch-up's Opened (at 10) may come first, if it came after subscribing.
    let position = loop {
        match next_event(&mut events).await {
            PlayerEvent::Opened { uri, position, .. } if position.is_some_and(|p| p < 20.0) => {
                assert_eq!(uri, shown);
            }
            PlayerEvent::Opened { uri, position, .. }
            | PlayerEvent::Followed { uri, position, .. } => {
                assert_eq!(uri, shown);
                break position.expect("seeked");
            }
            event => panic!(
                "expected Opened or Followed, got {event:?}\n{}",
                mpv_b.log()
            ),
        }
    };
    assert!((position - 30.0).abs() <= 2.0, "moved to {position}");
    assert_eq!(
        dbus_b.state(&name_b).await.unwrap().track.url.as_deref(),
        Some(shown.as_str())
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_player_running_the_configured_command_starts_one() {
    let Some(plugin) = require_players("with_no_player_running_the_configured_command_starts_one")
    else {
        return;
    };
    let t = terminals().await;
    let http = media_server(vec![("started.wav", wav(60, "Started"))]).await;
    let url = format!("http://{http}/started.wav");
    let bus_b = PrivateBus::start(t.dir.path(), "b");
    let dbus_b = Bus::connect(Some(&bus_b.address)).await.unwrap();
    // The command records its pid, so the test can stop the player it starts.
    let pid_file = t.dir.path().join("started.pid");
    let log = t.dir.path().join("mpv-started.log");
    let script = format!(
        "echo $$ > {}; exec mpv --no-config --script={} --no-video --vo=null --ao=null --idle=yes --ytdl=no --no-terminal --log-file={}",
        pid_file.display(),
        plugin.display(),
        log.display()
    );
    let config = PlayerConfig {
        command: vec!["sh".into(), "-c".into(), script],
        ..test_config()
    };
    let bridge = t.bridge("b", &bus_b, config).await;
    let mut events = bridge.subscribe();
    watching(&bridge).await;
    let session = Session {
        uri: url.clone(),
        title: "Started".into(),
        position: Some(12.0),
        meta: Default::default(),
    };
    assert!(t.a.set_session(Some(session), LONG).await);
    t.b.pull("a", LONG).await.expect("pull");
    let event = next_event(&mut events).await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .expect("the command ran");
    let stop = Stop(pid);
    // Its output goes nowhere (a playing mpv's status line would fill the bridge's journal).
    for fd in [0, 1, 2] {
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok(),
            Some(PathBuf::from("/dev/null")),
            "the started player's fd {fd}"
        );
    }
    let PlayerEvent::Opened {
        uri,
        player,
        position,
    } = &event
    else {
        panic!(
            "expected Opened, got {event:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    assert_eq!(uri, &url);
    let position = position.expect("seeked");
    assert!((position - 12.0).abs() <= 2.0, "opened at {position}");
    assert_eq!(
        dbus_b.state(player).await.unwrap().track.url.as_deref(),
        Some(url.as_str())
    );
    bridge.shutdown().await;
    drop(stop);
}

/// The daemon and the bridge start together (at login, or the daemon restarts): a followed
/// terminal's session pushed before the bridge watched still opens once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_came_before_the_bridge_watched_opens_when_it_starts() {
    let Some(plugin) =
        require_players("a_push_that_came_before_the_bridge_watched_opens_when_it_starts")
    else {
        return;
    };
    let t = terminals().await;
    let http = media_server(vec![("early.wav", wav(120, "Early"))]).await;
    let url = format!("http://{http}/early.wav");
    let bus_b = PrivateBus::start(t.dir.path(), "b");
    let mpv_b = Mpv::start(&plugin, &bus_b, t.dir.path(), "mpv-b", &[]);
    let dbus_b = Bus::connect(Some(&bus_b.address)).await.unwrap();
    let name_b = player_name(&dbus_b).await;

    // B follows A and gets its session while no bridge runs on B.
    let session = Session {
        uri: url.clone(),
        title: "Early".into(),
        position: Some(20.0),
        meta: [("status".to_string(), "paused".to_string())].into(),
    };
    assert!(t.a.set_session(Some(session), LONG).await);
    let pulled = t.b.pull("a", LONG).await.expect("pull");
    assert_eq!(pulled.push.expect("a push").uri, url);

    // Then B's bridge starts: B's mpv opens the url at A's position and plays.
    let bridge_b = t.bridge("b", &bus_b, test_config()).await;
    let state = eventually("B's mpv playing the pushed url", || async {
        dbus_b
            .state(&name_b)
            .await
            .ok()
            .filter(|s| s.status == Status::Playing && s.track.url.as_deref() == Some(&url))
    })
    .await;
    assert_eq!(state.track.url.as_deref(), Some(url.as_str()));
    let at_b = dbus_b
        .position(&name_b)
        .await
        .unwrap()
        .expect("B's position");
    assert!(
        at_b >= 18.0,
        "B opened at {at_b}, A is at 20\n{}",
        mpv_b.log()
    );
    bridge_b.shutdown().await;
}

/// The catch-up asks the followed terminal for its session as it is now: one it cleared after
/// pushing (its player quit), still the newest in B's inbox, is not opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cleared_before_the_bridge_started_is_not_opened() {
    let Some(plugin) = require_players("a_session_cleared_before_the_bridge_started_is_not_opened")
    else {
        return;
    };
    let t = terminals().await;
    let http = media_server(vec![
        ("old.wav", wav(60, "Old")),
        ("new.wav", wav(60, "New")),
    ])
    .await;
    let (old, new) = (
        format!("http://{http}/old.wav"),
        format!("http://{http}/new.wav"),
    );
    let bus_b = PrivateBus::start(t.dir.path(), "b");
    let mpv_b = Mpv::start(&plugin, &bus_b, t.dir.path(), "mpv-b", &[]);
    let dbus_b = Bus::connect(Some(&bus_b.address)).await.unwrap();
    player_name(&dbus_b).await;
    let session = |uri: &str| Session {
        uri: uri.to_string(),
        title: "Shown".into(),
        position: Some(10.0),
        meta: Default::default(),
    };
    // B follows A and gets "old"; then A's session is cleared (no push for that).
    assert!(t.a.set_session(Some(session(&old)), LONG).await);
    let pulled = t.b.pull("a", LONG).await.expect("pull");
    assert_eq!(pulled.push.expect("a push").uri, old);
    assert!(t.a.set_session(None, LONG).await);

    let bridge = t.bridge("b", &bus_b, test_config()).await;
    let mut events = bridge.subscribe();
    watching(&bridge).await;
    assert!(t.a.set_session(Some(session(&new)), LONG).await);
    // The first thing B's bridge opens is A's new session, never the cleared one.
    let event = next_event(&mut events).await;
    let PlayerEvent::Opened { uri, .. } = &event else {
        panic!("expected Opened, got {event:?}\n{}", mpv_b.log());
    };
    assert_eq!(uri, &new);
    bridge.shutdown().await;
}

/// Kills a process the test did not spawn itself (by pid) on drop.
struct Stop(i32);

impl Drop for Stop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is a player this test started.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// A network namespace holding only `lo`, removed on drop.
struct LoopbackNs(String);

impl LoopbackNs {
    fn new(tag: &str) -> Self {
        let name = format!("ho{}{tag}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {:?}", out);
        };
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace; threads and processes it starts are inside
    /// too.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the test inside the namespace")
    }
}

impl Drop for LoopbackNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// VLC, which refuses to run as root, as `nobody`, through `setpriv` (which execs it, so the pid
/// is VLC's), with its MPRIS interface on `bus`.
fn start_vlc(bus: &PrivateBus, home: &Path, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "cvlc",
            "--control=dbus",
            "--aout=dummy",
            "--vout=dummy",
            "--no-video",
            "--no-lua",
            "--no-metadata-network-access",
            "--no-auto-preparse",
        ])
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start vlc");
    Proc(child)
}

#[test]
fn a_push_opens_in_vlc_at_the_pushed_position_and_follows_a_seek() {
    let test = "a_push_opens_in_vlc_at_the_pushed_position_and_follows_a_seek";
    if !support::require_root(test) {
        return;
    }
    let missing: Vec<&str> = ["cvlc", "setpriv", "dbus-daemon"]
        .into_iter()
        .filter(|p| !on_path(p))
        .collect();
    if !missing.is_empty() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test} needs {missing:?} (apt-get install vlc-bin vlc-plugin-base dbus-daemon), and CI=true forbids skipping it");
        }
        eprintln!("SKIPPED {test}: needs {missing:?} (apt-get install vlc-bin vlc-plugin-base dbus-daemon)");
        return;
    }
    // VLC may look for things on the network by itself: it runs where only loopback exists.
    let ns = LoopbackNs::new("vlc");
    ns.run(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(vlc_body())
    });
}

async fn vlc_body() {
    let t = terminals().await;
    let http = media_server(vec![("vlc.wav", wav(120, "For VLC"))]).await;
    let url = format!("http://{http}/vlc.wav");
    // VLC runs as nobody: its bus socket and home are in a directory it can reach.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        shared.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let home = shared.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let bus_b = PrivateBus::start(shared.path(), "b");
    let vlc_log = t.dir.path().join("vlc.log");
    let _vlc = start_vlc(&bus_b, &home, &vlc_log);
    let dbus_b = Bus::connect(Some(&bus_b.address)).await.unwrap();
    let name = player_name(&dbus_b).await;
    assert!(name.contains("vlc"), "{name}");

    let bridge = t.bridge("b", &bus_b, test_config()).await;
    let mut events = bridge.subscribe();
    watching(&bridge).await;
    let session = |position: f64| Session {
        uri: url.clone(),
        title: "For VLC".into(),
        position: Some(position),
        meta: [("status".to_string(), "paused".to_string())].into(),
    };
    assert!(t.a.set_session(Some(session(30.0)), LONG).await);
    t.b.pull("a", LONG).await.expect("pull");
    let event = next_event(&mut events).await;
    let vlc_says = || std::fs::read_to_string(&vlc_log).unwrap_or_default();
    let PlayerEvent::Opened { uri, position, .. } = &event else {
        panic!("expected Opened, got {event:?}\n{}", vlc_says());
    };
    assert_eq!(uri, &url);
    let position = position.expect("VLC seeked");
    assert!((position - 30.0).abs() <= 2.0, "VLC opened at {position}");
    let state = dbus_b.state(&name).await.unwrap();
    assert_eq!(state.track.url.as_deref(), Some(url.as_str()));

    // A jumps to 70 s: VLC follows.
    assert!(t.a.set_session(Some(session(70.0)), LONG).await);
    let event = next_event(&mut events).await;
    let PlayerEvent::Followed { position, .. } = &event else {
        panic!("expected Followed, got {event:?}\n{}", vlc_says());
    };
    let position = position.expect("VLC seeked");
    assert!((position - 70.0).abs() <= 2.0, "VLC followed to {position}");
    bridge.shutdown().await;
}

#[test]
fn a_bad_player_key_exits_78_naming_it_and_a_missing_bus_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(&config, "[player]\ntolerance_secs = 0\n").unwrap();
    let out = Command::new(support::BIN)
        .args(["player", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.starts_with("error:") && err.contains("player.tolerance_secs"),
        "{err}"
    );

    let out = Command::new(support::BIN)
        .args(["player", "--socket", "/nonexistent/handoff.sock"])
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            format!("unix:path={}", dir.path().join("no-bus").display()),
        )
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: cannot connect to the D-Bus session bus"),
        "{err}"
    );
}

/// Issue 12.10 for `handoff player`: the environment is a default, not a flag. A typed
/// `--config` names the daemon (its `control_socket`) although `HANDOFF_SOCKET` names another
/// socket; with no flag `HANDOFF_SOCKET` wins over `HANDOFF_CONFIG`'s socket, and
/// `HANDOFF_CONFIG` alone is used. Which socket the bridge dials is seen by listening on both.
#[test]
fn a_typed_config_wins_over_handoff_socket_in_the_environment_for_the_player() {
    use std::os::unix::net::UnixListener;
    let test = "a_typed_config_wins_over_handoff_socket_in_the_environment_for_the_player";
    if require_players(test).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bus = PrivateBus::start(dir.path(), "p");
    let configured = dir.path().join("configured.sock");
    let from_env = dir.path().join("from-env.sock");
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!("control_socket = \"{}\"\n", configured.display()),
    )
    .unwrap();
    let listen = |path: &Path| {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    };
    let (configured_l, from_env_l) = (listen(&configured), listen(&from_env));
    // Runs the bridge with `args` and `env` until it dials one of the two sockets: which one.
    let dialled = |args: &[&str], env: &[(&str, &Path)]| -> &'static str {
        let mut command = Command::new(support::BIN);
        command
            .arg("player")
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env_remove("HANDOFF_SOCKET")
            .env_remove("HANDOFF_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let bridge = Proc(command.spawn().expect("start handoff player"));
        let which = support::wait_for(LONG, || {
            if configured_l.accept().is_ok() {
                Some("configured")
            } else if from_env_l.accept().is_ok() {
                Some("from-env")
            } else {
                None
            }
        })
        .expect("the bridge dialled neither socket");
        drop(bridge);
        // Whatever else it dialled before it was stopped is not this case's answer.
        while configured_l.accept().is_ok() || from_env_l.accept().is_ok() {}
        which
    };
    let config = config.as_path();
    assert_eq!(
        dialled(
            &["--config", config.to_str().unwrap()],
            &[("HANDOFF_SOCKET", &from_env)]
        ),
        "configured",
        "HANDOFF_SOCKET in the environment beat a typed --config"
    );
    assert_eq!(
        dialled(
            &[],
            &[("HANDOFF_CONFIG", config), ("HANDOFF_SOCKET", &from_env)]
        ),
        "from-env"
    );
    assert_eq!(dialled(&[], &[("HANDOFF_CONFIG", config)]), "configured");
    assert_eq!(
        dialled(
            &["--socket", from_env.to_str().unwrap()],
            &[("HANDOFF_CONFIG", config)]
        ),
        "from-env"
    );
}
