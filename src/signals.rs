//! The daemon's stop signals: SIGTERM and SIGINT end `revboot serve` (and `revboot demo`)
//! gracefully; an upgrade in place carries one that came meanwhile to the new program
//! ([`crate::handover`]).

use tracing::{info, warn};

/// Resolves when SIGTERM or SIGINT arrives; their handlers are installed at the call.
pub fn termination() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            warn!("cannot listen for signals; stop the daemon with SIGKILL");
            return std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    }
}
