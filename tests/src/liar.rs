//! A peer that lies about sizes: the test double for a hostile member.
//!
//! It stands in front of a real agent's peer port (the agent advertises the liar's port with
//! `peer_advertise_port`) and relays every request unchanged, signatures included. Blob
//! answers are rewritten as if the blob were `factor` times its real size: the real bytes
//! padded with zeros (more), or cut short (less), with `Content-Length` and
//! `Content-Range` to match, for `HEAD`, whole and ranged `GET`s alike. Anything else passes
//! through as it is.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Shared {
    target: Mutex<String>,
    /// The claimed size over the real one, as (numerator, denominator).
    factor: Mutex<(u64, u64)>,
    lies: AtomicU64,
    stop: AtomicBool,
}

/// A running lying peer.
pub struct LyingPeer {
    ip: String,
    port: u16,
    shared: Arc<Shared>,
}

impl LyingPeer {
    /// Listens on `ip` (a free port), claiming `num/den` times every blob's size; relays to
    /// the target set with [`LyingPeer::relay_to`].
    pub fn start(ip: &str, num: u64, den: u64) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind liar");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared {
            target: Mutex::new(String::new()),
            factor: Mutex::new((num, den)),
            lies: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let stop = |s: &Shared| s.stop.load(Ordering::Relaxed);
        crate::serve_threads(listener, shared.clone(), stop, |s, conn| {
            let _ = handle(s, conn);
        });
        Self { ip: ip.to_string(), port, shared }
    }

    /// The port to advertise.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `IP:PORT`, as peers see it.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// Relays to the real peer port `addr` (`IP:PORT`).
    pub fn relay_to(&self, addr: &str) {
        *self.shared.target.lock().expect("lock") = addr.to_string();
    }

    /// Claims `num/den` times the real size from now on.
    pub fn set_factor(&self, num: u64, den: u64) {
        *self.shared.factor.lock().expect("lock") = (num, den);
    }

    /// Blob answers rewritten so far.
    pub fn lies(&self) -> u64 {
        self.shared.lies.load(Ordering::Relaxed)
    }
}

impl Drop for LyingPeer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect((self.ip.as_str(), self.port));
    }
}

/// Reads up to the end of a head (`\r\n\r\n`); the rest stays unread.
fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
        if head.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One request per connection: relayed without its `Range` (the liar cuts the range from
/// the whole blob it pretends to hold) and with `Connection: close`.
fn handle(s: &Shared, mut client: TcpStream) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = read_head(&mut client)?;
    let request_line = head.lines().next().unwrap_or("").to_string();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let range = header(&head, "range").map(str::to_string);
    let blob = path.contains("/blobs/");
    let mut relayed = format!("{request_line}\r\n");
    for line in head.lines().skip(1).filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if name == "connection" || (blob && name == "range") {
            continue;
        }
        relayed.push_str(line);
        relayed.push_str("\r\n");
    }
    relayed.push_str("Connection: close\r\n\r\n");
    let target = s.target.lock().expect("lock").clone();
    let mut upstream = TcpStream::connect(&target)?;
    upstream.write_all(relayed.as_bytes())?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |p| p + 4);
    let (answer_head, body) = answer.split_at(split);
    let answer_head = String::from_utf8_lossy(answer_head).into_owned();
    let status = answer_head.split_whitespace().nth(1).unwrap_or("").to_string();
    if !blob || status != "200" {
        client.write_all(&answer)?;
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    let real: u64 = header(&answer_head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let (num, den) = *s.factor.lock().expect("lock");
    let claimed = (real * num / den).max(1);
    s.lies.fetch_add(1, Ordering::Relaxed);
    // The blob it pretends to hold: the real bytes, padded with zeros or cut short.
    let fake = |offset: u64| -> u8 { body.get(offset as usize).copied().unwrap_or(0) };
    let (code, first, last) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or(("0", ""));
            let first: u64 = a.parse().unwrap_or(0);
            let last: u64 = b.parse().map_or(claimed - 1, |l: u64| l.min(claimed - 1));
            ("206 Partial Content", first, last)
        }
        None => ("200 OK", 0, claimed - 1),
    };
    let mut out = format!("HTTP/1.1 {code}\r\n");
    for line in answer_head.lines().skip(1).filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if !["content-length", "content-range", "connection"].contains(&name.as_str()) {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    let len = if first > last { 0 } else { last - first + 1 };
    out.push_str(&format!("Content-Length: {len}\r\nConnection: close\r\n"));
    if code.starts_with("206") {
        out.push_str(&format!("Content-Range: bytes {first}-{last}/{claimed}\r\n"));
    }
    out.push_str("\r\n");
    client.write_all(out.as_bytes())?;
    if method != "HEAD" {
        let bytes: Vec<u8> = (first..first + len).map(fake).collect();
        client.write_all(&bytes)?;
    }
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}
