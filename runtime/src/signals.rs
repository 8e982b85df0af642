//! The signals both binaries stop on, and SIGHUP, which never stops them.

/// SIGTERM and SIGINT, listened to from creation on: a second signal sent right after the first
/// is not lost between two listeners.
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Also takes SIGHUP over from its default (ending the process): it reloads TLS certificates
    /// where there are some (`tls::ReloadingCert`), and is logged and otherwise ignored, so that
    /// `systemctl reload` is safe on a node without TLS.
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: TLS certificates, if any, are read again; nothing else is reloaded");
            }
        });
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// The next SIGTERM or SIGINT (including one that came since the last call).
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
