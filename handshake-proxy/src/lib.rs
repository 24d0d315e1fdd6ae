//! The revboot handshake proxy: a cold boot looks like a slow first byte, not a refused
//! connection.
//!
//! [`Proxy`] wraps the deployer and implements [`Instances`] itself. Its `summon` asks the
//! deployer and then binds a listener on the instance's service address and port before it
//! returns, so DNS, given the proxy as its `Instances`, never hands out an address with no
//! listener behind it. The deployer runs the instance's own socket elsewhere
//! (`Summoned::backend`, e.g. the service address on an ephemeral port).
//!
//! # The hold-then-splice protocol
//!
//! 1. `summon` → the deployer's summon → bind `address:port` (once; skipped when the
//!    instance itself listens there) → return the answer.
//! 2. Accept at once. Look the instance up by the connection's destination address. Refuse
//!    with a reset when no instance owns it, when a per-client instance (`key.client`) sees
//!    another source address, or when over `max_connections`.
//! 3. Report `ConnectionOpened`; `ConnectionClosed` follows when the connection ends, however
//!    it ends, so an open connection — even a quiet stream or websocket — keeps its instance
//!    from being reaped.
//! 4. Summon again if the instance is cold, stopped or crashed.
//! 5. Not serving yet: hold. Over `max_held_per_instance` or `max_held`, refuse with a reset.
//!    While waiting on the instance's state watch, read and buffer up to `early_bytes` of
//!    the client's bytes (then stop reading; TCP flow control holds the rest).
//! 6. The state turns final, or `boot_timeout` passes: close the connection, log it, count a
//!    boot failure.
//! 7. Ready: connect to `backend` (refusals retried within `connect_timeout`), replay the
//!    early bytes, shut down the backend's writing if the client already ended its own.
//! 8. Splice both ways; an EOF on one side shuts down writing on the other while the other
//!    direction goes on; the connection closes on an idle or total timeout, or at shutdown.
//!    `ConnectionClosed` is reported when it ends.
//! 9. A sweep every `sweep_interval` closes listeners of addresses the deployer released.
//! 10. Once the instance is ready — a process instance from its boot on, as its socket
//!     listens before it starts and holds what arrives until it accepts — the deployer has
//!     the kernel hand new connections to the service address straight to the instance's
//!     own socket (`revboot_deployer::steer`, an `sk_lookup` program): they never reach
//!     this listener, so the relay above only carries connections made before the boot
//!     began (the one that summoned it), during a qemu boot, refusals, front-door
//!     connections, and what cannot be steered (no root). An instance that takes
//!     hand-offs (`[run] handoff = true`, below) gets even those connections itself. A per-client route takes only its
//!     client; anyone else still lands here and is refused.
//!
//! # The front door
//!
//! [`Proxy::with_front`] adds one shared address (an HTTP port, a TLS port) for hosts
//! that cannot give every revision an address of its own. It reads the name a connection
//! asks for — the `Host` of an HTTP/1.x request head, the server name of a TLS ClientHello,
//! within a head timeout and a size cap — finds the revision that name designates
//! (`<label>.<service>.<zone>`, the grammar of `revboot_store::name` that DNS uses too;
//! through [`Proxy::resolve_names_through`], a source commit with no deployment is built on
//! demand while the connection waits), and then holds, replays and splices exactly as
//! above, the head being the early bytes.
//! A revision whose manifest says `[run] handoff = true` (process tender) is not relayed:
//! the front door peeks at the head (`MSG_PEEK`) instead of reading it, holds the connection
//! while the instance boots without reading, then sends the connection's descriptor to the
//! instance over the Unix socket its tender gave it (`revboot_deployer::handoff`), and
//! watches the kernel for its end (the private `handoff` module).
//! TLS is passed through untouched (the instance terminates it), unless the service's
//! manifest says `tls = "terminate"`: then the front door ends TLS with the certificate
//! the daemon's resolver picks for the server name ([`Terminate`]) and relays plain TCP. Unknown names get an HTTP
//! 404 or a TLS `unrecognized_name` alert. A service is served there only when its
//! manifest says `reach = "front"` or `"both"`; per-client services never are. The
//! protocol is stated in [`front`].
//!
//! # Choices, and why
//!
//! - **One listener per service address, bound on demand.** On loopback every `127/8`
//!   address is local, so a plain bind works; bind + listen + close of one listener costs
//!   13–56 µs on this 2-core shared machine (`proxy_bench bind 2000`, run by
//!   `bench/proxy.sh`), small beside a summon. One wildcard or `IP_TRANSPARENT` listener per
//!   port would also see every address, but it takes the port on every local address
//!   (including ones outside the pool, so it collides with anything else on that port),
//!   and a transparent bind needs `CAP_NET_ADMIN` plus policy routing. Per-address
//!   listeners are exact, need no privilege, and close when the address is released.
//!   `IP_FREEBIND` only matters for pool addresses that are not local yet, which loopback
//!   pools never are.
//! - **A pump per direction** (the private `pump` module): the same
//!   half-close semantics as `tokio::io::copy_bidirectional` (EOF on one side shuts down
//!   writing on the other, the other direction goes on), plus an activity clock for the
//!   idle timeout and byte counters. Per exchange it makes the fewest calls a user-space
//!   relay can: one read and one write per direction and one readiness wait (strace
//!   during `bench/proxy.sh`), with the buffers allocated once per connection. With
//!   [`ProxyConfig::zero_copy`], a read that fills the whole buffer switches that
//!   direction to splice(2) through a pipe of 256 KiB, so small request/response traffic
//!   never pays for pipes and bulk transfers skip user space; pipes are bounded
//!   ([`ProxyConfig::max_pipes`]; past it a direction keeps copying). It is off by default:
//!   measured by the relay's CPU time per request, splice(2) and copying cost the same
//!   (1 MiB pipes, or 256 KiB copy buffers, no less), because the relay's cost is not the
//!   copy but the kernel's TCP work for the second hop (perf: some 92% of the relay's
//!   samples are in the kernel: loopback transmit, receive, waking the peer).
//! - **Warm connections skip the relay, in the kernel** (the default; `steer = false`
//!   turns it off). A relay costs a second pair of copies and wake-ups per exchange: on
//!   this 2-core machine, relayed warm traffic reaches about half the direct requests/s
//!   (figures below). Moving the relay itself into the kernel (a sockmap verdict program)
//!   would still cross TCP twice and has ordering hazards for bytes the proxy already
//!   read; handing the *connection* over at its SYN has neither. The proxy's address
//!   stays the only one clients know, its listener stays behind the route, admission
//!   stays (in the program), and activity and metrics stay uniform: the deployer counts
//!   steered connections in the program's map and open ones through `sock_diag` before
//!   it reaps. What a steered connection loses is the proxy's idle and total timeouts:
//!   it is the instance's own.
//! - **Front-door connections handed to the instance** (`[run] handoff = true`). Steering
//!   cannot serve the front door: the name is in the connection's first bytes, so the
//!   connection must be accepted and read before its instance is known, and a relay then
//!   costs its second TCP hop on every exchange (one sequential connection at a third to a
//!   half of the direct rate). Handing the accepted socket over `SCM_RIGHTS` leaves the
//!   proxy one `sendmsg` per connection and nothing per exchange; peeking keeps the head in
//!   the socket, so the instance reads the request as if it had accepted it. The cost is a
//!   convention the image must follow (a receive loop on `REVBOOT_HANDOFF_FD`), so it is
//!   an opt-in; VMs cannot take a host descriptor and keep the relay. Open handed
//!   connections are counted by asking `sock_diag` for each one's two ends every second
//!   (one filtered dump each), rather than by the instance's word: the convention stays one
//!   way, and an instance can neither keep itself booted nor get reaped by what it says.
//!   Sends never wait (`MSG_DONTWAIT`): a full or closed socket relays the connection.
//! - **A direct path, offered beside the proxy** (`[instances] direct = true` in the
//!   daemon: the deployer's `BackendPort::Same`). The process tender's inherited socket
//!   already has the kernel hold handshakes and early bytes during a boot, so for those
//!   instances the proxy's extra hop buys admission, metrics and bounds. In direct mode
//!   the proxy fronts nothing (`listen` sees the backend is the client address), the
//!   instance's socket filter admits a per-client instance's client, and the deployer
//!   counts open connections on the instance's socket through `sock_diag` before it
//!   reaps, so a quiet connection still keeps its instance. What is lost: the proxy's
//!   connection metrics, its held-connection bounds (the kernel backlog bounds instead)
//!   and its replay buffer (the kernel's receive buffer holds early bytes instead).
//!
//! # Figures
//!
//! Measured on a shared 2-core machine (load average 1–4 from other tenants), so they are
//! ranges, not points:
//!
//! - Warm, `bench/proxy.sh 5` (wrk; each round runs direct, steered and relayed; medians
//!   of 3–5 rounds). Steered, as a ready instance is, and a process instance from its boot
//!   on (so a connection made during its boot): small keep-alive responses
//!   0.85–1.12× the direct requests/s, 1 MiB responses 1.00–1.25× the direct bytes/s, one
//!   connection p50 −3 to +6 µs, 1.07–1.20× its rate (the data path is the direct one; the
//!   spread, above 1× included, is the shared machine: load average 9–14 for the upper
//!   ends). Relayed (a front-door connection, one held through a VM's boot, one made
//!   before a boot began, or `steer = false`): 0.49–0.98×
//!   the direct requests/s, 0.40–1.04× the bytes/s (the upper ends at load average 17,
//!   where the other tenants set the pace), and +31 to +81 µs; on one sequential
//!   connection of a loaded host 0.14–0.23× the rate, as each of the relay's two extra
//!   wake-ups per exchange waits for a core. The relay's own CPU time per request (same
//!   script) moves less: 13–16 µs per small request against the backend's 9 µs, 250–360 µs
//!   per 1 MiB against its 90–160 µs, 22–60 µs per request on one sequential connection
//!   against its 11 µs.
//! - Front door, `ROUNDS=3 bench/proxy.sh 5` (two runs at load average 9–13; each round
//!   runs direct, steered, relayed, the front door relaying and the front door handing
//!   off, routed by `Host`; medians of the rounds' ratios). Handed off (`[run] handoff =
//!   true`): 0.99–1.09× the direct requests/s (small), 1.35–1.66× the bytes/s (1 MiB), on
//!   one sequential connection 0.82–1.36× the rate and −1 to 0 µs p50, the front door's
//!   CPU 0.0–0.4 µs per request (one `sendmsg` per connection, nothing per exchange: the
//!   data path is the direct one; the single rounds spread from 0.35× to 2.96×, the other
//!   tenants' load). Relayed by the front door in the same runs: 0.91–1.05×, 0.88–1.01×,
//!   0.31–0.34× and +33 to +52 µs, its CPU 14–15 µs, 246–262 µs and 24–32 µs per request.
//! - Why a relay in user space stays near half the direct rate on a busy host: its cost is
//!   the kernel's, not its own. It makes the fewest calls a relay can (strace: one read and
//!   one write each way per exchange; one readiness wait per exchange, or per some eleven
//!   under load), some 92% of its perf samples are in the kernel (the second TCP hop's
//!   loopback transmit and receive, waking the peer, switching tasks), and copying or
//!   splicing makes no difference. Where the CPU is the limit, the extra hop takes as much
//!   as the instance's own work, so 0.9× needs the relay off the path: steering (above) or
//!   the direct path.
//! - Cold, `cargo bench -p revboot-proxy --bench cold -- 1000` (real deployer, hello on
//!   the process tender, summon + connect + request + first byte, per path): the proxied
//!   path waits for `Ready` and then connects and replays, while the direct path's request
//!   is already queued in the kernel. Connecting before `Ready` would close that gap for
//!   the process tender, whose socket the kernel holds, but not for qemu's user
//!   networking, which accepts for a guest that is not listening yet; the proxy cannot
//!   tell them apart, so it waits for `Ready`.
//! - Cold, the figure a user feels: `python3 bench/e2e-cold.py 1000` (the whole daemon: a
//!   DNS A query over UDP, then connect and first byte through this proxy, 1000 cold
//!   starts of hello): first byte p50 3.3–5.4 ms, p99 5.9–24 ms (DNS answer p50 0.4–0.7 ms);
//!   with `--direct` (no proxy) p50 3.2–6.8 ms, p99 14 ms.
//!
//! - Front door, `bench/front-door.sh 2000` (3 rounds of 2000 fresh connections each to
//!   a keep-alive backend and to the front door before it, interleaved; connect, `GET /`
//!   with a Host, first byte): direct p50 81.5–82.2 µs, front door p50 126.1–129.8 µs,
//!   1.53–1.59× (+44 to +48 µs: head parse, name lookup, summon of a ready instance, a
//!   second connect, replay); p99 direct 1.6–2.5 ms, front door 2.0–4.0 ms (1.22–1.63×,
//!   the shared machine's tail). The instance is the testkit's always-ready stand-in, so
//!   this is the front door's own cost, not a boot.
//!
//! # Limits
//!
//! TCP only. Held connections, open connections and listeners are bounded
//! ([`ProxyConfig`]), and so are front-door heads being read ([`FrontConfig`]); every wait
//! has a timeout. The proxy parses no protocol except, at the front door, the head it
//! routes by; a front-door connection is routed once, by its first head.
//!
//! An upgrade in place ([`Proxy::hand_over`], [`Proxy::adopt`]) hands the listening sockets
//! over open, so connections made meanwhile wait in their queues; connections the proxy
//! relays itself (through the front door, to a VM, or not steered) pause and are handed
//! over whole, their sockets and the bytes they had in flight ([`Proxy::take_relays`],
//! [`Proxy::adopt_relays`], bounded by [`MAX_RELAYS`] and [`MAX_RELAY_BYTES`]); those held
//! through a boot are handed over as they stand, with the bytes read of them, and held again
//! by the next daemon ([`Proxy::take_held`], [`Proxy::adopt_held`], within the same bounds);
//! those with TLS ended at the front door go likewise with their TLS session, whose keys
//! and sequence numbers rustls gives up, and the next daemon carries them on with a record
//! layer of its own (the private `records` and `tls_relay` modules: a KeyUpdate from the
//! client afterwards closes the connection); those caught mid-record or mid-handshake, and
//! those over the bounds, are given a short drain and then close with the old program.
//! Steered connections never pass
//! through the proxy and are not touched; nor are connections handed to an instance, whose
//! two ends the next daemon watches again so that they still count open
//! ([`Proxy::take_handed`], [`Proxy::adopt_handed`], bounded by
//! [`MAX_HANDED_CONNECTIONS`]); the instance's hand-off socket goes over with it, so its
//! front-door connections are handed to it there too.
//!
//! # Example
//!
//! ```no_run
//! # async fn wire(deployer: std::sync::Arc<dyn revboot_deployer::Instances>) {
//! use revboot_proxy::{Proxy, ProxyConfig};
//! let proxy = Proxy::new(ProxyConfig::default(), deployer);
//! // Hand `proxy` (an `Instances`) to the DNS front end instead of the deployer.
//! let _metrics = proxy.metrics();
//! proxy.shutdown();
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod clock;
mod config;
mod connection;
mod door;
pub mod front;
mod handoff;
mod handover;
mod metrics;
mod proxy;
mod pump;
mod records;
mod relays;
mod shared;
mod sniff;
mod splice;
mod terminate;
mod tls_relay;

pub use config::{
    ConfigError, DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_EARLY_BYTES,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HELD, DEFAULT_MAX_HELD_PER_INSTANCE,
    DEFAULT_MAX_LISTENERS, DEFAULT_MAX_PIPES, DEFAULT_SPLICE_BUFFER, DEFAULT_SWEEP_INTERVAL,
    DEFAULT_TOTAL_TIMEOUT, ProxyConfig,
};
pub use front::{FrontAddresses, FrontConfig, FrontError};
pub use metrics::ProxyMetrics;
pub use proxy::Proxy;
pub use records::{RecordError, TlsSession};
pub use relays::{
    Failure, HandedConnection, HandedHeld, HandedRelay, MAX_HANDED_CONNECTIONS, MAX_RELAY_BYTES,
    MAX_RELAYS,
};
pub use revboot_deployer::Instances;
pub use shared::ListenError;
pub use terminate::Terminate;
