//! Mutual challenge-response authentication with the cluster secret, and the authentication
//! of every frame after it.
//!
//! ```text
//! key          = BLAKE3-derive-key("task-center transport v1", secret)
//! server_proof = BLAKE3-keyed(key, "server" || client_nonce || server_nonce)
//! client_proof = BLAKE3-keyed(key, "client" || server_nonce || client_nonce)
//! client_key   = BLAKE3-keyed(key, "client frames" || client_nonce || server_nonce)
//! server_key   = BLAKE3-keyed(key, "server frames" || client_nonce || server_nonce)
//! tag of the n-th frame a side sends after Welcome (n = 0, 1, ...)
//!              = BLAKE3-keyed(its key, n as 8 bytes little-endian || frame)
//! ```
//!
//! Each side proves it knows the key over a fresh nonce of the other side, so a recorded proof
//! is worth nothing later; the `"server"` / `"client"` labels make one side's proof useless as
//! the other's, so a node cannot be used as an oracle against itself. The secret never crosses
//! the wire. Proofs are compared in constant time (`blake3::Hash` equality).
//!
//! After `Welcome` each side appends the 32-byte tag to every frame it sends and checks the tag
//! of every frame it receives, counting frames per direction: a frame altered, injected,
//! dropped, replayed, reordered or reflected back to its sender (each direction has its own key)
//! fails the check, and the connection is closed. The keys are fresh per connection (both
//! nonces), so a frame recorded on one connection is worth nothing on another. Frames are not
//! encrypted: someone on the path can read requests and replies (task specs, progress), so run
//! the cluster network on trusted links or under WireGuard if that matters.

use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::bytes::{Bytes, BytesMut};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::wire::{
    self, ClientMessage, Nonce, Proof, ServerMessage, WireError, NONCE_BYTES, PROTOCOL_VERSION, TAG_BYTES,
};

/// The key-derivation context: names the protocol and its version, so the key is good for
/// nothing else.
const KEY_CONTEXT: &str = "task-center transport v1";

/// The key both sides derive from the cluster secret.
#[derive(Clone)]
pub(super) struct ClusterKey([u8; 32]);

impl ClusterKey {
    pub(super) fn derive(secret: &[u8]) -> Self {
        ClusterKey(blake3::derive_key(KEY_CONTEXT, secret))
    }

    fn mac(&self, label: &[u8], first: &Nonce, second: &Nonce) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(label).update(first).update(second);
        hasher.finalize()
    }

    pub(super) fn server_proof(&self, client_nonce: &Nonce, server_nonce: &Nonce) -> Proof {
        *self.mac(b"server", client_nonce, server_nonce).as_bytes()
    }

    pub(super) fn client_proof(&self, server_nonce: &Nonce, client_nonce: &Nonce) -> Proof {
        *self.mac(b"client", server_nonce, client_nonce).as_bytes()
    }

    fn verify_server(&self, client_nonce: &Nonce, server_nonce: &Nonce, proof: &Proof) -> bool {
        // `blake3::Hash` equality is constant-time.
        self.mac(b"server", client_nonce, server_nonce) == blake3::Hash::from_bytes(*proof)
    }

    fn verify_client(&self, server_nonce: &Nonce, client_nonce: &Nonce, proof: &Proof) -> bool {
        self.mac(b"client", server_nonce, client_nonce) == blake3::Hash::from_bytes(*proof)
    }

    /// The frame keys of the connection whose handshake used these nonces, for `side`.
    fn session(&self, client_nonce: &Nonce, server_nonce: &Nonce, side: Side) -> Session {
        let client = *self.mac(b"client frames", client_nonce, server_nonce).as_bytes();
        let server = *self.mac(b"server frames", client_nonce, server_nonce).as_bytes();
        let (mine, theirs) = match side {
            Side::Client => (client, server),
            Side::Server => (server, client),
        };
        Session { sealer: Sealer { key: mine, sent: 0 }, opener: Opener { key: theirs, received: 0 } }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Session").field("sent", &self.sealer.sent).field("received", &self.opener.received).finish()
    }
}

/// Which end of a connection.
#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// What an authenticated connection needs after the handshake: a sealer for the frames it
/// sends (used by its one writer) and an opener for those it receives (by its one reader).
pub(super) struct Session {
    pub(super) sealer: Sealer,
    pub(super) opener: Opener,
}

/// The tag of frame number `counter` under `key`.
fn tag(key: &[u8; 32], counter: u64, frame: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&counter.to_le_bytes()).update(frame);
    hasher.finalize()
}

/// Appends the tag to each frame one side sends, in order.
pub(super) struct Sealer {
    key: [u8; 32],
    sent: u64,
}

impl Sealer {
    /// `frame` followed by its tag; the next frame gets the next number.
    pub(super) fn seal(&mut self, frame: Bytes) -> Bytes {
        let tag = tag(&self.key, self.sent, &frame);
        self.sent += 1;
        let mut sealed = BytesMut::with_capacity(frame.len() + TAG_BYTES);
        sealed.extend_from_slice(&frame);
        sealed.extend_from_slice(tag.as_bytes());
        sealed.freeze()
    }
}

/// Checks the tag of each frame one side receives, in order.
pub(super) struct Opener {
    key: [u8; 32],
    received: u64,
}

impl Opener {
    /// The frame without its tag, if the tag is the one the next frame must carry
    /// ([`WireError::Forged`] otherwise; the caller closes the connection).
    pub(super) fn open<'a>(&mut self, sealed: &'a [u8]) -> Result<&'a [u8], WireError> {
        let split = sealed.len().checked_sub(TAG_BYTES).ok_or(WireError::Forged)?;
        let (frame, given) = sealed.split_at(split);
        let given: [u8; TAG_BYTES] = given.try_into().expect("split TAG_BYTES from the end");
        // `blake3::Hash` equality is constant-time.
        if tag(&self.key, self.received, frame) != blake3::Hash::from_bytes(given) {
            return Err(WireError::Forged);
        }
        self.received += 1;
        Ok(frame)
    }
}

/// A fresh random nonce from the operating system.
pub(super) fn nonce() -> Result<Nonce, HandshakeError> {
    let mut nonce = [0; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| HandshakeError::Io(format!("no randomness for a nonce: {e}")))?;
    Ok(nonce)
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HandshakeError {
    /// The other side closed the connection.
    #[error("connection closed during the handshake")]
    Closed,
    /// Reading or writing failed, or a frame was oversized.
    #[error("{0}")]
    Io(String),
    /// The other side sent something that is not a message of this protocol.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The other side sent a valid message at the wrong moment.
    #[error("unexpected {0} during the handshake")]
    Unexpected(&'static str),
    /// The other side's proof is wrong: it does not know the cluster secret.
    #[error("the peer could not prove it knows the cluster secret")]
    BadProof,
    /// The server refused us, for the reason it gave.
    #[error("{0}")]
    Refused(String),
}

type Stream<T> = Framed<T, LengthDelimitedCodec>;

async fn send<T, M>(framed: &mut Stream<T>, message: &M, max_frame_bytes: usize) -> Result<(), HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    M: serde::Serialize,
{
    let bytes = wire::encode(message, max_frame_bytes)?;
    framed.send(bytes).await.map_err(|e| HandshakeError::Io(e.to_string()))
}

async fn receive<T, M>(framed: &mut Stream<T>, max_frame_bytes: usize) -> Result<M, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    M: DeserializeOwned,
{
    match framed.next().await {
        None => Err(HandshakeError::Closed),
        Some(Err(e)) => Err(HandshakeError::Io(wire::read_error(&e, max_frame_bytes))),
        Some(Ok(frame)) => Ok(wire::decode(&frame)?),
    }
}

/// The client's half: returns the connection's frame keys once the server said `Welcome`.
pub(super) async fn client_handshake<T>(
    framed: &mut Stream<T>,
    key: &ClusterKey,
    max_frame_bytes: usize,
) -> Result<Session, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let client_nonce = nonce()?;
    send(framed, &ClientMessage::Hello { version: PROTOCOL_VERSION, client_nonce }, max_frame_bytes).await?;
    let server_nonce = match receive(framed, max_frame_bytes).await? {
        ServerMessage::Challenge { server_nonce, server_proof } => {
            if !key.verify_server(&client_nonce, &server_nonce, &server_proof) {
                return Err(HandshakeError::BadProof);
            }
            server_nonce
        }
        ServerMessage::Refused { reason } => return Err(HandshakeError::Refused(reason)),
        _ => return Err(HandshakeError::Unexpected("message instead of the challenge")),
    };
    let proof = key.client_proof(&server_nonce, &client_nonce);
    send(framed, &ClientMessage::Proof { proof }, max_frame_bytes).await?;
    match receive(framed, max_frame_bytes).await? {
        ServerMessage::Welcome => Ok(key.session(&client_nonce, &server_nonce, Side::Client)),
        ServerMessage::Refused { reason } => Err(HandshakeError::Refused(reason)),
        _ => Err(HandshakeError::Unexpected("message instead of the welcome")),
    }
}

/// The server's half: returns the connection's frame keys once the client is authenticated and
/// welcomed. On a wrong proof or version it sends `Refused` (best effort) before returning the
/// error; the caller closes.
pub(super) async fn server_handshake<T>(
    framed: &mut Stream<T>,
    key: &ClusterKey,
    max_frame_bytes: usize,
) -> Result<Session, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let client_nonce = match receive(framed, max_frame_bytes).await {
        Ok(ClientMessage::Hello { version: PROTOCOL_VERSION, client_nonce }) => client_nonce,
        Ok(ClientMessage::Hello { version, .. }) => {
            return refuse(framed, WireError::Version(version).into(), max_frame_bytes).await;
        }
        Err(e @ HandshakeError::Wire(WireError::Version(_))) => return refuse(framed, e, max_frame_bytes).await,
        Ok(_) => return Err(HandshakeError::Unexpected("message instead of the hello")),
        Err(e) => return Err(e),
    };
    let server_nonce = nonce()?;
    let server_proof = key.server_proof(&client_nonce, &server_nonce);
    send(framed, &ServerMessage::Challenge { server_nonce, server_proof }, max_frame_bytes).await?;
    match receive(framed, max_frame_bytes).await? {
        ClientMessage::Proof { proof } if key.verify_client(&server_nonce, &client_nonce, &proof) => {
            send(framed, &ServerMessage::Welcome, max_frame_bytes).await?;
            Ok(key.session(&client_nonce, &server_nonce, Side::Server))
        }
        ClientMessage::Proof { .. } => refuse(framed, HandshakeError::BadProof, max_frame_bytes).await,
        _ => Err(HandshakeError::Unexpected("message instead of the proof")),
    }
}

/// Tells the client why it is refused, then returns `error`.
async fn refuse<T, R>(
    framed: &mut Stream<T>,
    error: HandshakeError,
    max_frame_bytes: usize,
) -> Result<R, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let reason = match &error {
        HandshakeError::BadProof => "authentication failed: wrong cluster secret".to_string(),
        other => other.to_string(),
    };
    // Best effort: the connection is closed right after, whether or not this arrives.
    let _ = send(framed, &ServerMessage::Refused { reason }, max_frame_bytes).await;
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 16;

    fn pair() -> (Stream<tokio::io::DuplexStream>, Stream<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        (Framed::new(a, wire::codec(LIMIT)), Framed::new(b, wire::codec(LIMIT)))
    }

    #[test]
    fn proofs_depend_on_the_key_the_nonces_and_the_side() {
        let key = ClusterKey::derive(b"0123456789abcdef");
        let (a, b) = ([1; 32], [2; 32]);
        let proof = key.server_proof(&a, &b);
        assert!(key.verify_server(&a, &b, &proof));
        assert!(!key.verify_server(&b, &a, &proof), "nonces are ordered");
        assert!(!key.verify_client(&a, &b, &proof), "a server proof is no client proof");
        assert!(!ClusterKey::derive(b"0123456789abcdeF").verify_server(&a, &b, &proof));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }

    /// A welcomed pair of sessions: (client's, server's).
    async fn sessions() -> (Session, Session) {
        let key = ClusterKey::derive(b"0123456789abcdef");
        let (mut client, mut server) = pair();
        let (c, s) =
            tokio::join!(client_handshake(&mut client, &key, LIMIT), server_handshake(&mut server, &key, LIMIT));
        (c.expect("client welcomed"), s.expect("server welcomed"))
    }

    #[tokio::test]
    async fn the_same_secret_is_welcomed_and_frames_pass_both_ways_in_order() {
        let (mut client, mut server) = sessions().await;
        for n in 0..3u8 {
            let sealed = client.sealer.seal(Bytes::from(vec![n; 5]));
            assert_eq!(sealed.len(), 5 + TAG_BYTES);
            assert_eq!(server.opener.open(&sealed), Ok(&[n; 5][..]));
            let sealed = server.sealer.seal(Bytes::from(vec![n + 10; 3]));
            assert_eq!(client.opener.open(&sealed), Ok(&[n + 10; 3][..]));
        }
    }

    #[tokio::test]
    async fn altered_replayed_reordered_reflected_and_foreign_frames_are_forged() {
        let (mut client, mut server) = sessions().await;
        let first = client.sealer.seal(Bytes::from_static(b"first"));
        let second = client.sealer.seal(Bytes::from_static(b"second"));
        // Reordered: the second frame where the first is due.
        assert_eq!(server.opener.open(&second), Err(WireError::Forged));
        // Altered: one bit of the body, or of the tag.
        for at in [0, first.len() - 1] {
            let mut altered = first.to_vec();
            altered[at] ^= 1;
            assert_eq!(server.opener.open(&altered), Err(WireError::Forged));
        }
        // Too short to hold a tag.
        assert_eq!(server.opener.open(&first[..TAG_BYTES - 1]), Err(WireError::Forged));
        // A refused frame does not move the count: the genuine ones still pass, in order.
        assert_eq!(server.opener.open(&first), Ok(&b"first"[..]));
        // Replayed.
        assert_eq!(server.opener.open(&first), Err(WireError::Forged));
        assert_eq!(server.opener.open(&second), Ok(&b"second"[..]));
        // Reflected: the client's own frame sent back to it (each direction has its own key).
        let third = client.sealer.seal(Bytes::from_static(b"third"));
        assert_eq!(client.opener.open(&third), Err(WireError::Forged));
        // From another connection of the same cluster: other nonces, other keys.
        let (mut other_client, _) = sessions().await;
        let foreign = other_client.sealer.seal(Bytes::from_static(b"third"));
        assert_eq!(server.opener.open(&foreign), Err(WireError::Forged));
        assert_eq!(server.opener.open(&third), Ok(&b"third"[..]));
    }

    #[tokio::test]
    async fn each_side_refuses_a_wrong_secret() {
        let (mut client, mut server) = pair();
        let client_key = ClusterKey::derive(b"0123456789abcdef");
        let server_key = ClusterKey::derive(b"fedcba9876543210");
        let (c, s) = tokio::join!(
            async {
                let result = client_handshake(&mut client, &client_key, LIMIT).await;
                drop(client);
                result
            },
            server_handshake(&mut server, &server_key, LIMIT)
        );
        // The client checks the server's proof first and hangs up.
        assert!(matches!(c, Err(HandshakeError::BadProof)));
        assert!(matches!(s, Err(HandshakeError::Closed)));
    }

    #[tokio::test]
    async fn the_server_refuses_a_client_proof_that_is_wrong() {
        let key = ClusterKey::derive(b"0123456789abcdef");
        let (mut client, mut server) = pair();
        let cheat = async {
            let hello = ClientMessage::Hello { version: PROTOCOL_VERSION, client_nonce: [0; 32] };
            send(&mut client, &hello, LIMIT).await.unwrap();
            let _: ServerMessage = receive(&mut client, LIMIT).await.unwrap();
            send(&mut client, &ClientMessage::Proof { proof: [0; 32] }, LIMIT).await.unwrap();
            receive::<_, ServerMessage>(&mut client, LIMIT).await.unwrap()
        };
        let (answer, s) = tokio::join!(cheat, server_handshake(&mut server, &key, LIMIT));
        assert!(matches!(answer, ServerMessage::Refused { reason } if reason.contains("wrong cluster secret")));
        assert!(matches!(s, Err(HandshakeError::BadProof)));
    }

    #[tokio::test]
    async fn the_server_refuses_another_version() {
        let key = ClusterKey::derive(b"0123456789abcdef");
        let (mut client, mut server) = pair();
        let newer = async {
            client.send(Bytes::from_static(&[9, 0, 9])).await.unwrap();
            receive::<_, ServerMessage>(&mut client, LIMIT).await.unwrap()
        };
        let (answer, s) = tokio::join!(newer, server_handshake(&mut server, &key, LIMIT));
        assert!(matches!(answer, ServerMessage::Refused { ref reason } if reason.contains("version")), "{answer:?}");
        assert!(matches!(s, Err(HandshakeError::Wire(WireError::Version(9)))));
    }
}
