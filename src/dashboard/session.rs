//! Dashboard sessions: sign-in with the daemon's token, a cookie, a CSRF token per session.
//!
//! 1. `POST /login` with the token (compared in constant time, as the API compares it)
//!    opens a session: a random id in the `revboot_session` cookie (`HttpOnly`,
//!    `SameSite=Strict`, `Path=/`, and `Secure` when the daemon speaks HTTPS), and a random
//!    CSRF token kept with it on the daemon.
//! 2. Every page form that changes anything carries the session's CSRF token in a hidden
//!    `csrf` field; a write is done only with a live session cookie *and* that session's
//!    token, and only when a browser's `Origin` header, if sent, names this very host.
//! 3. Sessions last [`SESSION_TTL`]; at most [`MAX_SESSIONS`] are kept (the one closest to
//!    expiry goes first); `POST /logout` ends one. Nothing of a session, nor the token,
//!    is ever logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};

/// The session cookie's name.
pub const COOKIE: &str = "revboot_session";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 1024;

/// A signed-in reader: the session's CSRF token, for the forms of the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    /// The token every write form of this session carries.
    pub csrf: String,
}

#[derive(Debug)]
struct Session {
    csrf: String,
    expires: Instant,
}

/// The open sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
}

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No live session cookie.
    NotSignedIn,
    /// The form's CSRF token is missing or not the session's.
    BadCsrf,
    /// The request came from a page of another origin.
    CrossOrigin,
}

impl Refusal {
    /// What the reader is told.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::NotSignedIn => "Sign in with the daemon's token to change anything",
            Refusal::BadCsrf => {
                "This form is stale or was not sent by the dashboard: reload the page and try again"
            }
            Refusal::CrossOrigin => "Changes are accepted only from the dashboard's own pages",
        }
    }
}

impl Sessions {
    /// Opens a session; returns its cookie id.
    pub fn open(&self) -> std::io::Result<(String, SignedIn)> {
        let id = revboot_sandbox::secret::random_hex(32)?;
        let csrf = revboot_sandbox::secret::random_hex(32)?;
        let now = Instant::now();
        let mut open = self.open.lock().expect("sessions lock is never poisoned");
        open.retain(|_, session| session.expires > now);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, session)| session.expires)
                .map(|(id, _)| id.clone())
        {
            open.remove(&oldest);
        }
        open.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        Ok((id, SignedIn { csrf }))
    }

    /// The session the request's cookie names, if live.
    pub fn signed_in(&self, headers: &HeaderMap) -> Option<SignedIn> {
        let id = cookie(headers, COOKIE)?;
        let open = self.open.lock().expect("sessions lock is never poisoned");
        let session = open.get(id.as_str())?;
        (session.expires > Instant::now()).then(|| SignedIn {
            csrf: session.csrf.clone(),
        })
    }

    /// Ends the request's session.
    pub fn close(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.open
                .lock()
                .expect("sessions lock is never poisoned")
                .remove(id.as_str());
        }
    }

    /// Whether a write may go ahead: a live session, its CSRF token in the form, and no
    /// other origin.
    pub fn check_write(&self, headers: &HeaderMap, csrf: &str) -> Result<SignedIn, Refusal> {
        if !same_origin(headers) {
            return Err(Refusal::CrossOrigin);
        }
        let signed_in = self.signed_in(headers).ok_or(Refusal::NotSignedIn)?;
        if csrf.is_empty() || !constant_time_eq(csrf.as_bytes(), signed_in.csrf.as_bytes()) {
            return Err(Refusal::BadCsrf);
        }
        Ok(signed_in)
    }
}

/// The `Set-Cookie` value of a new session; `Secure` when the daemon speaks HTTPS, so the
/// browser never sends it in clear text.
pub fn set_cookie(id: &str, https: bool) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if https { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(https: bool) -> String {
    format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        if https { "; Secure" } else { "" }
    )
}

/// The value of cookie `name`, if the request carries it.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// Whether the browser's `Origin` (when it sends one) is this host; a request without
/// `Origin` (not from a browser page, or a same-origin GET) passes.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin_host, host), (Some(a), Some(b)) if a.eq_ignore_ascii_case(b))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(name.clone(), value.parse().expect("header"));
        }
        headers
    }

    #[test]
    fn a_write_needs_the_cookie_the_csrf_token_and_the_same_origin() {
        let sessions = Sessions::default();
        let (id, signed_in) = sessions.open().expect("random");
        let cookie = format!("other=1; {COOKIE}={id}");
        let good = with(&[(header::COOKIE, &cookie), (header::HOST, "127.0.0.1:8080")]);
        assert_eq!(
            sessions.check_write(&good, &signed_in.csrf),
            Ok(signed_in.clone())
        );
        assert_eq!(sessions.check_write(&good, ""), Err(Refusal::BadCsrf));
        assert_eq!(sessions.check_write(&good, "0000"), Err(Refusal::BadCsrf));
        let none = with(&[(header::HOST, "127.0.0.1:8080")]);
        assert_eq!(
            sessions.check_write(&none, &signed_in.csrf),
            Err(Refusal::NotSignedIn)
        );
        let wrong = with(&[
            (header::COOKIE, &format!("{COOKIE}=feed")),
            (header::HOST, "h"),
        ]);
        assert_eq!(
            sessions.check_write(&wrong, &signed_in.csrf),
            Err(Refusal::NotSignedIn)
        );
        let forged = with(&[
            (header::COOKIE, &cookie),
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "http://evil.example"),
        ]);
        assert_eq!(
            sessions.check_write(&forged, &signed_in.csrf),
            Err(Refusal::CrossOrigin)
        );
        sessions.close(&good);
        assert_eq!(
            sessions.check_write(&good, &signed_in.csrf),
            Err(Refusal::NotSignedIn)
        );
    }

    #[test]
    fn sessions_are_bounded() {
        let sessions = Sessions::default();
        for _ in 0..MAX_SESSIONS + 5 {
            sessions.open().expect("random");
        }
        assert_eq!(sessions.open.lock().expect("lock").len(), MAX_SESSIONS);
    }
}
