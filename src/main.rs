//! The `handoff` binary: parses arguments, sets up logging, loads config, runs the library, maps
//! errors to exit codes (78 for bad config, 1 for other failures).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use handoff::cli::{self, Cli, CliError, Command, ConfigAction};
use handoff::config::{DaemonConfig, ServerConfig};
use handoff::daemon::{Daemon, DaemonOptions};
use handoff::identity::Identity;
use handoff::server::Server;
use handoff::service;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo isolates itself before any thread exists (a user namespace requires that).
    let mut demo_isolated = None;
    if matches!(cli.command, Command::Demo) {
        demo_isolated = Some(handoff::isolate::enter_private_network());
    }
    let default_level = match cli.command {
        Command::Daemon { .. } | Command::Server { .. } => "info",
        _ => "warn",
    };
    let long_running = matches!(
        cli.command,
        Command::Daemon { .. } | Command::Server { .. } | Command::Player { .. } | Command::Demo
    );
    if !long_running {
        // A one-shot command piped into `head` or `grep -q` ends quietly when the reader goes,
        // as other command-line tools do, instead of failing on a write error.
        // SAFETY: no other thread exists yet; SIG_DFL is the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let logs = Logs::init(default_level);
    // Long-running programs get worker threads; a one-shot client command starts faster on one.
    let runtime = if long_running && !matches!(cli.command, Command::Player { .. }) {
        tokio::runtime::Runtime::new()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return fail(CliError::new(format!("cannot start the runtime: {e}"))),
    };
    let result = runtime.block_on(run(cli.command, demo_isolated, logs));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: CliError) -> ExitCode {
    // A config error keeps its lines (TOML's points at the mistake with `^^^`); anything else
    // is one line, whatever text it carries. In the journal every line has the error priority.
    let message = if e.code == handoff::config::EXIT_CONFIG {
        e.message.clone()
    } else {
        e.message.replace('\n', " ")
    };
    let journal = handoff::logging::stderr_is_journal();
    eprint!("{}", handoff::logging::fatal_error(&message, journal));
    ExitCode::from(u8::try_from(e.code).unwrap_or(1))
}

/// The logger: plain lines on stderr (no colour unless stderr is a terminal), or, when stderr is
/// the journal, lines with their priority prefix and without a timestamp (journald keeps its
/// own); filtered by `RUST_LOG` if set, else by the config's `[log] level`, which SIGHUP reloads.
struct Logs {
    filter: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

impl Logs {
    fn init(default_level: &str) -> Self {
        let env = EnvFilter::try_from_default_env().ok();
        let from_env = env.is_some();
        let filter = env.unwrap_or_else(|| EnvFilter::new(default_level));
        let (filter, handle) = reload::Layer::new(filter);
        let is_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let journal = handoff::logging::stderr_is_journal();
        let plain = (!journal).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(is_terminal)
        });
        let journald = journal.then(|| {
            let format = tracing_subscriber::fmt::format()
                .without_time()
                .with_ansi(false);
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .event_format(handoff::logging::JournalFormat::new(format))
        });
        tracing_subscriber::registry()
            .with(filter)
            .with(plain)
            .with(journald)
            .init();
        Self {
            filter: handle,
            from_env,
        }
    }

    /// Applies the config's level unless `RUST_LOG` decides. The level was validated with the
    /// config.
    fn set_level(&self, level: &str) {
        if self.from_env {
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                if let Err(e) = self.filter.reload(filter) {
                    tracing::warn!("cannot change the log level: {e}");
                }
            }
            Err(e) => tracing::warn!("log level {level:?} not applied: {e}"),
        }
    }
}

async fn run(
    command: Command,
    demo_isolated: Option<std::io::Result<()>>,
    logs: Logs,
) -> Result<(), CliError> {
    match command {
        Command::Id { state_dir } => cli::print_id(&state_dir),
        Command::Completions { shell } => cli::print_completions(shell),
        Command::Man { dir } => cli::print_man(dir.as_deref()),
        Command::Doctor { config, wait, out } => {
            let config = DaemonConfig::load(&config)?;
            let wait = std::time::Duration::from_secs_f64(wait.clamp(0.0, 60.0));
            let report = handoff::doctor::run(&config, wait).await;
            cli::print_doctor(&report, out.json)
        }
        Command::Config {
            action:
                ConfigAction::Check {
                    config,
                    kind,
                    reload,
                },
        } => cli::check_config(&config, kind, reload),
        Command::Daemon { config: path } => {
            let config = DaemonConfig::load(&path)?;
            config.check_files()?;
            logs.set_level(&config.log_level);
            let mut signals = Signals::new()?;
            service::raise_open_files_limit(service::OPEN_FILES_SPARE, "the daemon");
            let daemon = Daemon::start(config, DaemonOptions::default())
                .await
                .map_err(|e| CliError {
                    code: e.exit_code(),
                    message: e.to_string(),
                })?;
            service::notify(&format!(
                "READY=1\nSTATUS=serving as {}",
                daemon.id().short()
            ));
            let watchdog = service::spawn_watchdog();
            while signals.next().await == Signal::Reload {
                service::reloading();
                match DaemonConfig::load(&path) {
                    Ok(config) => {
                        logs.set_level(&config.log_level);
                        daemon.reload(&config);
                    }
                    Err(e) => tracing::error!(
                        "config not reloaded, keeping the running one: {}",
                        one_line(&e)
                    ),
                }
                service::notify("READY=1");
            }
            service::notify("STOPPING=1");
            daemon.shutdown().await;
            watchdog.inspect(|w| w.abort());
            Ok(())
        }
        Command::Server { config: path } => {
            let config = ServerConfig::load(&path)?;
            config.check_files()?;
            logs.set_level(&config.log_level);
            let mut signals = Signals::new()?;
            if config.http.is_some() {
                service::raise_open_files_limit(
                    config.limits.http_max_connections as u64 + service::OPEN_FILES_SPARE,
                    "[limits] http_max_connections",
                );
            } else {
                service::raise_open_files_limit(service::OPEN_FILES_SPARE, "the server");
            }
            let identity = Identity::load_or_create(&config.state_dir).map_err(|e| CliError {
                code: e.exit_code(),
                message: e.to_string(),
            })?;
            let server = Server::start(identity, &config)
                .await
                .map_err(|e| CliError {
                    code: e.exit_code(),
                    message: e.to_string(),
                })?;
            service::notify(&format!(
                "READY=1\nSTATUS=serving as {}",
                server.id().short()
            ));
            let watchdog = service::spawn_watchdog();
            while signals.next().await == Signal::Reload {
                service::reloading();
                match ServerConfig::load(&path) {
                    Ok(new) => {
                        logs.set_level(&new.log_level);
                        let fixed = config.needs_restart(&new);
                        tracing::info!("config reloaded: log.level = {:?}", new.log_level);
                        if !fixed.is_empty() {
                            tracing::warn!(
                                keys = ?fixed,
                                "changed in the config file but not reloadable; \
                                 restart the server to apply"
                            );
                        }
                    }
                    Err(e) => tracing::error!(
                        "config not reloaded, keeping the running one: {}",
                        one_line(&e)
                    ),
                }
                service::notify("READY=1");
            }
            service::notify("STOPPING=1");
            server.shutdown().await;
            watchdog.inspect(|w| w.abort());
            Ok(())
        }
        Command::Player { config, socket } => {
            let (config, socket) = cli::player_setup(config.as_deref(), socket)?;
            logs.set_level("info");
            let mut signals = Signals::new()?;
            let options = handoff::player::PlayerOptions {
                bus: None,
                control_socket: socket,
            };
            let player = handoff::player::Player::start(config, options)
                .await
                .map_err(|e| CliError::new(e.to_string()))?;
            service::notify("READY=1");
            let result = loop {
                tokio::select! {
                    signal = signals.next() => match signal {
                        Signal::Stop => break Ok(()),
                        Signal::Reload => tracing::warn!(
                            "[player] is read at start: restart `handoff player` to apply changes"
                        ),
                    },
                    reason = player.failed() => break Err(CliError::new(reason)),
                }
            };
            service::notify("STOPPING=1");
            player.shutdown().await;
            result
        }
        Command::Demo => {
            match demo_isolated {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    return Err(CliError::new(format!(
                        "cannot create a private network namespace for the demo ({e}); \
                         run it as root or enable unprivileged user namespaces \
                         (sysctl kernel.unprivileged_userns_clone=1)"
                    )))
                }
                None => {}
            }
            let dir = handoff::demo::scratch_dir().map_err(|e| CliError::new(e.to_string()))?;
            let result = handoff::demo::run(&dir).await;
            let _ = std::fs::remove_dir_all(&dir);
            result.map_err(|e| CliError::new(format!("{e:#}")))
        }
        other => cli::run_client(other).await,
    }
}

/// An error on one log line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    /// SIGTERM or SIGINT: shut down.
    Stop,
    /// SIGHUP: reload the config file.
    Reload,
}

/// The signals a long-running program handles, installed before it reports ready.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, CliError> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind| {
            signal(kind).map_err(|e| CliError::new(format!("cannot install signal handlers: {e}")))
        };
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => {
                tracing::info!("SIGTERM received");
                Signal::Stop
            }
            _ = self.int.recv() => {
                tracing::info!("SIGINT received");
                Signal::Stop
            }
            _ = self.hup.recv() => {
                tracing::info!("SIGHUP received: reloading the config");
                Signal::Reload
            }
        }
    }
}
