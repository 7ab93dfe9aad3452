//! The private network: every libp2p connection is wrapped in a stream cipher keyed by the
//! cluster's pre-shared key before anything else is said, so a process without the secret
//! cannot complete a handshake, join the DHT, or advertise.
//!
//! The wire format is libp2p's private-network protocol (PSK v1): each side sends a random
//! 24-byte nonce, then everything it writes is XORed with XSalsa20(psk, its nonce). During
//! a rotation a listener holds several keys: it tells which one the dialer used by
//! decrypting the dialer's first bytes, which are always multistream-select's header.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use salsa20::XSalsa20;
use salsa20::cipher::{KeyIvInit, StreamCipher};

const NONCE_LEN: usize = 24;
/// multistream-select's header as every dialer sends it first: a length prefix, then the
/// protocol line.
const FIRST_BYTES: &[u8] = b"\x13/multistream/1.0.0\n";
/// Plaintext accepted per write before it is on its way (bounds the buffer).
const MAX_PENDING: usize = 64 * 1024;

/// The keys a node holds: the first dials, any is accepted.
#[derive(Clone)]
pub(crate) struct Keys(Arc<[[u8; 32]]>);

impl Keys {
    pub(crate) fn new(psks: Vec<[u8; 32]>) -> Option<Self> {
        (!psks.is_empty()).then(|| Self(psks.into()))
    }
}

/// A connection under the private network's cipher (or in the clear, with no keys).
pub(crate) struct Sealed<S> {
    inner: S,
    ciphers: Option<(XSalsa20, XSalsa20)>,
    /// Decrypted bytes read during the handshake, not yet handed to the reader.
    replay: Vec<u8>,
    /// Encrypted bytes accepted from the writer, not yet written.
    pending: Vec<u8>,
    pending_at: usize,
}

impl<S> Sealed<S> {
    pub(crate) fn plain(inner: S) -> Self {
        Self { inner, ciphers: None, replay: Vec::new(), pending: Vec::new(), pending_at: 0 }
    }
}

/// Dials: our nonce out, theirs in, under the key in use.
pub(crate) async fn dial<S: AsyncRead + AsyncWrite + Unpin>(mut socket: S, keys: &Keys) -> io::Result<Sealed<S>> {
    let ours = send_nonce(&mut socket).await?;
    let theirs = read_nonce(&mut socket).await?;
    let key = &keys.0[0];
    Ok(sealed(socket, key, &ours, &theirs))
}

/// Accepts: our nonce out, theirs in, then the first bytes they sent tell which of our keys
/// they hold; none of them is a refusal.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(mut socket: S, keys: &Keys) -> io::Result<Sealed<S>> {
    let ours = send_nonce(&mut socket).await?;
    let theirs = read_nonce(&mut socket).await?;
    let mut first = [0u8; FIRST_BYTES.len()];
    socket.read_exact(&mut first).await?;
    for key in keys.0.iter() {
        let mut reader = XSalsa20::new(key.into(), &theirs.into());
        let mut plain = first;
        reader.apply_keystream(&mut plain);
        if plain == FIRST_BYTES {
            let writer = XSalsa20::new(key.into(), &ours.into());
            return Ok(Sealed {
                inner: socket,
                ciphers: Some((reader, writer)),
                replay: plain.to_vec(),
                pending: Vec::new(),
                pending_at: 0,
            });
        }
    }
    Err(io::Error::new(io::ErrorKind::PermissionDenied, "the peer does not hold the cluster secret"))
}

fn sealed<S>(inner: S, key: &[u8; 32], ours: &[u8; NONCE_LEN], theirs: &[u8; NONCE_LEN]) -> Sealed<S> {
    let reader = XSalsa20::new(key.into(), theirs.into());
    let writer = XSalsa20::new(key.into(), ours.into());
    Sealed { inner, ciphers: Some((reader, writer)), replay: Vec::new(), pending: Vec::new(), pending_at: 0 }
}

async fn send_nonce<S: AsyncWrite + Unpin>(socket: &mut S) -> io::Result<[u8; NONCE_LEN]> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    socket.write_all(&nonce).await?;
    socket.flush().await?;
    Ok(nonce)
}

async fn read_nonce<S: AsyncRead + Unpin>(socket: &mut S) -> io::Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    socket.read_exact(&mut nonce).await?;
    Ok(nonce)
}

impl<S: AsyncWrite + Unpin> Sealed<S> {
    /// Writes what is pending; `Ready` once nothing is.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_at < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.pending_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_at += n;
        }
        self.pending.clear();
        self.pending_at = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sealed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = buf.len().min(this.replay.len());
            buf[..n].copy_from_slice(&this.replay[..n]);
            this.replay.drain(..n);
            return Poll::Ready(Ok(n));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some((reader, _)) = &mut this.ciphers {
            reader.apply_keystream(&mut buf[..n]);
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sealed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.ciphers.is_none() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // Bytes once encrypted must be written: they wait in `pending`, whose previous
        // contents go first.
        ready!(this.poll_drain(cx))?;
        let n = buf.len().min(MAX_PENDING);
        this.pending.extend_from_slice(&buf[..n]);
        if let Some((_, writer)) = &mut this.ciphers {
            writer.apply_keystream(&mut this.pending);
        }
        // Start writing now; what does not fit waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::io::Cursor;

    fn keys(seeds: &[u8]) -> Keys {
        Keys::new(seeds.iter().map(|s| [*s; 32]).collect()).unwrap()
    }

    /// A pair of connected in-memory pipes (each side reads what the other wrote).
    async fn pair()
    -> (tokio_util::compat::Compat<tokio::io::DuplexStream>, tokio_util::compat::Compat<tokio::io::DuplexStream>) {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (a, b) = tokio::io::duplex(1 << 20);
        (a.compat(), b.compat())
    }

    async fn talk(dial_keys: Keys, accept_keys: Keys) -> io::Result<Vec<u8>> {
        let (a, b) = pair().await;
        let dialer = async move {
            let mut s = dial(a, &dial_keys).await?;
            s.write_all(FIRST_BYTES).await?;
            s.write_all(&vec![7u8; 200_000]).await?;
            s.flush().await?;
            let mut reply = vec![0u8; 5];
            s.read_exact(&mut reply).await?;
            Ok::<_, io::Error>(reply)
        };
        let listener = async move {
            let mut s = accept(b, &accept_keys).await?;
            let mut got = vec![0u8; FIRST_BYTES.len() + 200_000];
            s.read_exact(&mut got).await?;
            assert_eq!(&got[..FIRST_BYTES.len()], FIRST_BYTES);
            assert!(got[FIRST_BYTES.len()..].iter().all(|b| *b == 7));
            s.write_all(b"hello").await?;
            s.flush().await?;
            Ok::<_, io::Error>(())
        };
        let (reply, accepted) = tokio::join!(dialer, listener);
        accepted?;
        reply
    }

    #[tokio::test]
    async fn members_talk_through_the_cipher() {
        assert_eq!(talk(keys(&[1]), keys(&[1])).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn during_a_rotation_a_listener_accepts_either_key() {
        assert_eq!(talk(keys(&[2]), keys(&[1, 2])).await.unwrap(), b"hello");
        assert_eq!(talk(keys(&[1, 2]), keys(&[2, 1])).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn a_dialer_without_the_key_is_refused() {
        let err = talk(keys(&[3]), keys(&[1, 2])).await.unwrap_err();
        assert!(err.kind() == io::ErrorKind::PermissionDenied || err.kind() == io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[tokio::test]
    async fn whatever_a_non_member_sends_is_refused_without_panic() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        for len in [0usize, 10, 24, 30, 44, 45, 200] {
            let garbage: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            let (mut a, b) = pair().await;
            a.write_all(&garbage).await.unwrap();
            a.close().await.unwrap();
            let accepted = accept(b, &keys(&[1, 2])).await;
            assert!(accepted.is_err(), "{len} random bytes were accepted");
        }
    }

    #[tokio::test]
    async fn bytes_on_the_wire_are_not_the_plaintext() {
        let mut wire = Cursor::new(Vec::new());
        let mut out = sealed(&mut wire, &[9; 32], &[1; NONCE_LEN], &[2; NONCE_LEN]);
        out.write_all(FIRST_BYTES).await.unwrap();
        out.flush().await.unwrap();
        let written = wire.into_inner();
        assert_eq!(written.len(), FIRST_BYTES.len());
        assert_ne!(written, FIRST_BYTES);
    }
}
