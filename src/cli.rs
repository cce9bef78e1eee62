//! The command line (DESIGN §8): argument definitions and the commands that talk to a daemon.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, ConfigError, ConfigKind, DaemonConfig, ServerConfig, EXIT_CONFIG};
use crate::control::{self, ControlClient, ControlRequest, PushRecord, Reply, WatchLine};
use crate::identity::Identity;

/// Default control socket, as in the shipped daemon config.
pub const DEFAULT_SOCKET: &str = "/run/handoff/control.sock";
/// The environment variable naming the control socket when no flag does.
pub const SOCKET_ENV: &str = "HANDOFF_SOCKET";

#[derive(Debug, Parser)]
#[command(
    name = "handoff",
    version,
    about = "Pick up on this device what a nearby device is showing"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How a command finds the daemon: `--socket`, else the `control_socket` of `--config`, else
/// `$HANDOFF_SOCKET`, else [`DEFAULT_SOCKET`]. The variable is read here rather than by clap:
/// clap counts a value from the environment as given, so it would conflict with a `--config`
/// the user typed; a flag on the command line wins over the environment.
#[derive(Debug, Args, Clone)]
pub struct DaemonTarget {
    /// The daemon's config file; its control_socket is used (wins over $HANDOFF_SOCKET).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's control socket [default: $HANDOFF_SOCKET if set, else
    /// /run/handoff/control.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct JsonFlag {
    /// Print JSON Lines: one object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print this machine's identity (creating the key if missing).
    Id {
        /// The state directory holding the key (identity.key, mode 0600).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Run the terminal daemon in the foreground.
    Daemon {
        /// The daemon's config file (TOML; e.g. /etc/handoff/daemon.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the content server in the foreground.
    Server {
        /// The server's config file (TOML; e.g. /etc/handoff/server.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List the peers discovered on the LAN.
    Peers {
        #[command(flatten)]
        target: DaemonTarget,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Set, clear or show what this terminal is showing.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Pick up what a peer shows: fetch its interface info, ask its server, print the first push.
    Pull {
        /// The peer's ID, a unique ID prefix, or its unique name.
        peer: String,
        /// How long to wait for the first push, in seconds.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 10.0,
            allow_negative_numbers = true,
            value_parser = parse_timeout
        )]
        timeout: f64,
        #[command(flatten)]
        target: DaemonTarget,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Print every push as it arrives, until interrupted.
    Watch {
        #[command(flatten)]
        target: DaemonTarget,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Trust a peer: it may fetch this terminal's interface info.
    Trust {
        /// A full ID, or the name or ID prefix of a discovered peer.
        id: String,
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Pair with a peer: run it on both terminals, compare the 6-digit codes, confirm; each
    /// terminal then trusts the other.
    Pair {
        /// The peer's ID, unique ID prefix, or unique name.
        peer: String,
        /// Confirm without asking (for scripts, once the codes were compared another way).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// List the trust list.
    Trusted {
        #[command(flatten)]
        target: DaemonTarget,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Stop trusting a peer (its live link at this terminal's server ends too).
    Untrust {
        /// A full ID, or the name or ID prefix of a discovered peer.
        id: String,
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Every push this terminal has received, oldest first.
    Inbox {
        #[command(flatten)]
        target: DaemonTarget,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// The daemon's identity, server link, peers and inbox.
    Status {
        #[command(flatten)]
        target: DaemonTarget,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Check configuration files.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Bridge this desktop's media players (MPRIS on the session bus) and the daemon: share
    /// what plays as the session, open what followed terminals push. Runs in the foreground.
    Player {
        /// A daemon config: its `[player]` section and its `control_socket` [default:
        /// $HANDOFF_CONFIG if set].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's control socket, instead of the config's [default: --config's
        /// control_socket, else $HANDOFF_SOCKET, else $HANDOFF_CONFIG's control_socket, else
        /// /run/handoff/control.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Run a server and two terminals on loopback and show a real handoff.
    Demo,
    /// Check the network, discovery and the server link of a daemon's config: each line ok or
    /// not ok, with a hint.
    Doctor {
        /// The daemon's config file.
        #[arg(long, value_name = "FILE", default_value = "/etc/handoff/daemon.toml")]
        config: PathBuf,
        /// How long to listen for peers on mDNS, in seconds.
        #[arg(long, default_value_t = 3.0)]
        wait: f64,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Print a shell completion script (e.g. `handoff completions bash > /etc/bash_completion.d/handoff`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) generated from this command line: `handoff man | man -l -`.
    Man {
        /// Write handoff.1 and one page per subcommand (handoff-pull.1, ...) into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionAction {
    /// Set the session: what this terminal shows now.
    Set {
        /// What is shown: the URI another terminal opens to show it too.
        #[arg(long)]
        uri: String,
        /// A title for people (shown by peers and passed to their on_push hook).
        #[arg(long, default_value = "")]
        title: String,
        /// Playback position in seconds (0 or more).
        #[arg(
            long,
            value_name = "SECONDS",
            allow_negative_numbers = true,
            value_parser = parse_position
        )]
        position: Option<f64>,
        /// Extra metadata, KEY=VALUE; may be repeated.
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Clear the session: this terminal shows nothing.
    Clear {
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Show the session.
    Show {
        #[command(flatten)]
        target: DaemonTarget,
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate a daemon or server config: exit 0, or 78 naming the offending key.
    Check {
        /// The config file to check.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Which program the file is for; guessed from its keys if not given.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Check only what a reload (SIGHUP) applies: the keys and their values, not the files
        /// the config names, which are checked when the program starts and not re-read. The
        /// units' ExecReload= uses it: under systemd 252 it cannot read the credentials.
        #[arg(long)]
        reload: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// A terminal daemon's config (`handoff daemon`).
    Daemon,
    /// A content server's config (`handoff server`).
    Server,
}

/// `--position`: seconds into what is shown. Negative numbers reach this parser (rather than
/// being taken for flags) so that they are refused with a reason; so are NaN and infinities,
/// which JSON cannot carry.
fn parse_position(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        Ok(_) => Err("a position is a number of seconds, 0 or more".into()),
        Err(_) => Err("a position is a number of seconds, e.g. 12 or 12.5".into()),
    }
}

/// `--timeout`: a positive, finite number of seconds.
fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 => Ok(t),
        _ => Err("a timeout is a number of seconds greater than 0, e.g. 10".into()),
    }
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Prints the doctor's report; fails (exit 1) if any check is not ok.
pub fn print_doctor(report: &[crate::doctor::Check], json: bool) -> Result<(), CliError> {
    for check in report {
        if json {
            json_line(check)?;
        } else {
            let mark = if check.ok { "ok    " } else { "NOT OK" };
            println!("{mark}  {}: {}", check.check, check.detail);
            if let Some(hint) = &check.hint {
                println!("        hint: {hint}");
            }
        }
    }
    let failed = report.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        return Err(CliError::new(format!("{failed} check(s) not ok")));
    }
    Ok(())
}

/// Writes the completion script for `shell` to stdout.
pub fn print_completions(shell: clap_complete::Shell) -> Result<(), CliError> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "handoff", &mut out);
    write_stdout(&out)
}

/// Writes the man pages into `dir` (handoff.1, handoff-pull.1, ...), or to stdout as one
/// self-contained page (see [`man_page`]).
pub fn print_man(dir: Option<&Path>) -> Result<(), CliError> {
    let command = <Cli as clap::CommandFactory>::command();
    if let Some(dir) = dir {
        return clap_mangen::generate_to(command, dir).map_err(|e| {
            CliError::new(format!("cannot write man pages to {}: {e}", dir.display()))
        });
    }
    let page =
        man_page(command).map_err(|e| CliError::new(format!("cannot render the man page: {e}")))?;
    write_stdout(&page)
}

/// `handoff(1)` as one page: the top command's sections, a COMMANDS list naming each command's
/// section, then a section per command at every depth (`HANDOFF SESSION SET`) with its
/// description, synopsis and every option. clap_mangen writes one page per command and links
/// them as `handoff-pull(1)`; those pages exist only with `--dir`, so this page links nothing.
pub fn man_page(command: clap::Command) -> std::io::Result<Vec<u8>> {
    let mut command = command.disable_help_subcommand(true);
    // Building sets each subcommand's full name (`handoff session set`) for its synopsis.
    command.build();
    let top = clap_mangen::Man::new(command.clone());
    let mut out = Vec::new();
    top.render_title(&mut out)?;
    top.render_name_section(&mut out)?;
    top.render_synopsis_section(&mut out)?;
    top.render_description_section(&mut out)?;
    top.render_options_section(&mut out)?;
    let mut commands = Vec::new();
    command_tree(&command, "handoff", &mut commands);
    out.extend_from_slice(b".SH COMMANDS\nEach command is described in its own section below.\n");
    for (name, sub) in &commands {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let entry = format!(".TP\n\\fB{}\\fR\n{}\n", roff_text(name), roff_text(&about));
        out.extend_from_slice(entry.as_bytes());
    }
    for (name, sub) in &commands {
        let man = clap_mangen::Man::new((*sub).clone());
        let mut text = Vec::new();
        man.render_description_section(&mut text)?;
        man.render_synopsis_section(&mut text)?;
        man.render_options_section(&mut text)?;
        let heading = format!(".SH \"{}\"\n", roff_text(&name.to_uppercase()));
        out.extend_from_slice(heading.as_bytes());
        out.extend_from_slice(&demote_headings(&text));
    }
    top.render_version_section(&mut out)?;
    Ok(out)
}

/// Every visible command below `command`, depth first, with its full name.
fn command_tree<'a>(
    command: &'a clap::Command,
    name: &str,
    out: &mut Vec<(String, &'a clap::Command)>,
) {
    for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
        let full = format!("{name} {}", sub.get_name());
        out.push((full.clone(), sub));
        command_tree(sub, &full, out);
    }
}

/// Text safe to place on a roff text line: backslashes and hyphens escaped, and a leading
/// `.` or `'` kept from being read as a request.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// Turns a rendered section's `.SH` headings into `.SS` subheadings.
fn demote_headings(roff: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(roff)
        .lines()
        .map(|line| match line.strip_prefix(".SH ") {
            Some(rest) => format!(".SS {rest}\n"),
            None => format!("{line}\n"),
        })
        .collect::<String>()
        .into_bytes()
}

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::new(format!("cannot write to stdout: {e}")))
}

/// A failed command: the message for stderr and the exit status.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        Self {
            code: EXIT_CONFIG,
            message: e.to_string(),
        }
    }
}

impl From<control::ClientError> for CliError {
    fn from(e: control::ClientError) -> Self {
        Self::new(e.to_string())
    }
}

impl DaemonTarget {
    /// The control socket this command talks to.
    pub fn socket(&self) -> Result<PathBuf, CliError> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        if let Some(config) = &self.config {
            return Ok(DaemonConfig::load(config)?.control_socket);
        }
        match std::env::var_os(SOCKET_ENV) {
            Some(socket) if !socket.is_empty() => Ok(PathBuf::from(socket)),
            _ => Ok(PathBuf::from(DEFAULT_SOCKET)),
        }
    }
}

/// `handoff id`.
pub fn print_id(state_dir: &Path) -> Result<(), CliError> {
    let identity = Identity::load_or_create(state_dir).map_err(|e| CliError {
        code: e.exit_code(),
        message: e.to_string(),
    })?;
    println!("{}", identity.id());
    Ok(())
}

/// The environment variable naming `handoff player`'s config when `--config` does not.
pub const CONFIG_ENV: &str = "HANDOFF_CONFIG";

/// `handoff player`'s settings: `[player]` of the config (`--config`, else `$HANDOFF_CONFIG`;
/// defaults without one) and the control socket. A flag the user typed wins over the
/// environment, as for the other commands: `--socket`, else the typed `--config`'s, else
/// `$HANDOFF_SOCKET`, else the `$HANDOFF_CONFIG` file's, else the default. The variables are read
/// here rather than by clap, which cannot tell a typed flag from one taken from the environment.
pub fn player_setup(
    config: Option<&Path>,
    socket: Option<PathBuf>,
) -> Result<(config::PlayerConfig, PathBuf), CliError> {
    let from_env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let typed = config.is_some();
    let config = config
        .map(Path::to_path_buf)
        .or_else(|| from_env(CONFIG_ENV).map(PathBuf::from));
    let daemon = config.as_deref().map(DaemonConfig::load).transpose()?;
    let of_config = || daemon.as_ref().map(|d| d.control_socket.clone());
    let socket = socket
        .or_else(|| if typed { of_config() } else { None })
        .or_else(|| from_env(SOCKET_ENV).map(PathBuf::from))
        .or_else(of_config)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    Ok((daemon.map(|d| d.player).unwrap_or_default(), socket))
}

/// `handoff config check`: the config itself, then the files it names (state_dir, key and
/// token files), as the program would find them when run as this user. A state_dir another
/// user owns is a note, not an error: the check is usually run by root for a service whose own
/// user owns it (the program refuses such a directory when it starts).
pub fn check_config(path: &Path, kind: Option<KindArg>, reload: bool) -> Result<(), CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let kind = match kind {
        Some(KindArg::Daemon) => Some(ConfigKind::Daemon),
        Some(KindArg::Server) => Some(ConfigKind::Server),
        None => config::guess_kind(&text),
    };
    let daemon = || -> Result<Vec<String>, ConfigError> {
        let config = DaemonConfig::from_toml(path, &text)?;
        if reload {
            return Ok(vec![]);
        }
        config.check_files_as_admin()
    };
    let server = || -> Result<Vec<String>, ConfigError> {
        let config = ServerConfig::from_toml(path, &text)?;
        if reload {
            return Ok(vec![]);
        }
        config.check_files_as_admin()
    };
    let shown = path.display();
    let notes = match kind {
        Some(ConfigKind::Daemon) => {
            let notes = daemon()?;
            println!("{shown}: ok (daemon config)");
            notes
        }
        Some(ConfigKind::Server) => {
            let notes = server()?;
            println!("{shown}: ok (server config)");
            notes
        }
        // Its keys do not tell: it is fine if it is fine for either program.
        None => match (daemon(), server()) {
            (Ok(notes), Ok(_)) => {
                println!(
                    "{shown}: ok (valid as a daemon or a server config; \
                     --kind daemon|server checks it as one)"
                );
                notes
            }
            (Ok(notes), Err(_)) => {
                println!("{shown}: ok (daemon config)");
                notes
            }
            (Err(_), Ok(notes)) => {
                println!("{shown}: ok (server config)");
                notes
            }
            // The same complaint either way (a syntax error, a bad shared key).
            (Err(d), Err(s)) if d.to_string() == s.to_string() => return Err(d.into()),
            (Err(d), Err(s)) => {
                return Err(CliError {
                    code: EXIT_CONFIG,
                    message: format!(
                        "{shown} is neither a valid daemon nor server config \
                         (--kind daemon|server checks it as one).\n\
                         As a daemon config: {d}\nAs a server config: {s}"
                    ),
                })
            }
        },
    };
    for note in notes {
        eprintln!("note: {note}");
    }
    Ok(())
}

const CALL_TIMEOUT: Duration = Duration::from_secs(15);

async fn call(target: &DaemonTarget, request: ControlRequest) -> Result<Reply, CliError> {
    let timeout = match &request {
        ControlRequest::Pull {
            timeout_secs: Some(t),
            ..
        } => CALL_TIMEOUT + Duration::from_secs_f64(*t),
        _ => CALL_TIMEOUT,
    };
    let reply = control::call(&target.socket()?, &request, timeout).await?;
    if !reply.ok {
        return Err(CliError::new(
            reply.error.unwrap_or_else(|| "the daemon refused".into()),
        ));
    }
    Ok(reply)
}

fn json_line<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let line = serde_json::to_string(value).map_err(|e| CliError::new(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| CliError::new(e.to_string()))
}

fn print_push(record: &PushRecord) {
    let from = record
        .from
        .as_deref()
        .map(|f| &f[..f.len().min(10)])
        .unwrap_or("publisher");
    let position = record
        .position
        .map(|p| format!(" @ {p}s"))
        .unwrap_or_default();
    println!(
        "{} — {}{}  (from {}, offset {})",
        record.title, record.uri, position, from, record.offset
    );
    let _ = std::io::stdout().flush();
}

/// Runs a command that talks to the daemon.
pub async fn run_client(command: Command) -> Result<(), CliError> {
    match command {
        Command::Peers { target, out } => {
            let peers = call(&target, ControlRequest::Peers)
                .await?
                .peers
                .unwrap_or_default();
            if out.json {
                for p in &peers {
                    json_line(p)?;
                }
            } else if peers.is_empty() {
                println!("no peers found yet");
            } else {
                println!("{:<20} {:<12} {:<8} ADDRESSES", "NAME", "ID", "TRUSTED");
                for p in &peers {
                    let addrs: Vec<String> =
                        p.addrs.iter().map(|a| format!("{a}:{}", p.port)).collect();
                    // An unverified name is only what an mDNS advert claims.
                    let name = if p.verified {
                        p.name.clone()
                    } else {
                        format!("{}?", p.name)
                    };
                    println!(
                        "{:<20} {:<12} {:<8} {}",
                        name,
                        &p.id[..10],
                        if p.trusted { "yes" } else { "no" },
                        addrs.join(" ")
                    );
                }
                if peers.iter().any(|p| !p.verified) {
                    println!("(NAME? = claimed by mDNS, not yet proven by a handshake)");
                }
            }
        }
        Command::Session { action } => {
            match action {
                SessionAction::Set {
                    uri,
                    title,
                    position,
                    meta,
                    target,
                } => {
                    let meta: BTreeMap<String, String> = meta.into_iter().collect();
                    let reply = call(
                        &target,
                        ControlRequest::SessionSet {
                            uri,
                            title,
                            position,
                            meta,
                        },
                    )
                    .await?;
                    if reply.server_synced == Some(false) {
                        eprintln!("note: session set locally; the content server has not confirmed it yet");
                    }
                }
                SessionAction::Clear { target } => {
                    call(&target, ControlRequest::SessionClear).await?;
                }
                SessionAction::Show { target, out } => {
                    let session = call(&target, ControlRequest::SessionShow)
                        .await?
                        .session
                        .flatten();
                    if out.json {
                        json_line(&session)?;
                    } else {
                        match session {
                            Some(s) => {
                                let position =
                                    s.position.map(|p| format!(" @ {p}s")).unwrap_or_default();
                                println!("{} — {}{}", s.title, s.uri, position);
                                for (k, v) in &s.meta {
                                    println!("  {k} = {v}");
                                }
                            }
                            None => println!("nothing is being shown"),
                        }
                    }
                }
            }
        }
        Command::Pull {
            peer,
            timeout,
            target,
            out,
        } => {
            let reply = call(
                &target,
                ControlRequest::Pull {
                    peer: peer.clone(),
                    timeout_secs: Some(timeout),
                },
            )
            .await?;
            match reply.push {
                Some(push) if out.json => json_line(&push)?,
                Some(push) => print_push(&push),
                None => {
                    return Err(CliError::new(format!(
                        "linked to {peer}, but it is not showing anything now; `handoff watch` prints it when it starts"
                    )))
                }
            }
        }
        Command::Watch { target, out } => {
            let mut client = ControlClient::connect(&target.socket()?).await?;
            let reply = client.call(&ControlRequest::Watch).await?;
            if !reply.ok {
                return Err(CliError::new(reply.error.unwrap_or_default()));
            }
            loop {
                let line: WatchLine = client.read_line().await?;
                if out.json {
                    json_line(&line.push)?;
                } else {
                    print_push(&line.push);
                }
            }
        }
        Command::Trust { id, target } => {
            let changed = call(&target, ControlRequest::Trust { id: id.clone() })
                .await?
                .changed;
            if changed == Some(false) {
                println!("{id} was already trusted");
            }
        }
        Command::Pair { peer, yes, target } => {
            let timeout = crate::daemon::PAIR_TIMEOUT + CALL_TIMEOUT;
            let reply = control::call(
                &target.socket()?,
                &ControlRequest::Pair { peer: peer.clone() },
                timeout,
            )
            .await?;
            if !reply.ok {
                return Err(CliError::new(
                    reply.error.unwrap_or_else(|| "pairing failed".into()),
                ));
            }
            let (Some(peer_id), Some(code)) = (reply.peer_id, reply.code) else {
                return Err(CliError::new("the daemon sent no pairing code"));
            };
            println!("Pairing code: {} {}", &code[..3], &code[3..]);
            println!("Check that {peer} shows the same code.");
            if !yes {
                print!("Same code on both? [y/N] ");
                let _ = std::io::stdout().flush();
                let mut answer = String::new();
                let _ = std::io::stdin().read_line(&mut answer);
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    return Err(CliError::new("pairing cancelled"));
                }
            }
            call(
                &target,
                ControlRequest::PairConfirm {
                    peer: peer_id,
                    code,
                },
            )
            .await?;
            println!("{peer} is now trusted");
        }
        Command::Trusted { target, out } => {
            let trusted = call(&target, ControlRequest::Trusted)
                .await?
                .trusted
                .unwrap_or_default();
            if out.json {
                for t in &trusted {
                    json_line(t)?;
                }
            } else if trusted.is_empty() {
                println!("no trusted peers");
            } else {
                for t in &trusted {
                    println!(
                        "{}  {:<7} {}",
                        t.id,
                        t.source,
                        t.name.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Command::Untrust { id, target } => {
            let reply = call(&target, ControlRequest::Untrust { id: id.clone() }).await?;
            if reply.changed == Some(false) {
                println!("{id} was not trusted; its tickets are revoked all the same");
            }
            if reply.revoked == Some(true) {
                println!("its link to this terminal at the content server was ended");
            }
            if let Some(warning) = reply.warning {
                eprintln!("warning: {warning}");
            }
        }
        Command::Inbox { target, out } => {
            let items = call(&target, ControlRequest::Inbox)
                .await?
                .items
                .unwrap_or_default();
            if out.json {
                for item in &items {
                    json_line(item)?;
                }
            } else if items.is_empty() {
                println!("the inbox is empty");
            } else {
                items.iter().for_each(print_push);
            }
        }
        Command::Status { target, out } => {
            let status = call(&target, ControlRequest::Status).await?.status;
            let Some(s) = status else {
                return Err(CliError::new("the daemon sent no status"));
            };
            if out.json {
                json_line(&s)?;
            } else {
                println!("id:      {}", s.id);
                println!("name:    {}", s.name);
                println!("quic:    {}", s.quic);
                println!("accept:  {} ({} trusted peers)", s.accept, s.trusted);
                match &s.server {
                    Some(server) => println!(
                        "server:  {} at {} ({})",
                        &server.id[..10],
                        server.addrs.join(", "),
                        if server.connected {
                            "connected"
                        } else {
                            "not connected"
                        }
                    ),
                    None => println!("server:  none configured"),
                }
                println!("peers:   {}", s.peers);
                println!("follows: {}", s.follows.len());
                let now = crate::net::unix_now();
                for follow in &s.follows {
                    println!(
                        "  {} until {} (in {} s)",
                        &follow.id[..10],
                        follow.until,
                        follow.until.saturating_sub(now)
                    );
                }
                if !s.pair_requests.is_empty() {
                    println!("pairing requests (run `handoff pair ID` to accept):");
                    for id in &s.pair_requests {
                        println!("  {id}");
                    }
                }
                println!("inbox:   {}", s.inbox);
                if let Some(addr) = &s.metrics {
                    println!("metrics: http://{addr}/metrics");
                }
                match &s.session {
                    Some(session) => println!("session: {} — {}", session.title, session.uri),
                    None => println!("session: none"),
                }
            }
        }
        other => return Err(CliError::new(format!("{other:?} is not a client command"))),
    }
    Ok(())
}
