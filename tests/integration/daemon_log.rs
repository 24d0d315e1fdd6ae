//! What the daemon writes to its log: plain text when it is not a terminal.

use crate::support::Daemon;

#[test]
fn log_file_has_no_colour_codes() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let log = daemon.stop();
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log written to a file:\n{log}"
    );
}
