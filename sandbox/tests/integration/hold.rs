//! Signals held for an upgrade's `execve` (`parent::hold_signals`): one sent to the process
//! stays pending on the main thread whichever thread the kernel gives it to, instead of
//! being taken by another thread's handler and lost with the `execve`.
//!
//! `parent::serve` takes over the thread that calls it for the rest of the process, so the
//! test runs in a child process: this test binary again, running this test alone.

use std::process::Command;
use std::time::{Duration, Instant};

use revboot_sandbox::parent;

/// Set in the child's environment.
const CHILD: &str = "REVBOOT_TEST_HOLD_CHILD";
/// This test's name, for the child's filter.
const NAME: &str = "hold::a_sigterm_held_for_an_exec_stays_pending_on_the_main_thread";

#[test]
fn a_sigterm_held_for_an_exec_stays_pending_on_the_main_thread() {
    if std::env::var_os(CHILD).is_none() {
        let exe = std::env::current_exe().expect("the test binary");
        let output = Command::new(exe)
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("run the child");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && text.contains("1 passed"),
            "{:?}\n{text}",
            output.status
        );
        return;
    }
    parent::serve(|| {
        // As the daemon does once its handlers are in: a SIGTERM is noted from now on,
        // by whichever thread takes it, and ends nothing.
        parent::unblock_signals().expect("unblock");
        parent::hold_signals().expect("hold");
        // The harness's threads and this one do not block it: one of them may take it.
        let pid = std::process::id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let pending = loop {
            let pending = parent::pending_signals().expect("sigpending");
            if !pending.is_empty() || parent::stop_signalled() || Instant::now() > deadline {
                break pending;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(pending, [libc::SIGTERM], "taken and lost instead");
        assert!(!parent::stop_signalled(), "a handler took it");
    });
}
