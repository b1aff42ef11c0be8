//! Telling systemd (Type=notify, sd_notify(3)) where the service is.

/// Sends `state` to systemd; a no-op without NOTIFY_SOCKET. A failure is
/// logged and otherwise ignored: the milter serves either way.
pub fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
