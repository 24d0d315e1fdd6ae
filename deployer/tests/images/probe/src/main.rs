//! `probe`: a revboot test image that tries to leave its sandbox and reports on its console.
//!
//! `probe <check> [argument]`, where check is one of
//! - `write <path>`: create `<path>` (outside the scratch directory), then `scratch.txt` in
//!   the working directory, then read `/etc/hostname`;
//! - `connect <ip:port>`: open a TCP connection;
//! - `memory <MiB>`: allocate and touch that much memory;
//! - `procs <host pid>`: report its own pid, signal the host pid, list `/proc`;
//! - `signals`: report its blocked, ignored and caught signal masks (as exec left them);
//! - `silent`: close its standard output and error once it has said `probe done`.
//!
//! Each result is one console line `probe <what>: ok|denied (<error>)|<value>`; then it prints
//! `probe done` and answers HTTP on the inherited socket (fd 3) with `probe ok`, or exits
//! with status 4 on `GET /exit`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::FromRawFd;
use std::time::Duration;

unsafe extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
    fn close(fd: i32) -> i32;
}

fn report(what: &str, result: std::io::Result<()>) {
    match result {
        Ok(()) => println!("probe {what}: ok"),
        Err(error) => println!("probe {what}: denied ({error})"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let check = args.get(1).map(String::as_str).unwrap_or("");
    let argument = args.get(2).map(String::as_str).unwrap_or("");
    match check {
        "write" => {
            report("write-outside", std::fs::write(argument, b"escaped\n"));
            report("write-scratch", std::fs::write("scratch.txt", b"inside\n"));
            report("read-etc", std::fs::read("/etc/hostname").map(drop));
        }
        "connect" => {
            let result = argument
                .parse::<SocketAddr>()
                .map_err(std::io::Error::other)
                .and_then(|address| {
                    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
                })
                .map(drop);
            report("connect", result);
        }
        "memory" => {
            let mib: usize = argument.parse().unwrap_or(0);
            let mut hold: Vec<Vec<u8>> = Vec::new();
            for step in 1..=mib {
                hold.push(vec![step as u8; 1 << 20]);
                if step % 8 == 0 {
                    println!("probe memory: {step} MiB");
                }
            }
            println!("probe memory: survived {} MiB", hold.len());
        }
        "procs" => {
            println!("probe pid: {}", std::process::id());
            let host: i32 = argument.parse().unwrap_or(0);
            // SAFETY: kill with signal 0 only checks whether the process can be signalled.
            let rc = unsafe { kill(host, 0) };
            report(
                "signal-host",
                if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) },
            );
            match std::fs::read_dir("/proc") {
                Ok(entries) => {
                    let pids: Vec<String> = entries
                        .flatten()
                        .map(|entry| entry.file_name().to_string_lossy().into_owned())
                        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
                        .collect();
                    println!("probe proc-pids: {}", pids.join(","));
                }
                Err(error) => println!("probe proc-pids: denied ({error})"),
            }
        }
        "signals" => match std::fs::read_to_string("/proc/self/status") {
            Ok(status) => {
                for line in status.lines() {
                    if let Some(mask) = ["SigBlk:", "SigIgn:", "SigCgt:"]
                        .iter()
                        .find_map(|field| line.strip_prefix(field))
                    {
                        println!("probe {}: {}", &line[..6], mask.trim());
                    }
                }
            }
            Err(error) => println!("probe signals: denied ({error})"),
        },
        "silent" => {}
        other => println!("probe: unknown check `{other}`"),
    }
    println!("probe done");
    let _ = std::io::stdout().flush();
    if check == "silent" {
        // SAFETY: closing our own standard output and error; nothing writes to them after.
        unsafe {
            close(1);
            close(2);
        }
    }
    // SAFETY: by the LISTEN_FDS convention fd 3 is our listening socket.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    for stream in listener.incoming().flatten() {
        let mut stream = stream;
        let mut buffer = [0u8; 1024];
        let read = stream.read(&mut buffer).unwrap_or(0);
        if buffer[..read].starts_with(b"GET /exit") {
            std::process::exit(4);
        }
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nprobe ok\n",
        );
    }
}
