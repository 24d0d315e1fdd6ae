//! `revboot demo`: the whole journey on one machine, in one command.
//!
//! 1. Start the daemon with the embedded defaults (or the configuration given), reads open
//!    to anyone who can reach it (`[http] public_reads = true`): the demo has one user, on
//!    this machine. `revboot serve` keeps reads behind the token.
//! 2. Write the hello service into `<data>/demo/hello` — its sources are built into the
//!    binary ([`HELLO`], from `examples/hello`), so an installed `revboot` needs no source
//!    tree; `--examples <dir>` takes `<dir>/hello` instead — make it a git repository and
//!    push it with stock git over smart HTTP, as a user would: revision `v1`.
//! 3. Change its `REVISION` line, commit and push again: `v2` goes live.
//! 4. Print what to try (`dig`, `curl --resolve`, `revboot log`, `revboot rollback`) and keep
//!    serving until SIGINT/SIGTERM (or stop at once with `--once`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};
use tokio::process::Command;

use crate::config::Config;
use crate::daemon::{Daemon, DaemonInfo, termination};

/// The files of `examples/hello`, built into the binary: (path, contents).
pub const HELLO: &[(&str, &[u8])] = &[
    (
        ".cargo/config.toml",
        include_bytes!("../examples/hello/.cargo/config.toml"),
    ),
    (".gitignore", include_bytes!("../examples/hello/.gitignore")),
    ("Cargo.lock", include_bytes!("../examples/hello/Cargo.lock")),
    ("Cargo.toml", include_bytes!("../examples/hello/Cargo.toml")),
    (
        "revboot.toml",
        include_bytes!("../examples/hello/revboot.toml"),
    ),
    (
        "src/main.rs",
        include_bytes!("../examples/hello/src/main.rs"),
    ),
];

/// Runs the demo, with the hello service of `examples` (`<examples>/hello`) or the one
/// built in.
pub async fn demo(mut config: Config, examples: Option<&Path>, once: bool) -> anyhow::Result<()> {
    if let Some(examples) = examples
        && !examples.join("hello").join("revboot.toml").is_file()
    {
        bail!("{} has no hello/revboot.toml", examples.display());
    }
    config.http.public_reads = true;
    let daemon = Daemon::start(config).await?;
    let info = daemon.info().clone();
    say(
        "demo: reads (API, /metrics, logs, git clone) need no token here ([http] public_reads = true); `revboot serve` asks for it\n",
    );
    let result = push_examples(&info, examples).await;
    match result {
        Ok(()) => say(&instructions(&info)),
        Err(error) => {
            say(&format!("demo: {error:#}\n"));
            daemon.shutdown().await;
            return Err(error);
        }
    }
    if !once {
        termination().await;
    }
    daemon.shutdown().await;
    Ok(())
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

async fn push_examples(info: &DaemonInfo, examples: Option<&Path>) -> anyhow::Result<()> {
    let work = info.data.join("demo").join("hello");
    if work.join(".git").exists() {
        say(&format!(
            "demo: {} was pushed before; pushing it again\n",
            work.display()
        ));
        return push(info, &work).await;
    }
    // A new checkout starts a new history, which git refuses to put over a `hello` pushed
    // from elsewhere (the README's walkthrough, say): say so before trying.
    let source = info.data.join("src").join("hello.git");
    if source.exists() {
        bail!(
            "{} has a `hello` the demo did not make (its source repository {}), whose history \
             the demo's would not continue: run the demo with a data directory of its own, \
             e.g. --data ./revboot-demo",
            info.data.display(),
            source.display()
        );
    }
    match examples {
        Some(examples) => copy_tree(&examples.join("hello"), &work)?,
        None => write_hello(&work)?,
    }
    git(&work, &["init", "-q", "-b", "main"]).await?;
    git(&work, &["add", "."]).await?;
    git(&work, &["commit", "-q", "-m", "hello v1"]).await?;
    say("demo: pushing hello v1 with git push\n");
    push(info, &work).await?;

    let main = work.join("src").join("main.rs");
    let source = std::fs::read_to_string(&main)?;
    let changed = source.replacen(
        "const REVISION: &str = \"v1\";",
        "const REVISION: &str = \"v2\";",
        1,
    );
    if changed == source {
        bail!(
            "{} has no `const REVISION: &str = \"v1\";` line to change",
            main.display()
        );
    }
    std::fs::write(&main, changed)?;
    git(&work, &["commit", "-q", "-am", "hello v2"]).await?;
    say("demo: pushing hello v2\n");
    push(info, &work).await
}

async fn push(info: &DaemonInfo, work: &Path) -> anyhow::Result<()> {
    let status = Command::new("git")
        .args(["push", &info.remote("hello"), "main"])
        .current_dir(work)
        .stdin(Stdio::null())
        .status()
        .await
        .context("Cannot run git push")?;
    if !status.success() {
        bail!("git push failed ({status})");
    }
    Ok(())
}

async fn git(work: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=revboot demo",
            "-c",
            "user.email=demo@revboot.test",
        ])
        .args(args)
        .current_dir(work)
        .stdin(Stdio::null())
        .output()
        .await
        .context("Cannot run git")?;
    if !output.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Writes the built-in hello service into `to`.
fn write_hello(to: &Path) -> anyhow::Result<()> {
    for (path, contents) in HELLO {
        let target = to.join(path);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("Cannot create {}", dir.display()))?;
        }
        std::fs::write(&target, contents)
            .with_context(|| format!("Cannot write {}", target.display()))?;
    }
    Ok(())
}

/// Copies a source tree, leaving out build output.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("Cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("Cannot read {}", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        let target: PathBuf = to.join(&name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn instructions(info: &DaemonInfo) -> String {
    let dns = info.dns;
    let zone = &info.zone;
    let http = info.http;
    let data = info.data.display();
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "revboot".into());
    let cli = if http == crate::config::Http::default().listen {
        format!("{exe} --data {data}")
    } else {
        format!("{exe} --data {data} --url http://{http}")
    };
    format!(
        "
revboot is serving.
  DNS   {dns} (UDP and TCP), zone {zone}
  HTTP  http://{http}  (git smart HTTP at /git/<service>.git, API at /api/v1, /metrics)
  data  {data}

Try:
  # the live revision, and every revision by name (the first query boots it):
  dig @{ip} -p {port} hello.{zone}
  {cli} log hello
  # a request through the handshake proxy:
  curl --resolve hello.{zone}:8080:$(dig +short @{ip} -p {port} hello.{zone}) http://hello.{zone}:8080/
  # roll back to v1 (use the revision `revboot log` shows for v1):
  {cli} rollback hello <v1-revision>
  # push your own change:
  cd {data}/demo/hello && $EDITOR src/main.rs && git commit -am change && git push {remote} main

Stop with Ctrl-C.
",
        ip = dns.ip(),
        port = dns.port(),
        remote = info.remote_hint("hello"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `examples/hello` is built in, as it is: a file added there and not in
    /// [`HELLO`] would be missing from an installed `revboot`'s demo.
    #[test]
    fn the_built_in_hello_is_examples_hello() {
        fn files(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).expect("read examples/hello") {
                let path = entry.expect("entry").path();
                if path.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                if path.is_dir() {
                    files(root, &path, out);
                } else {
                    let name = path
                        .strip_prefix(root)
                        .expect("inside")
                        .to_string_lossy()
                        .into_owned();
                    out.push((name, std::fs::read(&path).expect("read")));
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
        let mut on_disk = Vec::new();
        files(&root, &root, &mut on_disk);
        on_disk.sort();
        let built_in: Vec<(String, Vec<u8>)> = HELLO
            .iter()
            .map(|(path, contents)| ((*path).to_owned(), contents.to_vec()))
            .collect();
        assert_eq!(built_in, on_disk);
    }
}
