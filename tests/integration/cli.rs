//! The CLI as a user of its peers meets it: `revboot login` once, then every command from
//! any directory with no environment variable, the service taken from the checkout's git
//! remote; shell completions that load in bash, zsh and fish; a manual page that renders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::{
    Daemon, Setup, TOKEN, commit_revision, exits, fresh_pool, git, hello_source, push, run,
    serve_refused_on,
};

/// `program` in `dir` with a clean environment: only `PATH` and a private `HOME` (with
/// `XDG_CONFIG_HOME` and `GIT_CONFIG_GLOBAL` spelled out under it, so that neither the
/// revboot nor the git configuration of the user running the tests is ever read or written).
fn bare(program: &str, home: &Path, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").expect("PATH"))
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("GIT_CONFIG_GLOBAL", home.join(".gitconfig"));
    command
}

/// The CLI with a clean environment ([`bare`]), in `dir`, `stdin` given.
fn bare_cli(home: &Path, dir: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write as _;
    let mut child = bare(env!("CARGO_BIN_EXE_revboot"), home, dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run revboot");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("revboot ends")
}

fn ok(args: &[&str], output: &Output) -> String {
    assert!(
        output.status.success(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json(args: &[&str], output: &Output) -> serde_json::Value {
    let text = ok(args, output);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

#[test]
fn after_login_every_command_works_anywhere_with_no_environment() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let url = format!("http://{}", daemon.http);
    let home = temp.path().join("home");
    let elsewhere = temp.path().join("elsewhere");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::create_dir_all(&elsewhere).expect("elsewhere");
    let config = home.join(".config/revboot/config.toml");

    // A wrong token is refused, and nothing is saved.
    let refused = bare_cli(&home, &elsewhere, &["--json", "login", &url], "wrong\n");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let error: serde_json::Value = serde_json::from_slice(&refused.stdout).expect("JSON error");
    assert_eq!(error["error"], "unauthorized", "{error}");
    assert!(!config.exists());

    // Logged in: the remote is saved, for its owner alone.
    let args = ["login", url.as_str()];
    let said = ok(
        &args,
        &bare_cli(&home, &elsewhere, &args, &format!("{TOKEN}\n")),
    );
    assert!(said.contains("default remote"), "{said}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&config)
        .expect("config")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(&config)
            .expect("read")
            .contains(&url)
    );

    // A checkout whose remote is the daemon, pushed with stock git.
    let work = hello_source(temp.path());
    git(&work, &["remote", "add", "origin", &daemon.remote("hello")]);
    git(&work, &["push", "-q", "origin", "main"]);

    // Elsewhere, with the service named: reads, writes, and the token never in the output.
    let cli = |dir: &Path, args: &[&str]| bare_cli(&home, dir, args, "");
    let json_of = |dir: &Path, args: &[&str]| json(args, &cli(dir, args));
    let services = json_of(&elsewhere, &["--json", "service", "list"]);
    assert_eq!(services[0]["name"], "hello", "{services}");
    let history = json_of(&elsewhere, &["--json", "log", "hello"]);
    let v1 = history[0]["short"].as_str().expect("short").to_owned();
    json_of(&elsewhere, &["--json", "show", "hello", &v1]);
    // One word is the label; meant as the service, the error says it was taken as the label.
    let label_only = cli(&elsewhere, &["show", "hello"]);
    assert_eq!(label_only.status.code(), Some(2), "{label_only:?}");
    let said = String::from_utf8_lossy(&label_only.stderr);
    assert!(said.contains("`hello` is taken as the label"), "{said}");
    json_of(&elsewhere, &["--json", "ps"]);
    let remote = ok(&["remote", "hello"], &cli(&elsewhere, &["remote", "hello"]));
    assert!(
        remote.starts_with(&format!("{url}/git/hello.git\n# ")),
        "{remote}"
    );
    // -q: the URL alone, no hint.
    let quiet = ok(
        &["-q", "remote"],
        &cli(&elsewhere, &["-q", "remote", "hello"]),
    );
    assert_eq!(quiet, format!("{url}/git/hello.git\n"));

    // Colour only on a terminal (script(1) gives the command one), never with NO_COLOR.
    let listing = |no_color: bool| -> String {
        let mut command = Command::new("script");
        command
            .args(["-qec"])
            .arg(format!("{} service list", env!("CARGO_BIN_EXE_revboot")))
            .arg("/dev/null")
            .current_dir(&elsewhere)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").expect("PATH"))
            .env("HOME", &home)
            .env("TERM", "xterm");
        if no_color {
            command.env("NO_COLOR", "1");
        }
        String::from_utf8_lossy(&run(&mut command).stdout).into_owned()
    };
    let coloured = listing(false);
    assert!(coloured.contains("\x1b[1mSERVICE"), "{coloured:?}");
    let plain = listing(true);
    assert!(
        plain.contains("SERVICE") && !plain.contains('\x1b'),
        "{plain:?}"
    );
    let piped = ok(&["service", "list"], &cli(&elsewhere, &["service", "list"]));
    assert!(
        piped.contains("SERVICE") && !piped.contains('\x1b'),
        "{piped:?}"
    );
    for args in [
        &["service", "add", "scratch"][..],
        &["service", "rename", "scratch", "scratch-2"],
        &["service", "delete", "scratch-2", "--remove-deployments"],
    ] {
        let output = cli(&elsewhere, &[&["-vv"], args].concat());
        ok(args, &output);
        let everything = [output.stdout, output.stderr].concat();
        assert!(
            !String::from_utf8_lossy(&everything).contains(TOKEN),
            "{args:?} printed the token"
        );
        if args[1] == "add" {
            // Added and never pushed to, it is listed all the same, with no deployment.
            let services = json_of(&elsewhere, &["--json", "service", "list"]);
            let scratch = services
                .as_array()
                .and_then(|all| all.iter().find(|s| s["name"] == "scratch"))
                .unwrap_or_else(|| panic!("scratch is not listed: {services}"));
            assert_eq!(scratch["deployments"], 0, "{scratch}");
            assert!(scratch["live"].is_null(), "{scratch}");
            let history = json_of(&elsewhere, &["--json", "log", "scratch"]);
            assert_eq!(history, serde_json::json!([]), "{history}");
        }
    }

    // Inside the checkout, the service is its remote's.
    commit_revision(&work, "v2", "hello");
    git(&work, &["push", "-q", "origin", "main"]);
    let history = json_of(&work, &["--json", "log"]);
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");
    let args = ["rollback", v1.as_str()];
    let moved = ok(&args, &cli(&work, &args));
    assert!(moved.contains(&v1), "{moved}");
    let history = json_of(&work, &["--json", "log"]);
    assert_eq!(history[1]["live"], true, "{history}");
    ok(&["logs", "--build"], &cli(&work, &["logs", "--build"]));

    // Outside any checkout, a command that needs a service says to name it.
    let output = cli(&elsewhere, &["--json", "log"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let error: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON error");
    assert_eq!(error["error"], "invalid");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("name the service")),
        "{error}"
    );

    // Logged out, the remote is forgotten.
    ok(&["logout"], &cli(&elsewhere, &["logout"]));
    assert!(
        !std::fs::read_to_string(&config)
            .expect("read")
            .contains(&url)
    );
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .expect("read file")
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
        {
            found.push(path);
        }
    }
    found
}

#[test]
fn after_login_a_stock_git_push_authenticates_with_the_token_kept_out_of_the_checkout() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_setup(
        &temp.path().join("data"),
        &Setup {
            log_filter: "debug",
            ..Setup::default()
        },
    );
    let url = format!("http://{}", daemon.http);
    let home = temp.path().join("home");
    let elsewhere = temp.path().join("elsewhere");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::create_dir_all(&elsewhere).expect("elsewhere");
    let gitconfig = home.join(".gitconfig");
    let cli = |args: &[&str], stdin: &str| bare_cli(&home, &elsewhere, args, stdin);
    let helpers = || -> String {
        let output = bare("git", &home, &elsewhere)
            .args(["config", "--global", "--get-all"])
            .arg(format!("credential.{url}.helper"))
            .output()
            .expect("git config");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    // --no-git-credentials leaves git's configuration alone.
    let args = ["login", url.as_str(), "--no-git-credentials"];
    let said = ok(&args, &cli(&args, &format!("{TOKEN}\n")));
    assert!(!said.contains("git-credential"), "{said}");
    assert!(!gitconfig.exists());

    // Logged in: git's helper for that URL, and for it alone, is revboot's.
    let args = ["login", url.as_str()];
    let said = ok(&args, &cli(&args, &format!("{TOKEN}\n")));
    assert!(said.contains("revboot git-credential"), "{said}");
    let registered = helpers();
    assert!(
        registered.starts_with("\n!'") && registered.ends_with(" git-credential\n"),
        "{registered:?}"
    );
    let gitconfig_text = std::fs::read_to_string(&gitconfig).expect(".gitconfig");
    assert!(!gitconfig_text.contains(TOKEN), "{gitconfig_text}");
    // Logging in again does not register it twice.
    ok(&args, &cli(&args, &format!("{TOKEN}\n")));
    assert_eq!(helpers(), registered);

    // The helper speaks git's protocol, for the remotes' URLs only.
    let host = daemon.http.to_string();
    let get = |request: &str| {
        ok(
            &["git-credential", "get"],
            &cli(&["git-credential", "get"], request),
        )
    };
    assert_eq!(
        get(&format!("protocol=http\nhost={host}\n\n")),
        format!("username=revboot\npassword={TOKEN}\n")
    );
    assert_eq!(get(&format!("protocol=https\nhost={host}\n\n")), "");
    assert_eq!(get("protocol=http\nhost=127.0.0.1:1\n\n"), "");
    for operation in ["store", "erase"] {
        let request = format!("protocol=http\nhost={host}\nusername=git\npassword=x\n\n");
        let output = cli(&["git-credential", operation], &request);
        assert_eq!(ok(&[operation], &output), "");
    }

    // A checkout whose remote URL holds no token, pushed by stock git with nothing but PATH
    // and HOME (and no prompt to fall back on), from another directory: it deploys.
    let work = hello_source(temp.path());
    let push_url = format!("{url}/git/hello.git");
    git(&work, &["remote", "add", "origin", &push_url]);
    let push = || {
        bare("git", &home, &work)
            .args(["push", "origin", "main"])
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .output()
            .expect("git push")
    };
    let pushed = push();
    let said = String::from_utf8_lossy(&pushed.stderr).into_owned();
    assert!(pushed.status.success(), "{said}");
    assert!(said.contains("now answers with"), "{said}");
    let history = json(&["--json", "log"], &daemon.cli(&["--json", "log", "hello"]));
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");

    // The token is in no file of the checkout, and in no log.
    assert_eq!(files_containing(&work, TOKEN), Vec::<PathBuf>::new());
    assert!(!said.contains(TOKEN));
    assert!(!daemon.log().contains(TOKEN), "the daemon logged the token");

    // Logged out: the helper is gone from git's configuration, and a push is refused.
    ok(&["logout"], &cli(&["logout"], ""));
    assert_eq!(helpers(), "");
    commit_revision(&work, "v2", "hello");
    let refused = push();
    assert!(!refused.status.success(), "{refused:?}");
    let history = json(&["--json", "log"], &daemon.cli(&["--json", "log", "hello"]));
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
}

/// `revboot completions <shell>` written to a file.
fn completions(dir: &Path, shell: &str) -> PathBuf {
    let output = run(Command::new(env!("CARGO_BIN_EXE_revboot")).args(["completions", shell]));
    let file = dir.join(format!("revboot.{shell}"));
    std::fs::write(&file, &output.stdout).expect("write completions");
    file
}

#[test]
fn login_with_a_relative_ca_file_then_commands_anywhere_over_https() {
    let temp = tempfile::tempdir().expect("temp dir");
    let ca = crate::https::TestCa::new(temp.path());
    let (cert, key) = (temp.path().join("cert.pem"), temp.path().join("key.pem"));
    ca.issue(&["127.0.0.1"], (2000, 2090), &cert, &key);
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let url = format!("https://{}", daemon.http);
    let home = temp.path().join("home");
    let elsewhere = temp.path().join("elsewhere");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::create_dir_all(&elsewhere).expect("elsewhere");
    // The CA (temp/ca.pem) named relative to where login runs: it is saved as an absolute
    // path.
    assert_eq!(ca.pem, temp.path().join("ca.pem"));
    let login = ["--ca", "ca.pem", "login", url.as_str()];
    let said = ok(
        &login,
        &bare_cli(&home, temp.path(), &login, &format!("{TOKEN}\n")),
    );
    assert!(said.contains("default remote"), "{said}");
    // Without the CA, the same login is refused: the daemon's certificate is not trusted.
    let other_home = temp.path().join("other-home");
    std::fs::create_dir_all(&other_home).expect("home");
    let untrusted = bare_cli(&other_home, &elsewhere, &["login", &url], TOKEN);
    assert!(!untrusted.status.success(), "{untrusted:?}");

    // From another directory, no environment but HOME: the remote's CA verifies the daemon.
    let cli = |args: &[&str]| bare_cli(&home, &elsewhere, args, "");
    let args = ["service", "add", "hello"];
    ok(&args, &cli(&args));
    let certs = json(&["--json", "certs"], &cli(&["--json", "certs"]));
    assert_eq!(certs["certificates"][0]["state"], "valid", "{certs}");
    // (Stock git over https after such a login: https::https_carries_git_…)
    daemon.stop();
}

#[test]
fn completions_load_in_bash_zsh_and_fish_and_the_man_page_renders() {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path();
    let words = |output: &Output| -> Vec<String> {
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };

    // bash: the completion function offers the subcommands that start with what is typed.
    let bash = completions(dir, "bash");
    let output = run(Command::new("bash").arg("--norc").arg("-c").arg(format!(
        "source {} && COMP_WORDS=(revboot ser) && COMP_CWORD=1 && _revboot revboot ser revboot \
         && echo \"${{COMPREPLY[@]}}\"",
        bash.display()
    )));
    let offered = words(&output);
    assert!(
        offered.contains(&"serve".to_owned()) && offered.contains(&"service".to_owned()),
        "{offered:?}"
    );

    // zsh: compinit registers the function for the command.
    let zsh = completions(dir, "zsh");
    let output = run(Command::new("zsh").arg("-f").arg("-c").arg(format!(
        "autoload -Uz compinit && compinit -u -d {dump} && source {file} && print -r -- $_comps[revboot]",
        dump = dir.join("zcompdump").display(),
        file = zsh.display()
    )));
    assert_eq!(words(&output), ["_revboot"]);

    // fish: completing a command line offers subcommands and their flags.
    let fish = completions(dir, "fish");
    let complete = |line: &str| {
        words(&run(Command::new("fish")
            .arg("--no-config")
            .arg("-c")
            .arg(format!("source {} && complete -C '{line}'", fish.display()))
            .env("HOME", dir)))
    };
    let offered = complete("revboot ser");
    assert!(
        offered.contains(&"serve".to_owned()) && offered.contains(&"service".to_owned()),
        "{offered:?}"
    );
    let offered = complete("revboot service delete hello --");
    assert!(
        offered.contains(&"--keep-deployments".to_owned()),
        "{offered:?}"
    );

    // `--help` names the variable that gives the daemon its token, never its value.
    for sub in ["serve", "demo"] {
        let help = run(Command::new(env!("CARGO_BIN_EXE_revboot"))
            .args([sub, "--help"])
            .env("REVBOOT_TOKEN", "help-must-not-show-this"));
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("[env: REVBOOT_TOKEN]"), "{help}");
        assert!(!help.contains("help-must-not-show-this"), "{help}");
    }

    // A reader that stops early (`| head`) ends them quietly: no panic, exit 0. The pipe's
    // read end is closed before they start, so every write fails.
    for args in [
        &["completions", "zsh"][..],
        &["completions", "fish"],
        &["man"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_revboot"))
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run revboot");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // The manual page renders, with every subcommand and the exit codes, and no warning.
    let page = run(Command::new(env!("CARGO_BIN_EXE_revboot")).arg("man"));
    let file = dir.join("revboot.1");
    std::fs::write(&file, &page.stdout).expect("write the page");
    let rendered = run(Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&file)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C.UTF-8"));
    let text = String::from_utf8_lossy(&rendered.stdout);
    let warnings = String::from_utf8_lossy(&rendered.stderr);
    assert!(warnings.trim().is_empty(), "{warnings}");
    for expected in ["revboot", "SUBCOMMANDS", "service", "login", "Exit status"] {
        assert!(text.contains(expected), "no {expected} in:\n{text}");
    }
}

/// Another daemon holds the ports asked for (one running with the defaults, say): a second
/// start is refused, naming the address and the flag or key that picks another.
#[test]
fn a_daemon_on_ports_another_holds_says_how_to_pick_others() {
    let temp = tempfile::tempdir().expect("temp dir");
    let running = Daemon::start(&temp.path().join("data"));
    let config = temp.path().join("revbootd.toml");
    std::fs::write(&config, "").expect("write revbootd.toml");
    let taken = [
        (
            "HTTP",
            running.http.to_string(),
            "127.0.0.1:0".to_owned(),
            "--http ADDRESS",
        ),
        (
            "DNS",
            "127.0.0.1:0".to_owned(),
            running.dns.to_string(),
            "--dns ADDRESS",
        ),
    ];
    for (what, http, dns, flag) in taken {
        let data = temp.path().join(format!("second-{what}"));
        let (status, stderr) = serve_refused_on(&config, &data, &fresh_pool(), &http, &dns);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("Cannot serve {what} on")),
            "{stderr}"
        );
        assert!(stderr.contains(flag), "{stderr}");
        assert!(stderr.contains("in use"), "{stderr}");
    }
    // The first daemon serves on, untouched; it has no TLS, and `revboot certs` says so.
    assert!(running.cli(&["ps"]).status.success());
    let certs = running.cli(&["certs"]);
    let said = String::from_utf8_lossy(&certs.stdout);
    assert!(certs.status.success(), "{said}");
    assert!(
        said.contains("no certificates: the daemon serves no HTTPS"),
        "{said}"
    );
}

/// The demo run in the data directory of the README's walkthrough, whose `hello` has a
/// history of its own: it says so and which flag avoids it, before pushing anything.
#[test]
fn the_demo_over_a_hello_pushed_from_elsewhere_says_to_use_a_data_directory_of_its_own() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    let daemon = Daemon::start(&data);
    push(&daemon, &hello_source(temp.path()));
    daemon.stop();
    let mut child = Command::new(env!("CARGO_BIN_EXE_revboot"))
        .args(["--data", &data.to_string_lossy(), "demo", "--once"])
        .args(["--http", "127.0.0.1:0", "--dns", "127.0.0.1:0"])
        .args(["--pool", &fresh_pool()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start revboot demo");
    exits(&mut child, "revboot demo");
    let output = child.wait_with_output().expect("revboot demo ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("has a `hello` the demo did not make"),
        "{said}"
    );
    assert!(said.contains("--data"), "{said}");
    assert!(!said.contains("pushing hello v1"), "{said}");
    assert!(!data.join("demo/hello").exists());
}
