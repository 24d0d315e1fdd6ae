//! The qemu tender's accelerator: hardware KVM when the CPU and `/dev/kvm` allow it, TCG
//! otherwise, unless the configuration or `REVBOOT_QEMU_ACCEL` says which.

use std::fs::OpenOptions;

use serde::{Deserialize, Serialize};
use tracing::info;

use super::QemuSetupError;

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when the CPU has hardware virtualisation and `/dev/kvm` opens, TCG otherwise.
    #[default]
    Auto,
    /// Hardware KVM; the tender refuses to start without it.
    Kvm,
    /// qemu's emulator: works everywhere, visibly slower.
    Tcg,
}

/// The accelerator in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// TCG emulation.
    Tcg,
}

impl Accel {
    pub(super) fn as_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether hardware KVM is usable: the CPU flags say so and `/dev/kvm` opens.
pub fn kvm_usable() -> Result<(), String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|error| format!("cannot read /proc/cpuinfo: {error}"))?;
    let hardware = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| {
            line.split_whitespace()
                .any(|flag| flag == "vmx" || flag == "svm")
        });
    if !hardware {
        return Err("the CPU shows neither vmx nor svm".into());
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|error| format!("cannot open /dev/kvm: {error}"))
}

pub(super) fn resolve_accel(choice: AccelChoice) -> Result<Accel, QemuSetupError> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => kvm_usable()
            .map(|()| Accel::Kvm)
            .map_err(QemuSetupError::NoKvm),
        AccelChoice::Auto => Ok(match kvm_usable() {
            Ok(()) => Accel::Kvm,
            Err(why) => {
                info!(why, "qemu tender: no hardware KVM, using TCG");
                Accel::Tcg
            }
        }),
    }
}

pub(super) fn accel_from_env(value: &str) -> Result<AccelChoice, QemuSetupError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "kvm" => Ok(AccelChoice::Kvm),
        "tcg" => Ok(AccelChoice::Tcg),
        "auto" | "" => Ok(AccelChoice::Auto),
        _ => Err(QemuSetupError::BadAccel(value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_override_is_parsed_strictly() {
        assert_eq!(accel_from_env("TCG"), Ok(AccelChoice::Tcg));
        assert_eq!(accel_from_env("kvm"), Ok(AccelChoice::Kvm));
        assert_eq!(accel_from_env("auto"), Ok(AccelChoice::Auto));
        assert_eq!(
            accel_from_env("hvf"),
            Err(QemuSetupError::BadAccel("hvf".into()))
        );
    }
}
