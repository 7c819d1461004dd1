//! Readiness for systemd (`Type=notify`): `READY=1` on `$NOTIFY_SOCKET` once the programs are
//! attached. The shipped unit starts the agent before udev's coldplug and orders udev after it,
//! so udev's first module loads wait until the agent is watching, not merely started.

use std::os::{
    linux::net::SocketAddrExt as _,
    unix::net::{SocketAddr, UnixDatagram},
};

/// Tells systemd the agent is ready, when it runs under a unit that asks (no socket: nothing
/// to do). A failure is logged, never fatal: the agent works either way.
pub fn ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        // An abstract socket is written with a leading '@'.
        let address = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(b"READY=1", &address)
    })();
    if let Err(err) = sent {
        log::warn!("could not tell systemd the agent is ready ($NOTIFY_SOCKET): {err}");
    }
}
