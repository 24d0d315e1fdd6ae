//! Instances of the qemu tender restored from a snapshot of a ready guest, against real
//! `qemu-system-x86_64` and `examples/hello-vm`: the first boot is cold and saves the
//! snapshot, later ones restore it into a qemu started ahead; each restored guest reseeds
//! from the seed its own qemu gives it; a snapshot that does not match is refused, and the
//! instance boots cold.
//!
//! Each test copies the image into a directory of its own: the snapshot is stored beside it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use revboot_deployer::tender::qemu::{QemuConfig, QemuTender};
use revboot_deployer::tender::{Running, Tender};

use super::qemu::{PATIENCE, REVISION, build_image, console, exit_of, get, host, manifest, spec};

/// A tender that restores, with one qemu kept waiting.
fn tender(dir: &Path) -> Arc<dyn Tender> {
    let config = QemuConfig {
        restore: true,
        pool: 1,
        ..QemuConfig::default()
    };
    Arc::new(QemuTender::new(config, &host(dir, "qemu-restore")).expect("qemu tender"))
}

/// The hello-vm image, copied into `dir`.
async fn image(dir: &Path) -> PathBuf {
    let built = tokio::task::spawn_blocking(|| build_image(None))
        .await
        .expect("build task");
    let image = dir.join("hello-vm");
    std::fs::copy(built, &image).expect("copy the image");
    image
}

/// Boots instance `id` of hello-vm from `image` and waits until it is ready.
async fn ready(tender: &Arc<dyn Tender>, dir: &Path, image: &Path, id: &str) -> Box<dyn Running> {
    let manifest = manifest();
    let spec = spec(id, dir.join("scratch").join(id));
    let prepared = tender.prepare(spec).expect("prepare");
    let running = tokio::time::timeout(PATIENCE, prepared.boot(image.to_owned()))
        .await
        .expect("boot in time")
        .unwrap_or_else(|error| panic!("qemu starts: {error}"));
    running
        .ready(&manifest.run.ready, PATIENCE)
        .await
        .unwrap_or_else(|error| panic!("not ready: {error}\n{}", console(&*running)));
    running
}

async fn stop(running: &dyn Running) {
    running.stop();
    exit_of(running).await;
}

/// `GET /id`: (random value, ISN of the connection's SYN-ACK).
async fn id(running: &dyn Running) -> (String, String) {
    let response = get(running.backend(), "/id").await;
    let body = response.rsplit("\r\n\r\n").next().unwrap_or("").trim();
    let words: Vec<&str> = body.split_whitespace().collect();
    match words[..] {
        ["random", random, "isn", isn] => (random.to_owned(), isn.to_owned()),
        _ => panic!("not an /id answer: {response}"),
    }
}

/// Waits (bounded) until the console of `running` holds `text`.
async fn console_shows(running: &dyn Running, text: &str) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let tail = console(running);
        if tail.contains(text) {
            return tail;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{text:?} not on the console:\n{tail}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn meta_path(image: &Path) -> PathBuf {
    image
        .with_file_name("hello-vm.snapshots")
        .join(format!("{REVISION}.json"))
}

#[tokio::test]
async fn two_instances_restored_from_one_snapshot_draw_different_random_values_and_isns() {
    let dir = tempfile::tempdir().expect("dir");
    let image = image(dir.path()).await;
    let tender = tender(dir.path());

    let first = ready(&tender, dir.path(), &image, "cold").await;
    let text = console(&*first);
    assert!(text.contains("hello-vm: listening"), "{text}");
    assert!(text.contains("snapshot of the ready guest saved"), "{text}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(meta_path(&image)).expect("snapshot record"))
            .expect("JSON");
    assert!(
        record["qemu"].as_str().is_some_and(|v| !v.is_empty()),
        "{record}"
    );
    // The snapshot does not stop the guest it was taken from.
    assert!(get(first.backend(), "/").await.contains("hello from v1"));
    stop(&*first).await;

    let a = ready(&tender, dir.path(), &image, "restored-a").await;
    let b = ready(&tender, dir.path(), &image, "restored-b").await;
    for vm in [&a, &b] {
        let text = console(&**vm);
        assert!(
            text.contains("[revboot] restored from the snapshot"),
            "{text}"
        );
        assert!(
            !text.contains("hello-vm: listening"),
            "booted, not restored:\n{text}"
        );
        let answer = get(vm.backend(), "/").await;
        assert!(
            answer.ends_with(&format!("hello from v1 ({REVISION})\n")),
            "{answer}"
        );
    }
    // The qemu restored into is sandboxed as a cold one is.
    let pid = a.footprint().pid.expect("a pid");
    let field = |name: &str| crate::support::proc_status(pid, name);
    assert_ne!(field("Uid:"), "0");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("CapEff:"), "0000000000000000");

    let (random_a, isn_a) = id(&*a).await;
    let (random_b, isn_b) = id(&*b).await;
    assert_ne!(
        random_a, random_b,
        "two restored guests drew the same random value"
    );
    assert_ne!(isn_a, isn_b, "two restored guests chose the same TCP ISN");
    assert_ne!(isn_a, "unknown");
    console_shows(&*a, "hello-vm: restored with a new seed, reseeded").await;
    stop(&*a).await;
    stop(&*b).await;
}

/// The snapshot record beside `image`.
fn record(image: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(meta_path(image)).expect("snapshot record"))
        .expect("JSON")
}

/// Rewrites `key` of the snapshot record beside `image`, as if made elsewhere.
fn forge(image: &Path, key: &str, value: &str) {
    let mut record = record(image);
    record[key] = value.into();
    std::fs::write(meta_path(image), record.to_string()).expect("rewrite the record");
}

#[tokio::test]
async fn a_snapshot_from_another_qemu_or_other_settings_is_refused_and_the_instance_boots_cold() {
    let dir = tempfile::tempdir().expect("dir");
    let image = image(dir.path()).await;
    let tender = tender(dir.path());
    let first = ready(&tender, dir.path(), &image, "first").await;
    stop(&*first).await;
    let qemu = record(&image)["qemu"].clone();

    // The same tender; then another, which has not met qemu yet and learns its version
    // from the qemu that would restore.
    let cases = [
        (
            "qemu",
            "6.2.0 (elsewhere)",
            false,
            "snapshot refused: it was made by qemu 6.2.0 (elsewhere)",
        ),
        (
            "settings",
            "-m 64M",
            false,
            "snapshot refused: it was made with other settings",
        ),
        (
            "qemu",
            "6.2.0 (elsewhere)",
            true,
            "snapshot not restored: it was made by qemu 6.2.0 (elsewhere)",
        ),
    ];
    for (n, (key, value, fresh, refusal)) in cases.into_iter().enumerate() {
        forge(&image, key, value);
        let tender = if fresh {
            self::tender(dir.path())
        } else {
            Arc::clone(&tender)
        };
        let vm = ready(&tender, dir.path(), &image, &format!("case-{n}")).await;
        let text = console(&*vm);
        assert!(text.contains(refusal), "{text}");
        assert!(
            text.contains("hello-vm: listening"),
            "not booted cold:\n{text}"
        );
        // Its own snapshot replaces the refused one.
        assert!(text.contains("snapshot of the ready guest saved"), "{text}");
        stop(&*vm).await;
        assert_eq!(record(&image)["qemu"], qemu);
        assert_ne!(record(&image)["settings"], "-m 64M");
    }
}
