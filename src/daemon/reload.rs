//! SIGHUP: re-reading the config file while the daemon runs, without dropping connections.
//!
//! The trust list (`[trust] accept` and `peers`; a peer dropped from it also loses its live link
//! at the server, as with `handoff untrust`), the follow list (`[follow]`) and the hook
//! (`[hooks] on_push`) take effect at once; the log level is applied by the binary, which owns
//! the logger. Everything else is bound at start (sockets, identity, the server link, limits) and
//! is named in the report so the log can say a restart is needed.

use tracing::{info, warn};

use super::{lock, Daemon};
use crate::config::DaemonConfig;

/// The parts of the config that may change while the daemon runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LiveConfig {
    pub follow_peers: Vec<crate::identity::TerminalId>,
    pub follow_auto: bool,
    pub on_push: Vec<String>,
    pub hook_schemes: Vec<String>,
}

impl LiveConfig {
    pub fn of(config: &DaemonConfig) -> Self {
        Self {
            follow_peers: config.follow_peers.clone(),
            follow_auto: config.follow_auto,
            on_push: config.on_push.clone(),
            hook_schemes: config.hook_schemes.clone(),
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// What changed and now applies, one phrase each (e.g. "trust.peers: +1 -0").
    pub applied: Vec<String>,
    /// Keys whose new value differs but needs a restart to apply.
    pub needs_restart: Vec<&'static str>,
}

impl Daemon {
    /// Applies the reloadable parts of `new` (see the module docs) and reports the rest.
    pub fn reload(&self, new: &DaemonConfig) -> ReloadReport {
        let sh = &self.shared;
        let mut report = ReloadReport::default();
        let old_policy = sh.trust.policy();
        let (added, removed) = sh.trust.set_config(new.accept, &new.trusted_peers);
        if !added.is_empty() || !removed.is_empty() {
            report
                .applied
                .push(format!("trust.peers: +{} -{}", added.len(), removed.len()));
        }
        if new.accept != old_policy {
            report
                .applied
                .push(format!("trust.accept: {:?}", new.accept));
        }
        // A peer no longer trusted loses its live link now, as with `handoff untrust`.
        for id in removed.into_iter().filter(|id| !sh.trust.is_trusted(id)) {
            let daemon = self.clone();
            self.spawn(
                async move {
                    let at = match daemon.shared.trust.note_dropped(id) {
                        Ok(at) => at,
                        Err(e) => {
                            warn!("{e}");
                            crate::net::unix_now()
                        }
                    };
                    let revoked = daemon.revoke_at_server(id, at).await;
                    info!(peer = %id.short(), revoked = ?revoked.removed(), "no longer trusted after reload");
                },
                tracing::info_span!("revoke"),
            );
        }
        let live = LiveConfig::of(new);
        {
            let mut current = lock(&sh.live);
            if (&current.follow_peers, current.follow_auto)
                != (&live.follow_peers, live.follow_auto)
            {
                report.applied.push(format!(
                    "follow: {} peers, auto = {}",
                    live.follow_peers.len(),
                    live.follow_auto
                ));
            }
            if current.hook_schemes != live.hook_schemes {
                report.applied.push("hooks.schemes".to_string());
            }
            if current.on_push != live.on_push {
                report.applied.push("hooks.on_push".to_string());
            }
            *current = live;
        }
        // Compared with the config the daemon started with: these stay as they were.
        let running = &sh.config;
        let fixed = [
            ("name", new.name != running.name),
            ("state_dir", new.state_dir != running.state_dir),
            (
                "control_socket",
                new.control_socket != running.control_socket,
            ),
            ("discovery.interfaces", new.interfaces != running.interfaces),
            ("quic.listen", new.listen != running.listen),
            ("server", new.server != running.server),
            ("trust.lease_secs", new.lease != running.lease),
            ("limits", new.limits != running.limits),
            (
                "metrics.listen",
                new.metrics_listen != running.metrics_listen,
            ),
            ("control.group", new.control_group != running.control_group),
        ];
        report.needs_restart = fixed
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| key)
            .collect();
        // The follow task re-examines its set on peer-table changes.
        sh.peer_changes.send_modify(|n| *n += 1);
        info!(applied = ?report.applied, "config reloaded");
        if !report.needs_restart.is_empty() {
            warn!(
                keys = ?report.needs_restart,
                "changed in the config file but not reloadable; restart the daemon to apply"
            );
        }
        report
    }
}
