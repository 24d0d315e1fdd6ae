//! What an image must be for its tender, checked before it becomes a deployment.
//!
//! A process instance's root holds nothing of the host: no loader, no shared library. An
//! image that names an interpreter (`PT_INTERP`, a dynamically linked program) would build,
//! get a DNS name, and then fail every boot. So a `process` image must be:
//!
//! 1. an ELF file, 64-bit, little-endian, for x86-64;
//! 2. an executable (`ET_EXEC`, or `ET_DYN` for a static position-independent one);
//! 3. without `PT_INTERP`: statically linked.
//!
//! A `qemu` image is a kernel: any ELF for x86-64 (the PVH entry note is qemu's to check).

use std::io::{self, Read, Seek, SeekFrom};

use crate::manifest::TenderKind;

/// What to tell a pusher whose process image is dynamically linked.
pub const LINK_STATICALLY: &str = "link it statically: for Rust, `-C target-feature=+crt-static` \
     (in .cargo/config.toml: [build] rustflags = [\"-C\", \"target-feature=+crt-static\"]) \
     and an explicit --target; for C, `-static`";

/// Why an image cannot run on its tender.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Not an ELF file at all.
    #[error("image `{name}` is not an ELF executable")]
    NotElf {
        /// The image's file name.
        name: String,
    },
    /// An ELF for another machine or class.
    #[error("image `{name}` is not a 64-bit x86-64 ELF ({what})")]
    WrongMachine {
        /// The image's file name.
        name: String,
        /// What it is instead.
        what: String,
    },
    /// A dynamically linked program.
    #[error(
        "image `{name}` is dynamically linked (it asks for the loader {interpreter}), and a \
         process instance has no libraries: {LINK_STATICALLY}"
    )]
    Dynamic {
        /// The image's file name.
        name: String,
        /// Its `PT_INTERP`.
        interpreter: String,
    },
    /// The file could not be read.
    #[error("cannot read image `{name}`")]
    Read {
        /// The image's file name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;
/// Program headers read at most (a real program has a dozen).
const MAX_PROGRAM_HEADERS: u16 = 256;

/// Checks that `file` (named `name`) can run on `tender` (see the module doc).
pub fn check<R: Read + Seek>(
    name: &str,
    tender: TenderKind,
    mut file: R,
) -> Result<(), ImageError> {
    let read_error = |source| ImageError::Read {
        name: name.to_owned(),
        source,
    };
    let mut header = [0u8; 64];
    if let Err(error) = file.read_exact(&mut header) {
        return if error.kind() == io::ErrorKind::UnexpectedEof {
            Err(ImageError::NotElf {
                name: name.to_owned(),
            })
        } else {
            Err(read_error(error))
        };
    }
    if &header[..4] != b"\x7fELF" {
        return Err(ImageError::NotElf {
            name: name.to_owned(),
        });
    }
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let u64_at = |at: usize| {
        u64::from_le_bytes(
            header[at..at + 8]
                .try_into()
                .expect("8 bytes of a 64-byte header"),
        )
    };
    let machine = u16_at(18);
    if header[4] != 2 || header[5] != 1 || machine != EM_X86_64 {
        return Err(ImageError::WrongMachine {
            name: name.to_owned(),
            what: format!(
                "class {}, data encoding {}, machine {machine}",
                header[4], header[5]
            ),
        });
    }
    if tender == TenderKind::Qemu {
        return Ok(());
    }
    let kind = u16_at(16);
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(ImageError::NotElf {
            name: name.to_owned(),
        });
    }
    let (offset, size, count) = (u64_at(32), u16_at(54), u16_at(56).min(MAX_PROGRAM_HEADERS));
    if size < 56 {
        return Err(ImageError::NotElf {
            name: name.to_owned(),
        });
    }
    let mut entry = vec![0u8; usize::from(size)];
    for index in 0..u64::from(count) {
        file.seek(SeekFrom::Start(offset + index * u64::from(size)))
            .map_err(read_error)?;
        file.read_exact(&mut entry).map_err(read_error)?;
        let kind = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes"));
        if kind != PT_INTERP {
            continue;
        }
        let at = u64::from_le_bytes(entry[8..16].try_into().expect("8 bytes"));
        let length = u64::from_le_bytes(entry[32..40].try_into().expect("8 bytes")).min(256);
        let mut interpreter = vec![0u8; length as usize];
        file.seek(SeekFrom::Start(at)).map_err(read_error)?;
        file.read_exact(&mut interpreter).map_err(read_error)?;
        let interpreter = String::from_utf8_lossy(&interpreter)
            .trim_end_matches('\0')
            .to_owned();
        return Err(ImageError::Dynamic {
            name: name.to_owned(),
            interpreter,
        });
    }
    Ok(())
}

/// [`check`] of the file at `path`, named `name` in messages.
pub fn check_path(
    name: &str,
    tender: TenderKind,
    path: &std::path::Path,
) -> Result<(), ImageError> {
    let file = std::fs::File::open(path).map_err(|source| ImageError::Read {
        name: name.to_owned(),
        source,
    })?;
    check(name, tender, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_file(path: &str, tender: TenderKind) -> Result<(), ImageError> {
        check_path("x", tender, std::path::Path::new(path))
    }

    #[test]
    fn a_dynamic_program_is_refused_with_how_to_link_statically() {
        // /bin/sh of any distribution is dynamically linked.
        let error = check_file("/bin/sh", TenderKind::Process).expect_err("dynamic");
        let message = error.to_string();
        assert!(message.contains("dynamically linked"), "{message}");
        assert!(message.contains("ld-linux"), "{message}");
        assert!(message.contains("crt-static"), "{message}");
        // A kernel image is only checked to be an x86-64 ELF.
        assert!(check_file("/bin/sh", TenderKind::Qemu).is_ok());
    }

    #[test]
    fn what_is_not_an_elf_is_said_so() {
        for bytes in [&b""[..], b"#!/bin/sh\necho hi\n", &[0u8; 100]] {
            let error =
                check("x", TenderKind::Process, io::Cursor::new(bytes)).expect_err("no ELF");
            assert!(matches!(error, ImageError::NotElf { .. }), "{error}");
        }
        let mut arm = [0u8; 64];
        arm[..4].copy_from_slice(b"\x7fELF");
        arm[4] = 2;
        arm[5] = 1;
        arm[18] = 183; // EM_AARCH64
        let error = check("x", TenderKind::Process, io::Cursor::new(arm)).expect_err("aarch64");
        assert!(matches!(error, ImageError::WrongMachine { .. }), "{error}");
    }

    #[test]
    fn a_static_program_passes() {
        // A minimal static ELF: header and one PT_LOAD, no PT_INTERP.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[16] = ET_EXEC as u8;
        elf[18] = EM_X86_64 as u8;
        elf[32] = 64; // e_phoff
        elf[54] = 56; // e_phentsize
        elf[56] = 1; // e_phnum
        elf[64] = 1; // PT_LOAD
        assert!(check("x", TenderKind::Process, io::Cursor::new(elf)).is_ok());
    }
}
