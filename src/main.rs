//! The `handoff` binary: parses arguments, sets up logging, loads config, runs the library, maps
//! errors to exit codes (78 for bad config, 1 for other failures).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

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
    init_logging(default_level);
    // Long-running programs get worker threads; a one-shot client command starts faster on one.
    let runtime = match cli.command {
        Command::Daemon { .. } | Command::Server { .. } | Command::Demo => {
            tokio::runtime::Runtime::new()
        }
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return fail(CliError::new(format!("cannot start the runtime: {e}"))),
    };
    let result = runtime.block_on(run(cli.command, demo_isolated));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: CliError) -> ExitCode {
    eprintln!("error: {}", e.message.replace('\n', " "));
    ExitCode::from(u8::try_from(e.code).unwrap_or(1))
}

fn init_logging(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let is_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(is_terminal)
        .init();
}

async fn run(command: Command, demo_isolated: Option<std::io::Result<()>>) -> Result<(), CliError> {
    match command {
        Command::Id { state_dir } => cli::print_id(&state_dir),
        Command::Config {
            action: ConfigAction::Check { config, kind },
        } => cli::check_config(&config, kind),
        Command::Daemon { config } => {
            let config = DaemonConfig::load(&config)?;
            let daemon = Daemon::start(config, DaemonOptions::default())
                .await
                .map_err(|e| CliError::new(e.to_string()))?;
            service::notify(&format!(
                "READY=1\nSTATUS=serving as {}",
                daemon.id().short()
            ));
            let watchdog = service::spawn_watchdog();
            wait_for_signal().await;
            service::notify("STOPPING=1");
            daemon.shutdown().await;
            watchdog.inspect(|w| w.abort());
            Ok(())
        }
        Command::Server { config } => {
            let config = ServerConfig::load(&config)?;
            let identity = Identity::load_or_create(&config.state_dir)
                .map_err(|e| CliError::new(e.to_string()))?;
            let server = Server::start(identity, &config)
                .await
                .map_err(|e| CliError::new(e.to_string()))?;
            service::notify(&format!(
                "READY=1\nSTATUS=serving as {}",
                server.id().short()
            ));
            let watchdog = service::spawn_watchdog();
            wait_for_signal().await;
            service::notify("STOPPING=1");
            server.shutdown().await;
            watchdog.inspect(|w| w.abort());
            Ok(())
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

/// Waits for SIGTERM or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
