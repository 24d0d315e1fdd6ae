//! Under a service manager (`$NOTIFY_SOCKET`, systemd's `Type=notify`), the daemon says
//! `READY=1` once it serves, with a status line naming its addresses, and `STOPPING=1`
//! when it begins to stop.

use std::os::unix::net::UnixDatagram;

use crate::support::{Daemon, PATIENCE, Setup};

/// The next datagram on the socket, as text (bounded by [`PATIENCE`]).
fn next(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let length = socket.recv(&mut buffer).expect("a notification in time");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}

#[test]
fn the_daemon_tells_the_service_manager_it_is_ready_and_stopping() {
    let temp = tempfile::tempdir().expect("temp dir");
    let path = temp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let daemon = Daemon::start_setup(
        &temp.path().join("data"),
        &Setup {
            env: &[("NOTIFY_SOCKET", path.as_os_str())],
            ..Setup::default()
        },
    );
    // Daemon::start_setup returned once the log said it serves: READY=1 came with it.
    let ready = next(&socket);
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready}");
    let status = format!(
        "STATUS=serving HTTP on {}, DNS on {}",
        daemon.http, daemon.dns
    );
    assert!(lines.contains(&status.as_str()), "{ready}");
    daemon.stop();
    let stopping = next(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}
