//! A rate-limited TCP relay: makes a loopback transfer slow enough to interrupt.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Relays 127.0.0.1:`port()` to a target, sending answers at `bytes_per_sec`, and counts
/// the bytes of answers it relayed (what the upstream really delivered to its client).
pub struct SlowProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    relayed: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
}

impl SlowProxy {
    /// Starts relaying to `target` (`host:port`).
    pub fn start(target: &str, bytes_per_sec: u64) -> Self {
        Self::start_cutting(target, bytes_per_sec, u64::MAX)
    }

    /// Like [`SlowProxy::start`], but every connection breaks after relaying `cut_after`
    /// bytes of answers: an upstream that dies mid-body.
    pub fn start_cutting(target: &str, bytes_per_sec: u64, cut_after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let relayed = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let flag = stop.clone();
        let counter = relayed.clone();
        let stall = stalled.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let (counter, stall2, stall) = (counter.clone(), stall.clone(), stall.clone());
                std::thread::spawn(move || pump(c2, s2, u64::MAX, None, &stall2));
                std::thread::spawn(move || pump(server, client, bytes_per_sec, Some((&counter, cut_after)), &stall));
            }
        });
        Self { port, stop, relayed, stalled }
    }

    /// While stalled, the relay accepts connections and forwards nothing, either way, on
    /// new or open connections: an upstream that accepts and never answers.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::Relaxed);
    }

    /// Bytes of answers relayed so far.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// The relay's address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, rate: u64, counted: Option<(&AtomicU64, u64)>, stalled: &AtomicBool) {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let cut_after = counted.map_or(u64::MAX, |(_, cut)| cut);
        let room = cut_after.saturating_sub(sent).min(buf.len() as u64) as usize;
        if room == 0 {
            break;
        }
        let n = match from.read(&mut buf[..room]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Held here, after the read: a connection open before the stall forwards nothing either.
        while stalled.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some((c, _)) = counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        sent += n as u64;
        if rate != u64::MAX {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    // Close both sockets both ways, so that when one side hangs up the other learns at once
    // (an upstream must see its client leave, not keep sending into a half-closed relay).
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
