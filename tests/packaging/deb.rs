//! The Debian package (built by `packaging/deb.sh` with cargo-deb) installs in a clean
//! Debian root, and systemd, booted there in namespaces of its own, starts its unit: the
//! daemon says it is ready through sd_notify and answers on its API, DNS and CLI.
//! `packaging/test-deb.sh` does the namespaces and the asking (as root), in a copy of the
//! clean root that `scripts/test-tools.sh` made once in the target directory (with
//! debootstrap: the test itself reaches no network).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{PROFILE, install_target, installed, run_for, target_dir};

#[test]
fn the_package_installs_in_a_clean_debian_root_and_its_unit_reports_ready() {
    // The package of the binary the install test built (the same profile, so nothing is
    // built twice); CI builds the release one with the same script.
    installed();
    let temp = tempfile::tempdir().expect("temp dir");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = run_for(
        Command::new(manifest.join("packaging/deb.sh"))
            .arg("--output")
            .arg(temp.path())
            .env("REVBOOT_DEB_PROFILE", PROFILE)
            .env("CARGO_TARGET_DIR", install_target()),
        Duration::from_secs(1800),
    );
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    assert!(deb.ends_with(".deb") && Path::new(&deb).is_file(), "{deb}");

    let output = run_for(
        Command::new(manifest.join("packaging/test-deb.sh"))
            .arg(&deb)
            .arg(target_dir().join("packaging-test-debian-root"))
            .arg(temp.path().join("work")),
        Duration::from_secs(1800),
    );
    let said = String::from_utf8_lossy(&output.stdout);
    let line = |key: &str| -> &str {
        said.lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line in:\n{said}"))
    };
    assert_eq!(line("enabled: "), "enabled", "{said}");
    // Type=notify: active only once the daemon said READY=1; the status is its own line.
    assert_eq!(line("unit: "), "active running", "{said}");
    assert_eq!(
        line("status: "),
        "serving HTTP on 127.0.0.1:8080, DNS on 127.0.0.1:5353",
        "{said}"
    );
    // Delegate=yes: the cgroups below the unit's are the daemon's.
    assert_eq!(line("delegate: "), "yes", "{said}");
    assert_eq!(line("cgroup: "), "/system.slice/revboot.service", "{said}");
    assert_eq!(
        line("delegated: "),
        "cgroups go below the cgroup systemd delegated cgroup=/system.slice/revboot.service",
        "{said}"
    );
    let daemon: serde_json::Value =
        serde_json::from_str(line("api: ")).unwrap_or_else(|e| panic!("{e}:\n{said}"));
    assert_eq!(daemon["zone"], "revboot.test", "{said}");
    assert!(line("dns: ").starts_with("ns.revboot.test. "), "{said}");
    assert_eq!(line("cli: "), "[]", "{said}");
}
