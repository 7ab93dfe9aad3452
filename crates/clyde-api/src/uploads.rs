//! Bounds on what the peer server sends, so serving peers never starves the node's own
//! workloads: a node-wide byte rate (a token bucket every peer response draws from before
//! each chunk it sends) and a number of concurrent uploads (a request past it is answered
//! `429` with `Retry-After`, so the requester asks another holder instead of queueing here).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Upload limits of the peer server (`max_uploads` and `upload_rate` in the config).
#[derive(Clone, Debug)]
pub struct UploadLimits {
    /// Peer responses with a body in flight at once (default 64).
    pub max_uploads: usize,
    /// Bytes per second sent to peers, all responses together (default 500 MiB/s, about
    /// 40% of a 10 GbE link; `0`: no limit).
    pub upload_rate: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self { max_uploads: 64, upload_rate: 500 * 1024 * 1024 }
    }
}

/// A token bucket that may go into debt: a sender takes what it sends at once and waits
/// out the debt, so concurrent senders queue fairly behind each other.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: u64, now: Instant) -> Self {
        let rate = rate as f64;
        // A tenth of a second of sending, at least one read's worth.
        let burst = (rate / 10.0).max(256.0 * 1024.0);
        Self { rate, burst, tokens: burst, at: now }
    }

    /// Takes `n` bytes' worth of tokens; how long the sender must wait before sending them.
    pub(crate) fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }
}

/// The peer server's upload limits, shared by its connections.
pub struct Uploads {
    permits: Arc<Semaphore>,
    bucket: Option<Arc<Mutex<Bucket>>>,
}

/// An upload allowed to run: dropped with its response.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    bucket: Option<Arc<Mutex<Bucket>>>,
}

impl Uploads {
    /// Limits as configured.
    pub fn new(limits: &UploadLimits) -> Self {
        let bucket =
            (limits.upload_rate > 0).then(|| Arc::new(Mutex::new(Bucket::new(limits.upload_rate, Instant::now()))));
        Self { permits: Arc::new(Semaphore::new(limits.max_uploads.max(1))), bucket }
    }

    /// A slot for one more upload, or `None` when as many are running as allowed.
    pub(crate) fn try_start(&self) -> Option<Slot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(Slot { _permit: permit, bucket: self.bucket.clone() })
    }
}

impl Slot {
    /// `body`, paced by the node-wide rate; the slot is held until the body ends or drops.
    pub(crate) fn pace<S>(self, body: S) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        body.then(move |chunk| {
            let bucket = self.bucket.clone();
            async move {
                if let (Ok(bytes), Some(bucket)) = (&chunk, bucket) {
                    let wait =
                        bucket.lock().unwrap_or_else(|p| p.into_inner()).take(bytes.len() as u64, Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                chunk
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_bucket_lets_a_burst_through_then_paces_at_its_rate() {
        let start = Instant::now();
        let mut b = Bucket::new(10 * MIB, start);
        // The burst: a tenth of a second's worth.
        assert_eq!(b.take(MIB, start), Duration::ZERO);
        // Past it, each MiB costs a tenth of a second more.
        let wait = b.take(MIB, start);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        let wait = b.take(MIB, start);
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        // Time pays the debt back.
        let later = start + Duration::from_millis(200);
        assert_eq!(b.take(0, later), Duration::ZERO);
    }

    #[test]
    fn an_idle_bucket_saves_no_more_than_its_burst() {
        let start = Instant::now();
        let mut b = Bucket::new(10 * MIB, start);
        let much_later = start + Duration::from_secs(60);
        assert_eq!(b.take(MIB, much_later), Duration::ZERO);
        assert!(b.take(MIB, much_later) > Duration::ZERO);
    }

    #[test]
    fn uploads_past_the_limit_are_refused_until_one_ends() {
        let uploads = Uploads::new(&UploadLimits { max_uploads: 2, upload_rate: 0 });
        let a = uploads.try_start().expect("first");
        let _b = uploads.try_start().expect("second");
        assert!(uploads.try_start().is_none());
        drop(a);
        assert!(uploads.try_start().is_some());
    }
}
