//! The command-line contract (DESIGN §8) that needs no network: `id`, `config check`, exit codes
//! and error lines.

mod support;

use std::os::unix::fs::PermissionsExt;

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

#[test]
fn shipped_configs_check_ok() {
    let root = env!("CARGO_MANIFEST_DIR");
    // The server's token as systemd would pass it (`LoadCredential=publish.token:...`).
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("publish.token"), "t0ken\n").unwrap();
    for (file, kind) in [("daemon.toml", "daemon"), ("server.toml", "server")] {
        let out = std::process::Command::new(BIN)
            .args([
                "config",
                "check",
                "--config",
                &format!("{root}/config/{file}"),
            ])
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
