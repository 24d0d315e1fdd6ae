//! Store benchmarks.
//!
//! - `resolve/*`: a label → commit on a warm index of 500 deployments.
//! - `write_16mib/*`: one deployment with a 16 MiB image through the store, and the same
//!   content through stock git plumbing (`hash-object -w`, `mktree`, `commit-tree`,
//!   `update-ref`) in the same run; the ratio of medians is printed.
//! - `rebuilds`: 20 rebuilds of a binary-like 16 MiB image, each a small code change away
//!   from the one before, then `Store::repack`; the bytes per rebuild are printed.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used)]

use std::fs;
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};

const GIT: &str = "/usr/local/bin/git";
const MANIFEST: &str = "[build]\ncommand = [\"make\"]\nartifacts = [\"out/hello\"]\n";
const IMAGE: usize = 16 << 20;

fn source(n: u32) -> String {
    format!("{n:08x}").repeat(5)
}

/// Bytes that look like a linked binary: runs of low-entropy "code" (a small opcode
/// alphabet with embedded addresses), string tables, and zero padding.
fn binary_like(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    const OPS: [u8; 16] = [
        0x48, 0x89, 0x8b, 0xe8, 0xc3, 0x55, 0x5d, 0x31, 0xc0, 0x0f, 0x1f, 0x44, 0x74, 0x75, 0xeb,
        0x83,
    ];
    while out.len() < len {
        let kind = next() % 10;
        let run = 64 + (next() % 4096) as usize;
        for i in 0..run {
            let r = next();
            out.push(match kind {
                0 => 0,
                1..=2 => b"abcdefghijklmnopqrstuvwxyz_.:/ \0"[(r % 32) as usize],
                _ if i % 5 == 4 => (r >> 8) as u8,
                _ => OPS[(r % 16) as usize],
            });
        }
    }
    out.truncate(len);
    out
}

/// A one-line source change as the linker shows it: 16 bytes of code are inserted in one
/// function (shifting everything after it), 64 bytes around it change, and 300 call targets
/// and addresses all over the image are relocated (4 bytes each).
fn rebuild(previous: &[u8], n: u64) -> Vec<u8> {
    let mut image = previous.to_vec();
    let at = (image.len() / 3) + (n as usize * 7919) % (image.len() / 3);
    image.splice(at..at, (0..16).map(|i| (n as u8).wrapping_add(i)));
    for byte in &mut image[at + 16..at + 80] {
        *byte = byte.wrapping_add(n as u8 | 1);
    }
    for k in 0..300u64 {
        let at = ((n * 104_729 + k * 1_299_709 + k * k * 7) as usize) % (image.len() - 8);
        image[at..at + 4].copy_from_slice(&((n << 16) as u32 + k as u32).to_le_bytes());
    }
    image.truncate(IMAGE);
    image
}

fn write(store: &Store, n: u32, image: Box<dyn std::io::Read + Send>) -> Revision {
    let source = source(n);
    store
        .write_deployment(NewDeployment {
            service: "bench",
            status: BuildStatus::Succeeded,
            manifest: Some(MANIFEST),
            images: vec![ImageInput {
                name: "hello".into(),
                reader: image,
            }],
            build_log: b"build log\n",
            source_commit: &source,
            source_repo: "bench",
            source_ref: Some("refs/heads/main"),
            subject: "Bench build",
        })
        .expect("write")
}

fn git(repo: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    use std::io::Write;
    let mut child = Command::new(GIT)
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_AUTHOR_NAME", "revboot")
        .env("GIT_AUTHOR_EMAIL", "revboot@localhost")
        .env("GIT_COMMITTER_NAME", "revboot")
        .env("GIT_COMMITTER_EMAIL", "revboot@localhost")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("git");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("stdin");
    }
    drop(input);
    let output = child.wait_with_output().expect("git");
    assert!(output.status.success(), "git {args:?}");
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// The same deployment through stock git plumbing, image read from `image_path`.
/// The same deployment through stock git plumbing, in as few processes as git allows:
/// one `hash-object -w` for the three files, two `mktree`, `commit-tree`, `update-ref`.
fn write_with_git(repo: &Path, n: u32, image_path: &Path) {
    let dir = image_path.parent().unwrap();
    let (manifest_path, log_path) = (dir.join("revboot.toml"), dir.join("build.log"));
    if !manifest_path.exists() {
        fs::write(&manifest_path, MANIFEST).unwrap();
        fs::write(&log_path, "build log\n").unwrap();
    }
    let ids = git(
        repo,
        &[
            "hash-object",
            "-w",
            image_path.to_str().unwrap(),
            manifest_path.to_str().unwrap(),
            log_path.to_str().unwrap(),
        ],
        None,
    );
    let ids: Vec<&str> = ids.lines().collect();
    let (image, manifest, log) = (ids[0], ids[1], ids[2]);
    let image_tree = git(
        repo,
        &["mktree"],
        Some(format!("100755 blob {image}\thello\n").as_bytes()),
    );
    let tree = git(
        repo,
        &["mktree"],
        Some(
            format!("100644 blob {log}\tbuild.log\n040000 tree {image_tree}\timage\n100644 blob {manifest}\trevboot.toml\n")
                .as_bytes(),
        ),
    );
    let message = format!(
        "Bench build\n\nBuild-Status: succeeded\nSource-Commit: {}\nSource-Repo: bench\nSource-Ref: refs/heads/main\n",
        source(n)
    );
    let commit = if repo.join("refs/heads/bench").exists() {
        git(
            repo,
            &["commit-tree", &tree, "-p", "refs/heads/bench"],
            Some(message.as_bytes()),
        )
    } else {
        git(repo, &["commit-tree", &tree], Some(message.as_bytes()))
    };
    git(repo, &["update-ref", "refs/heads/bench", &commit], None);
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn resolve(c: &mut Criterion) {
    if !selected("resolve") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(dir.path().join("d.git")).unwrap();
    let mut last = None;
    for n in 0..500u32 {
        last = Some(write(
            &store,
            n,
            Box::new(std::io::Cursor::new(format!("image {n}").into_bytes())),
        ));
    }
    let last = last.unwrap();
    store.set_live("bench", &last, "bench").unwrap();
    store.tag("bench", "v1", &last).unwrap();
    // Let the ref mtimes settle so that the index trusts its fingerprint.
    std::thread::sleep(Duration::from_secs(1));
    let prefix = last.short(7);
    let source_prefix = source(499)[..10].to_owned();
    assert_eq!(store.resolve("bench", Some(&prefix)).unwrap(), last);
    let mut group = c.benchmark_group("resolve");
    group.bench_function("deployment_prefix", |b| {
        b.iter(|| {
            store
                .resolve(black_box("bench"), Some(black_box(&prefix)))
                .unwrap()
        })
    });
    group.bench_function("source_prefix", |b| {
        b.iter(|| {
            store
                .resolve("bench", Some(black_box(&source_prefix)))
                .unwrap()
        })
    });
    group.bench_function("tag", |b| {
        b.iter(|| store.resolve("bench", Some(black_box("v1"))).unwrap())
    });
    group.bench_function("live", |b| {
        b.iter(|| store.resolve(black_box("bench"), None).unwrap())
    });
    group.finish();
}

fn write_16mib(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(dir.path().join("store.git")).unwrap();
    let plain = dir.path().join("git.git");
    git(
        dir.path(),
        &["init", "--quiet", "--bare", plain.to_str().unwrap()],
        None,
    );
    let image_path = dir.path().join("image");
    let base = binary_like(IMAGE, 42);
    let mut counter = 0u32;
    let next_image = |counter: &mut u32| {
        *counter += 1;
        let mut image = base.clone();
        image[1000..1004].copy_from_slice(&counter.to_le_bytes());
        fs::write(&image_path, &image).unwrap();
    };

    if !selected("write_16mib") {
        return;
    }
    // The comparison of record: interleaved runs, medians, ratio.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        next_image(&mut counter);
        let start = Instant::now();
        write(
            &store,
            counter,
            Box::new(fs::File::open(&image_path).unwrap()),
        );
        ours.push(start.elapsed());
        next_image(&mut counter);
        let start = Instant::now();
        write_with_git(&plain, counter, &image_path);
        theirs.push(start.elapsed());
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        "write_16mib: store {:.1} ms, git plumbing {:.1} ms, ratio {:.2} (goal <= 1.5)",
        ours.as_secs_f64() * 1e3,
        theirs.as_secs_f64() * 1e3,
        ours.as_secs_f64() / theirs.as_secs_f64()
    );

    let mut group = c.benchmark_group("write_16mib");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("store", |b| {
        b.iter_batched(
            || next_image(&mut counter),
            |()| write(&store, 0, Box::new(fs::File::open(&image_path).unwrap())),
            criterion::BatchSize::PerIteration,
        )
    });
    let mut counter = 1_000_000u32;
    let next_image = |counter: &mut u32| {
        *counter += 1;
        let mut image = base.clone();
        image[1000..1004].copy_from_slice(&counter.to_le_bytes());
        fs::write(&image_path, &image).unwrap();
    };
    group.bench_function("git_plumbing", |b| {
        b.iter_batched(
            || next_image(&mut counter),
            |()| write_with_git(&plain, 0, &image_path),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// Not a timing: bytes on disk after 20 rebuilds and a repack, printed once.
fn rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let one = Store::init(dir.path().join("one.git")).unwrap();
    let many = Store::init(dir.path().join("many.git")).unwrap();
    let mut image = binary_like(IMAGE, 7);
    write(&one, 0, Box::new(std::io::Cursor::new(image.clone())));
    write(&many, 0, Box::new(std::io::Cursor::new(image.clone())));
    for n in 1..=20u32 {
        image = rebuild(&image, u64::from(n));
        write(&many, n, Box::new(std::io::Cursor::new(image.clone())));
    }
    let single = one.repack().unwrap();
    let start = Instant::now();
    let report = many.repack().unwrap();
    let took = start.elapsed();
    let per_rebuild = report.bytes_after.saturating_sub(single.bytes_after) / 20;
    println!(
        "rebuilds: one 16 MiB image packs to {} bytes; 21 builds: {} bytes loose -> {} bytes packed in {:.1} s; \
         {} bytes per rebuild = {:.3}% of one packed image, {:.4}% of the raw image (goal <= 5%)",
        single.bytes_after,
        report.bytes_before,
        report.bytes_after,
        took.as_secs_f64(),
        per_rebuild,
        per_rebuild as f64 * 100.0 / single.bytes_after as f64,
        per_rebuild as f64 * 100.0 / IMAGE as f64,
    );
}

criterion_group!(benches, resolve, write_16mib);

/// Whether the command line's filter (if any) selects `name`.
fn selected(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

fn main() {
    if selected("rebuilds") {
        rebuilds();
    }
    if selected("resolve") || selected("write_16mib") {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}
