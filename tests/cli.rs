//! The command-line contract (DESIGN §8): `id`, `config check`, exit codes and error lines, help
//! and the man page, and the CLI against daemons run in process on loopback (no mDNS).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use support::inproc::*;
use support::{handoff, BIN};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn id_is_stable_base32() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = support::id_of(&state);
    assert_eq!(first.len(), 52);
    assert!(
        first
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)),
        "{first}"
    );
    assert_eq!(support::id_of(&state), first);
    let key = std::fs::metadata(state.join("identity.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
}

/// The shipped configs pass `config check`. daemon.toml names the control socket's group
/// `handoff`, which the package creates: where this machine has no such group the check says
/// so by key, and the file is checked with this process's own group instead.
#[test]
fn shipped_configs_check_ok() {
    let root = env!("CARGO_MANIFEST_DIR");
    // The server's token as systemd would pass it (`LoadCredential=publish.token:...`).
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("publish.token"), "t0ken\n").unwrap();
    let daemon = format!("{root}/config/daemon.toml");
    let text = std::fs::read_to_string(&daemon).unwrap();
    let line = "\ngroup = \"handoff\"\n";
    assert_eq!(
        text.matches(line).count(),
        1,
        "daemon.toml names group handoff"
    );
    let daemon = if handoff::accounts::group_id("handoff").is_some() {
        daemon
    } else {
        let out = handoff(&["config", "check", "--config", &daemon]);
        assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("control.group") && stderr(&out).contains("\"handoff\""),
            "{}",
            stderr(&out)
        );
        // SAFETY: getegid has no preconditions.
        let mine = handoff::accounts::group_name(unsafe { libc::getegid() }).unwrap();
        let copy = credentials.path().join("daemon.toml");
        std::fs::write(
            &copy,
            text.replace(line, &format!("\ngroup = \"{mine}\"\n")),
        )
        .unwrap();
        copy.to_str().unwrap().to_string()
    };
    let server = format!("{root}/config/server.toml");
    for (file, kind) in [(daemon, "daemon"), (server, "server")] {
        let out = std::process::Command::new(BIN)
            .args(["config", "check", "--config", &file])
            .env("CREDENTIALS_DIRECTORY", credentials.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(kind));
    }
}

#[test]
fn bad_configs_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown.toml", "name = \"x\"\ncolour = \"red\"\n", "colour"),
        (
            "nested.toml",
            "[trust]\naccept = \"trusted\"\npeerz = []\n",
            "peerz",
        ),
        (
            "value.toml",
            "[quic]\nlisten = \"not an address\"\n",
            "quic.listen",
        ),
        (
            "policy.toml",
            "[trust]\naccept = \"everyone\"\n",
            "trust.accept",
        ),
        ("server.toml", "[store]\nkind = \"tape\"\n", "store.kind"),
        ("syntax.toml", "name = \n", "test"),
    ];
    for (file, text, key) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let out = handoff(&["config", "check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{file}");
        let err = stderr(&out);
        assert!(err.starts_with("error:"), "{err}");
        if key != "test" {
            assert!(err.contains(key), "{file}: {err}");
        }
        // TOML's own errors keep their lines, with `^` under the mistake.
        if ["unknown.toml", "nested.toml", "syntax.toml"].contains(&file) {
            assert!(err.lines().count() > 2, "{file}: {err}");
            assert!(err.lines().any(|l| l.trim_end().ends_with('^')), "{err}");
        } else {
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }
}

/// `config check` checks what the config names too, tells a server's file from a daemon's by
/// the keys only one of them has (or takes `--kind`), and refuses a log level that would
/// silence the log.
#[test]
fn config_check_finds_file_problems_and_the_kind() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str, kind: Option<&str>| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, text).unwrap();
        let mut args = vec!["config", "check", "--config", path.to_str().unwrap()];
        if let Some(kind) = kind {
            args.extend(["--kind", kind]);
        }
        handoff(&args)
    };
    let token = dir.path().join("publish.token");
    let server = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    // Missing, empty, readable by others: 78, naming the key; then fine.
    let out = check(&server, None);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("http.token_file"), "{}", stderr(&out));
    std::fs::write(&token, "\n").unwrap();
    std::fs::set_permissions(&token, PermissionsExt::from_mode(0o600)).unwrap();
    let out = check(&server, None);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("is empty"), "{}", stderr(&out));
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, PermissionsExt::from_mode(0o644)).unwrap();
    let out = check(&server, None);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("s3cret"));
    std::fs::set_permissions(&token, PermissionsExt::from_mode(0o600)).unwrap();
    let out = check(&server, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("server config"));

    // A key file readable by others.
    let state = dir.path().join("state");
    support::id_of(&state);
    std::fs::set_permissions(state.join("identity.key"), PermissionsExt::from_mode(0o640)).unwrap();
    let out = check(&format!("state_dir = \"{}\"\n", state.display()), None);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("state_dir"), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));

    // A small server file is a server's; a server typo lists the server's keys.
    let out = check("[limits]\nreplay_cache = 10\n", None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("server config"));
    let out = check("[limits]\nreplay_cache = 10\nmax_lease = 60\n", None);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("max_lease_secs"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("pending_pairings"),
        "{}",
        stderr(&out)
    );
    let out = check("[stor]\nkind = \"memory\"\n", Some("server"));
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("store"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("discovery"), "{}", stderr(&out));
    // Keys both programs have: fine for either.
    let out = check("[quic]\nlisten = \"[::]:47700\"\n", None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = check("[quic]\nlisten = \"[::]:47700\"\n", Some("server"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("server config"));

    // `verbose` is not a level: it would silence every line after a SIGHUP.
    for bad in ["verbose", "handoff=loud", "info,chatty"] {
        let out = check(&format!("[log]\nlevel = \"{bad}\"\n"), Some("daemon"));
        assert_eq!(out.status.code(), Some(78), "{bad}");
        assert!(stderr(&out).contains("log.level"), "{}", stderr(&out));
    }
    let out = check("[log]\nlevel = \"handoff=debug,warn\"\n", Some("daemon"));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn daemon_and_server_with_bad_config_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "bogus = 1\n").unwrap();
    for program in ["daemon", "server"] {
        let out = handoff(&[program, "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{program}: {}", stderr(&out));
        assert!(stderr(&out).contains("bogus"));
    }
}

#[test]
fn client_without_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = handoff(&["peers", "--socket", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error:") && err.contains("is `handoff daemon` running?"),
        "{err}"
    );
}

#[test]
fn help_lists_every_command() {
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for command in [
        "id", "daemon", "server", "peers", "session", "pull", "watch", "trust", "untrust", "inbox",
        "status", "config", "demo",
    ] {
        assert!(text.contains(command), "{command} missing from --help");
    }
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = handoff(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        // fish spells long options `-l json`.
        for word in ["pull", "doctor", "json", "timeout"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = handoff(&["completions", "tcsh"]);
    assert!(!out.status.success());

    let out = handoff(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH handoff 1"), "{page}");
    for section in ["HANDOFF PULL", "HANDOFF DOCTOR", "HANDOFF CONFIG"] {
        assert!(page.contains(section), "the man page lacks {section}");
    }
    assert!(page.contains("\\-\\-timeout"), "options are documented");

    // With --dir: one page per command, so the SUBCOMMANDS references resolve.
    let dir = tempfile::tempdir().unwrap();
    let out = handoff(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "handoff.1",
        "handoff-pull.1",
        "handoff-doctor.1",
        "handoff-config-check.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page} missing or empty");
    }
}

/// `handoff ARGS` with `HANDOFF_SOCKET` set to `env` (or removed), off the async runtime.
async fn handoff_env(args: &[&str], env: Option<&Path>) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args);
    match env {
        Some(socket) => command.env("HANDOFF_SOCKET", socket),
        None => command.env_remove("HANDOFF_SOCKET"),
    };
    command.output().await.expect("run handoff")
}

/// A daemon without a server or trusted peers, and its control socket.
async fn start_at(dir: &Path, name: &str) -> (handoff::daemon::Daemon, std::path::PathBuf) {
    let config = terminal(dir, name, None, vec![]);
    let socket = config.control_socket.clone();
    (start(config).await, socket)
}

fn shown(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Issue 12.10: `HANDOFF_SOCKET` in the environment is a default, not a flag: a typed
/// `--config` or `--socket` wins over it, and only both flags typed together conflict.
#[tokio::test]
async fn handoff_socket_in_the_environment_yields_to_a_typed_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start_at(dir.path(), "a").await;
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!("control_socket = \"{}\"\n", socket.display()),
    )
    .unwrap();
    let elsewhere = dir.path().join("elsewhere.sock");
    let config = config.to_str().unwrap();

    // --config: its daemon answers although the environment names another socket.
    let out = handoff_env(&["status", "--json", "--config", config], Some(&elsewhere)).await;
    assert!(out.status.success(), "{}", shown(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["id"], daemon.id().to_string());
    // --socket likewise.
    let out = handoff_env(
        &["status", "--socket", socket.to_str().unwrap()],
        Some(&elsewhere),
    )
    .await;
    assert!(out.status.success(), "{}", shown(&out));
    // Without a flag the environment decides.
    let out = handoff_env(&["status"], Some(&socket)).await;
    assert!(out.status.success(), "{}", shown(&out));
    let out = handoff_env(&["status"], Some(&elsewhere)).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(stderr(&out).contains("elsewhere.sock"), "{}", shown(&out));
    // Two flags typed together still contradict each other.
    let out = handoff_env(
        &[
            "status",
            "--config",
            config,
            "--socket",
            socket.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        shown(&out)
    );
    daemon.shutdown().await;
}

/// Issue 12.11: every command and every option of every command says what it is for.
#[test]
fn every_command_and_option_has_help_text() {
    fn walk(command: &clap::Command, name: &str, missing: &mut Vec<String>) {
        if command
            .get_about()
            .is_none_or(|a| a.to_string().trim().is_empty())
        {
            missing.push(format!("{name} (the command)"));
        }
        for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
            let help = arg.get_help().or(arg.get_long_help());
            if help.is_none_or(|h| h.to_string().trim().is_empty()) {
                missing.push(format!("{name} {}", arg.get_id()));
            }
            for value in arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
            {
                // Shells are clap_complete's own list; every value of ours says what it means.
                if arg.get_id() != "shell" && value.get_help().is_none() {
                    missing.push(format!("{name} {} {}", arg.get_id(), value.get_name()));
                }
            }
        }
        for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
            walk(sub, &format!("{name} {}", sub.get_name()), missing);
        }
    }
    let mut command = <handoff::cli::Cli as clap::CommandFactory>::command();
    command.build();
    let mut missing = Vec::new();
    walk(&command, "handoff", &mut missing);
    assert!(missing.is_empty(), "without help text: {missing:#?}");
}

/// Issue 12.11: `handoff man` alone documents every command at every depth with every option,
/// and refers to no other page (per-command pages exist only with `--dir`).
#[test]
fn the_one_man_page_documents_every_option_and_links_no_other_page() {
    let out = handoff(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!page.contains("(1)"), "links another page");
    assert!(
        !page.contains("HANDOFF HELP"),
        "the help pseudo-command is not documented"
    );

    let mut command = <handoff::cli::Cli as clap::CommandFactory>::command();
    command.build();
    // (section heading, command), depth first.
    fn sections<'a>(c: &'a clap::Command, name: &str, out: &mut Vec<(String, &'a clap::Command)>) {
        for sub in c
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            let full = format!("{name} {}", sub.get_name().to_uppercase());
            out.push((full.clone(), sub));
            sections(sub, &full, out);
        }
    }
    let mut all = Vec::new();
    sections(&command, "HANDOFF", &mut all);
    for needle in ["HANDOFF SESSION SET", "HANDOFF CONFIG CHECK"] {
        assert!(all.iter().any(|(h, _)| h == needle), "{needle}");
    }
    for (heading, sub) in &all {
        let start = page
            .find(&format!(".SH \"{heading}\"\n"))
            .unwrap_or_else(|| panic!("no section {heading}"));
        let body = &page[start + 1..];
        let body = &body[..body.find("\n.SH ").unwrap_or(body.len())];
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let shown = match arg.get_long() {
                Some(long) => format!("\\-\\-{}", long.replace('-', "\\-")),
                None => format!("<\\fI{}\\fR>", arg.get_id().as_str().to_uppercase()),
            };
            assert!(body.contains(&shown), "{heading} lacks {shown}");
        }
    }
    for option in ["\\-\\-uri", "\\-\\-position", "\\-\\-meta", "\\-\\-kind"] {
        assert!(page.contains(option), "{option}");
    }
}

/// Issue 12.14: a negative, NaN or infinite position or timeout is refused by the CLI with a
/// reason (not taken for a flag, not sent as null); a good one reaches the daemon.
#[tokio::test]
async fn positions_and_timeouts_must_be_finite_and_in_range() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start_at(dir.path(), "a").await;
    let socket = socket.to_str().unwrap();
    for bad in ["-5", "-0.5", "NaN", "inf", "twelve"] {
        let out = handoff_env(
            &[
                "session",
                "set",
                "--uri",
                "https://x/",
                "--position",
                bad,
                "--socket",
                socket,
            ],
            None,
        )
        .await;
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", shown(&out));
        let err = stderr(&out);
        assert!(err.starts_with("error: invalid value"), "{bad}: {err}");
        assert!(err.contains("--position"), "{bad}: {err}");
        assert!(
            err.contains("a position is a number of seconds"),
            "{bad}: {err}"
        );
        assert!(!err.contains("unexpected argument"), "{bad}: {err}");
    }
    assert_eq!(daemon.session(), None, "nothing reached the daemon");
    for bad in ["-1", "0", "NaN", "inf"] {
        let out = handoff_env(&["pull", "tv", "--timeout", bad, "--socket", socket], None).await;
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", shown(&out));
        assert!(
            stderr(&out).contains("a timeout is a number of seconds"),
            "{}",
            shown(&out)
        );
    }
    let out = handoff_env(
        &[
            "session",
            "set",
            "--uri",
            "https://x/",
            "--position",
            "12.5",
            "--socket",
            socket,
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(daemon.session().and_then(|s| s.position), Some(12.5));
    daemon.shutdown().await;
}

/// Issue 12.14: `trust` and `untrust` of this terminal's own ID, name or ID prefix say that it
/// is this terminal's own and change nothing; an ID prefix too short to name a peer says how
/// long one must be.
#[tokio::test]
async fn trust_refuses_this_terminal_and_too_short_prefixes_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start_at(dir.path(), "living-room").await;
    let socket = socket.to_str().unwrap();
    let me = daemon.id().to_string();
    for command in ["trust", "untrust"] {
        for name in [me.as_str(), &me[..6], "living-room"] {
            let out = handoff_env(&[command, name, "--socket", socket], None).await;
            assert_eq!(
                out.status.code(),
                Some(1),
                "{command} {name}: {}",
                shown(&out)
            );
            let err = stderr(&out);
            assert!(err.starts_with("error: "), "{err}");
            assert!(
                err.contains("this terminal's own ID"),
                "{command} {name}: {err}"
            );
        }
    }
    assert!(daemon.trusted().is_empty());

    let peer = handoff::identity::Identity::generate().unwrap().id();
    introduce(&daemon, "tv", peer, "127.0.0.1:9".parse().unwrap());
    let out = handoff_env(&["trust", &peer.to_string()[..3], "--socket", socket], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(
        stderr(&out).contains("at least 4 characters"),
        "{}",
        shown(&out)
    );
    assert!(daemon.trusted().is_empty());
    let out = handoff_env(&["trust", &peer.to_string()[..4], "--socket", socket], None).await;
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(daemon.trusted().len(), 1);
    assert_eq!(daemon.trusted()[0].id, peer.to_string());
    daemon.shutdown().await;
}

/// Issue 12.15: a field a command does not have is refused, naming it, for commands with fields
/// and without; the connection stays usable.
#[tokio::test]
async fn the_control_socket_refuses_unknown_fields_by_name() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start_at(dir.path(), "a").await;
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut ask = async |line: &str| -> serde_json::Value {
        write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let reply = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("a reply line");
        serde_json::from_str(&reply).unwrap()
    };
    for (line, field) in [
        (r#"{"cmd":"status","verbose":true}"#, "verbose"),
        (r#"{"cmd":"inbox","limit":3}"#, "limit"),
        (
            r#"{"cmd":"session_set","uri":"https://x/","titel":"typo"}"#,
            "titel",
        ),
    ] {
        let reply = ask(line).await;
        assert_eq!(reply["ok"], false, "{line}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(field), "{line}: {reply}");
    }
    assert_eq!(
        daemon.session(),
        None,
        "the misspelt request changed nothing"
    );
    let reply = ask(r#"{"cmd":"status"}"#).await;
    assert_eq!(reply["ok"], true, "{reply}");
    daemon.shutdown().await;
}

/// Issue 12.14: pulling an unchanged session again prints it again, but the inbox keeps it
/// once; a changed session is a new entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_an_unchanged_session_again_keeps_one_inbox_entry() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b_id = handoff::identity::Identity::load_or_create(&dir.path().join("b"))
        .unwrap()
        .id();
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b_id])).await;
    let (b, socket) = start_at(dir.path(), "b").await;
    let socket = socket.to_str().unwrap();
    wait_connected(&a).await;
    assert!(a.set_session(Some(session("film")), WAIT).await);
    introduce(&b, "a", a.id(), a.quic_addr());
    let inbox = async || -> Vec<serde_json::Value> {
        let out = handoff_env(&["inbox", "--json", "--socket", socket], None).await;
        assert!(out.status.success(), "{}", shown(&out));
        support::json_lines(&out.stdout)
    };
    for _ in 0..3 {
        let out = handoff_env(&["pull", "a", "--json", "--socket", socket], None).await;
        assert!(out.status.success(), "{}", shown(&out));
        let push = &support::json_lines(&out.stdout)[0];
        assert_eq!(push["title"], "film");
    }
    let items = inbox().await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["from"], a.id().to_string());

    let mut moved = session("film");
    moved.position = Some(60.0);
    assert!(a.set_session(Some(moved), WAIT).await);
    let out = handoff_env(&["pull", "a", "--json", "--socket", socket], None).await;
    assert!(out.status.success(), "{}", shown(&out));
    let items = inbox().await;
    let positions: Vec<&serde_json::Value> = items.iter().map(|i| &i["position"]).collect();
    assert_eq!(positions, [3.0, 60.0], "{items:?}");
    b.shutdown().await;
    a.shutdown().await;
    server.shutdown().await;
}

/// Issue 12.14: a second daemon given a socket another daemon serves stops before it creates
/// anything: no state directory, no key; the first daemon keeps serving.
#[tokio::test]
async fn a_second_daemon_on_a_busy_socket_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (first, socket) = start_at(dir.path(), "a").await;
    let mut second = terminal(dir.path(), "b", None, vec![]);
    second.control_socket = socket.clone();
    let state_dir = second.state_dir.clone();
    let err =
        handoff::daemon::Daemon::start(second, handoff::daemon::DaemonOptions { discovery: false })
            .await
            .err()
            .expect("the second daemon is refused");
    assert!(
        err.to_string().contains("another daemon is listening"),
        "{err}"
    );
    assert!(!state_dir.exists(), "{} was created", state_dir.display());
    let out = handoff_env(&["status", "--socket", socket.to_str().unwrap()], None).await;
    assert!(out.status.success(), "{}", shown(&out));
    first.shutdown().await;
}

/// `config check --reload` (the units' ExecReload=) checks what SIGHUP applies: keys and values,
/// not the files the config names, which systemd 252 does not let ExecReload= read (issue 12.5).
#[test]
fn config_check_for_reload_skips_the_files_but_not_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    let config = |extra: &str| {
        format!(
            "state_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{extra}",
            dir.path().join("state").display(),
            dir.path().join("missing.token").display()
        )
    };
    let check = |args: &[&str]| {
        let mut all = vec!["config", "check", "--kind", "server", "--config"];
        all.push(path.to_str().unwrap());
        all.extend_from_slice(args);
        handoff(&all)
    };
    std::fs::write(&path, config("")).unwrap();
    let full = check(&[]);
    assert_eq!(full.status.code(), Some(78), "{}", stderr(&full));
    assert!(stderr(&full).contains("token"), "{}", stderr(&full));
    let reload = check(&["--reload"]);
    assert_eq!(reload.status.code(), Some(0), "{}", stderr(&reload));

    std::fs::write(&path, config("[push]\ndefault_ttl_secs = \"soon\"\n")).unwrap();
    let broken = check(&["--reload"]);
    assert_eq!(broken.status.code(), Some(78));
    assert!(
        stderr(&broken).contains("default_ttl_secs"),
        "{}",
        stderr(&broken)
    );
}

/// A one-shot command whose reader goes away (`handoff man | head -1`) ends quietly, as other
/// command-line tools do: killed by SIGPIPE, with no panic or error on stderr.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A pipe smaller than the man page, so the command is still writing when the reader goes.
    let size = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096, "F_SETPIPE_SZ");
    let mut child = std::process::Command::new(BIN)
        .arg("man")
        .stdout(write_end)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::fs::File::from(read_end);
    let mut first = [0u8; 64];
    reader.read_exact(&mut first).unwrap();
    drop(reader);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");
    assert!(err.is_empty(), "{err}");
}

/// Started with a low soft limit on open files (as from a shell: often 1024, as low as the
/// default `http_max_connections`), the server raises it to the hard limit, and warns when even
/// that is short of what the HTTP connection cap may use.
#[test]
fn the_server_raises_its_open_files_limit_and_warns_when_it_is_short() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("publish.token");
    std::fs::write(&token, "test-token-0123456789").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[quic]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            dir.path().join("state").display(),
            token.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    let mut command = std::process::Command::new(BIN);
    command
        .args(["server", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 200,
                rlim_max: 900,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let up = support::wait_for(std::time::Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("server listening").then_some(())
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    // SAFETY: kill of the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(up.is_some(), "the server did not start: {text}");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(open_files[3..5], ["900", "900"], "{limits}");
    let warning = text
        .lines()
        .find(|l| l.contains("open files limit"))
        .unwrap_or_else(|| panic!("no warning: {text}"));
    assert!(
        warning.contains("WARN") && warning.contains("http_max_connections"),
        "{warning}"
    );
}

/// `handoff config check` run by root on a service's config after a `DynamicUser=` unit's first
/// start: the state directory belongs to the service's transient user. The check passes with a
/// note naming that owner (the other checks still apply); the daemon and the server themselves,
/// run by anyone but that owner, still refuse the directory with 78.
#[test]
fn config_check_notes_a_state_dir_another_user_owns_and_the_programs_refuse_it() {
    if !support::require_root("config_check_notes_a_state_dir_another_user_owns") {
        return;
    }
    // A uid in systemd's DynamicUser= range, with no account.
    const DYNAMIC: u32 = 61_999;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    support::id_of(&state);
    for path in [state.clone(), state.join("identity.key")] {
        std::os::unix::fs::chown(&path, Some(DYNAMIC), Some(DYNAMIC)).unwrap();
    }
    let token = dir.path().join("publish.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, PermissionsExt::from_mode(0o600)).unwrap();
    // Loopback only, should the check ever let a program start.
    let daemon = dir.path().join("daemon.toml");
    std::fs::write(
        &daemon,
        format!(
            "state_dir = \"{}\"\ncontrol_socket = \"{}\"\n[discovery]\ninterfaces = [\"lo\"]\n\
             [quic]\nlisten = \"127.0.0.1:0\"\n",
            state.display(),
            dir.path().join("control.sock").display()
        ),
    )
    .unwrap();
    let server = dir.path().join("server.toml");
    std::fs::write(
        &server,
        format!(
            "state_dir = \"{}\"\n[quic]\nlisten = \"127.0.0.1:0\"\n[http]\n\
             listen = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            state.display(),
            token.display()
        ),
    )
    .unwrap();
    for (kind, config) in [("daemon", &daemon), ("server", &server)] {
        let config = config.to_str().unwrap();
        let out = handoff(&["config", "check", "--kind", kind, "--config", config]);
        assert!(out.status.success(), "{kind}: {}", shown(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("ok ({kind} config)")),
            "{}",
            shown(&out)
        );
        let err = stderr(&out);
        assert!(
            err.starts_with("note: state_dir") && err.contains(&format!("uid {DYNAMIC}")),
            "{kind}: {}",
            shown(&out)
        );
        let out = handoff(&[kind, "--config", config]);
        assert_eq!(out.status.code(), Some(78), "{kind}: {}", shown(&out));
        assert!(
            stderr(&out).contains(&format!("is owned by uid {DYNAMIC}")),
            "{kind}: {}",
            shown(&out)
        );
    }
    // Another user's directory is still checked: writable by others, or a key readable by
    // others, fails the check.
    std::fs::set_permissions(state.join("identity.key"), PermissionsExt::from_mode(0o644)).unwrap();
    let out = handoff(&["config", "check", "--config", daemon.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", shown(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", shown(&out));
    std::fs::set_permissions(state.join("identity.key"), PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&state, PermissionsExt::from_mode(0o777)).unwrap();
    let out = handoff(&["config", "check", "--config", daemon.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", shown(&out));
    assert!(stderr(&out).contains("chmod go-w"), "{}", shown(&out));
}

/// Plain-text `status` shows what `--json` has: a live link after a pull, with its expiry (Unix
/// time and seconds left), and a pairing request this terminal's user did not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_status_shows_follows_with_expiry_and_pending_pairings() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let b_id = handoff::identity::Identity::load_or_create(&dir.path().join("b"))
        .unwrap()
        .id();
    let a = start(terminal(dir.path(), "a", Some(&server), vec![b_id])).await;
    let (b, socket) = start_at(dir.path(), "b").await;
    let socket = socket.to_str().unwrap();
    wait_connected(&a).await;
    assert!(a.set_session(Some(session("film")), WAIT).await);
    introduce(&b, "a", a.id(), a.quic_addr());
    let out = handoff_env(&["pull", "a", "--socket", socket], None).await;
    assert!(out.status.success(), "{}", shown(&out));
    let before = handoff::net::unix_now();
    let out = handoff_env(&["status", "--socket", socket], None).await;
    assert!(out.status.success(), "{}", shown(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines().skip_while(|l| !l.starts_with("follows:"));
    assert_eq!(lines.next(), Some("follows: 1"), "{text}");
    let link = lines.next().unwrap_or_default();
    let a_short = &a.id().to_string()[..10];
    let until: u64 = link
        .trim()
        .strip_prefix(&format!("{a_short} until "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no link to a with its expiry:\n{text}"));
    assert!(until > before, "{text}");
    assert!(
        link.trim_end().ends_with(" s)") && link.contains("(in "),
        "{text}"
    );
    assert!(!text.contains("pairing requests"), "{text}");

    // A asks B to pair, B's user has not: B lists the request.
    let asking = a.clone();
    introduce(&a, "b", b.id(), b.quic_addr());
    let pairing = tokio::spawn(async move { asking.pair("b").await });
    let a_full = a.id().to_string();
    // (Generous: the request is made at once, but the machine may be loaded.)
    let listed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let out = handoff_env(&["status", "--socket", socket], None).await;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let listed = text
                .lines()
                .skip_while(|l| !l.starts_with("pairing requests"))
                .any(|l| l.trim() == a_full);
            if listed {
                return text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("B's plain-text status lists A's pairing request");
    assert!(
        listed.contains("pairing requests (run `handoff pair ID` to accept):"),
        "{listed}"
    );
    pairing.abort();
    b.shutdown().await;
    a.shutdown().await;
    server.shutdown().await;
}
