//! A bearer-token front for a registry: the test double for a token service.
//!
//! Debian ships distribution but no token server, so this relay plays both parts of the
//! challenge flow: requests without a valid `Bearer` token get `401` with a
//! `WWW-Authenticate: Bearer realm=…,service=…,scope=…` challenge; `GET /token` checks basic
//! credentials and issues a token valid for `ttl`; valid requests are relayed to the registry.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

struct Shared {
    target: String,
    credentials: String,
    ttl: Duration,
    issued: Mutex<Vec<(String, Instant)>>,
    tokens_issued: AtomicU64,
    refused: AtomicU64,
    stop: AtomicBool,
}

/// A running token-checking relay in front of a registry.
pub struct TokenGate {
    port: u16,
    shared: Arc<Shared>,
}

impl TokenGate {
    /// Fronts `target` (`host:port`); tokens need basic `user:password` and live for `ttl`.
    pub fn start(target: &str, user: &str, password: &str, ttl: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind gate");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared {
            target: target.to_string(),
            credentials: format!("{user}:{password}"),
            ttl,
            issued: Mutex::new(Vec::new()),
            tokens_issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let stop = |s: &Shared| s.stop.load(Ordering::Relaxed);
        crate::serve_threads(listener, shared.clone(), stop, move |s, conn| handle(s, port, conn));
        Self { port, shared }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.tokens_issued.load(Ordering::Relaxed)
    }

    /// Requests answered 401 so far.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }
}

impl Drop for TokenGate {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

fn respond(conn: &mut TcpStream, status: &str, headers: &str, body: &str) {
    let _ =
        write!(conn, "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

fn handle(s: &Shared, port: u16, mut conn: TcpStream) {
    let Some(head) = read_head(&mut conn) else { return };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let authorization = lines
        .clone()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    if path.starts_with("/token") {
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(&s.credentials));
        if authorization != basic {
            s.refused.fetch_add(1, Ordering::Relaxed);
            return respond(&mut conn, "401 Unauthorized", "", "{}");
        }
        let n = s.tokens_issued.fetch_add(1, Ordering::Relaxed) + 1;
        let token = format!("tok-{n}");
        s.issued.lock().expect("lock").push((token.clone(), Instant::now()));
        let body = format!("{{\"token\":\"{token}\",\"expires_in\":{}}}", s.ttl.as_secs());
        return respond(&mut conn, "200 OK", "Content-Type: application/json\r\n", &body);
    }
    let valid = authorization
        .strip_prefix("Bearer ")
        .is_some_and(|t| s.issued.lock().expect("lock").iter().any(|(issued, at)| issued == t && at.elapsed() < s.ttl));
    if !valid {
        s.refused.fetch_add(1, Ordering::Relaxed);
        let name = path
            .trim_start_matches("/v2/")
            .split("/manifests/")
            .next()
            .unwrap_or("")
            .split("/blobs/")
            .next()
            .unwrap_or("");
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"clyde-test\",scope=\"repository:{name}:pull\"\r\n"
        );
        return respond(&mut conn, "401 Unauthorized", &challenge, "{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}");
    }
    let Ok(mut upstream) = TcpStream::connect(&s.target) else { return };
    let mut relayed = String::new();
    for line in head.trim_end().split("\r\n") {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            relayed.push_str(line);
            relayed.push_str("\r\n");
        }
    }
    relayed.push_str("Connection: close\r\n\r\n");
    if upstream.write_all(relayed.as_bytes()).is_err() {
        return;
    }
    let _ = std::io::copy(&mut upstream, &mut conn);
    let _ = conn.shutdown(Shutdown::Both);
}
