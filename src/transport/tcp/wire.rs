//! The messages on the wire and their encoding: a version byte, then postcard.
//!
//! One enum per direction, [`ClientMessage`] and [`ServerMessage`], holds both the handshake and
//! the request/reply frames, so a frame always says what it is and a message out of turn (a
//! request before the handshake finished, a `Hello` after it) is recognised and refused.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::bytes::Bytes;
use tokio_util::codec::{LengthDelimitedCodec, LengthDelimitedCodecError};

use crate::api::{PeerReply, PeerRequest};

/// The protocol version: the first byte of every frame, and the `version` of [`ClientMessage::Hello`].
/// Version 2 added the tag to every frame after the handshake; version 3 the checkpoint settings
/// of copy options.
pub(super) const PROTOCOL_VERSION: u8 = 3;

/// Length of the authentication tag that ends every frame after the handshake (see `auth`).
pub(super) const TAG_BYTES: usize = 32;

/// Length of a nonce and of a proof, in bytes.
pub(super) const NONCE_BYTES: usize = 32;

/// A random number used once per handshake.
pub(super) type Nonce = [u8; NONCE_BYTES];

/// A BLAKE3 keyed hash proving knowledge of the cluster key.
pub(super) type Proof = [u8; 32];

/// One multiplexed request or reply: `id` pairs a reply with its request on one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Frame<T> {
    pub(super) id: u64,
    pub(super) body: T,
}

/// What a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum ClientMessage {
    /// Opens the handshake.
    Hello { version: u8, client_nonce: Nonce },
    /// The client's answer to the server's challenge.
    Proof { proof: Proof },
    /// A request, once the server said `Welcome`.
    Request(Frame<PeerRequest>),
}

/// What a server sends.
// A message lives only between the handler and the encoder (or the decoder and the waiting
// call); boxing the large reply would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum ServerMessage {
    /// The server's nonce, and its proof over both nonces.
    Challenge { server_nonce: Nonce, server_proof: Proof },
    /// The client is authenticated; requests may follow.
    Welcome,
    /// The handshake failed; the server closes the connection after this.
    Refused { reason: String },
    /// The reply to request `id`.
    Reply(Frame<PeerReply>),
    /// Request `id` got no reply, for the reason given.
    Failed { id: u64, failure: Failure },
}

/// Why a server could not send a request's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Failure {
    /// The reply does not fit in a frame.
    TooLarge { bytes: u64, limit: u64 },
    /// The handler panicked, or its reply could not be encoded.
    Internal { reason: String },
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum WireError {
    /// The frame is empty: not even a version byte.
    #[error("empty frame")]
    Empty,
    /// The frame starts with a version this node does not speak.
    #[error("protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// The bytes after the version are not a valid message.
    #[error("undecodable message: {0}")]
    Malformed(String),
    /// The encoded message exceeds the frame limit.
    #[error("message of {bytes} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// The frame's tag is not the one the next frame from the authenticated peer must carry.
    #[error("frame failed authentication (altered, injected, replayed or reordered on the way)")]
    Forged,
}

/// The frame codec: a 4-byte big-endian length, then that many bytes, at most `max_frame_bytes`.
pub(super) fn codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(max_frame_bytes).new_codec()
}

/// Says why a frame could not be read; an oversized one is named as such, with the limit.
pub(super) fn read_error(error: &std::io::Error, max_frame_bytes: usize) -> String {
    match error.get_ref() {
        Some(inner) if inner.is::<LengthDelimitedCodecError>() => {
            format!("frame larger than the limit of {max_frame_bytes} bytes")
        }
        _ => error.to_string(),
    }
}

/// Encodes `message` as one frame body: the version byte, then postcard. Room is left for the
/// tag: the body may take `max_frame_bytes - TAG_BYTES`.
pub(super) fn encode<T: Serialize>(message: &T, max_frame_bytes: usize) -> Result<Bytes, WireError> {
    let body = postcard::to_extend(message, vec![PROTOCOL_VERSION]).map_err(|e| WireError::Malformed(e.to_string()))?;
    if body.len() + TAG_BYTES > max_frame_bytes {
        return Err(WireError::TooLarge { bytes: body.len() + TAG_BYTES, limit: max_frame_bytes });
    }
    Ok(Bytes::from(body))
}

/// Decodes one frame body; trailing bytes make it malformed.
pub(super) fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, WireError> {
    match frame.split_first() {
        Some((&PROTOCOL_VERSION, rest)) => {
            let (message, trailing) =
                postcard::take_from_bytes(rest).map_err(|e| WireError::Malformed(e.to_string()))?;
            if !trailing.is_empty() {
                return Err(WireError::Malformed(format!("{} trailing bytes", trailing.len())));
            }
            Ok(message)
        }
        Some((&found, _)) => Err(WireError::Version(found)),
        None => Err(WireError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiError, ClientRequest};
    use crate::model::{NodeId, TaskId};

    const LIMIT: usize = 1 << 20;

    #[test]
    fn messages_round_trip() {
        let id = TaskId::generate();
        let client = [
            ClientMessage::Hello { version: PROTOCOL_VERSION, client_nonce: [7; 32] },
            ClientMessage::Proof { proof: [9; 32] },
            ClientMessage::Request(Frame { id: u64::MAX, body: PeerRequest::Client(ClientRequest::Show { id }) }),
            ClientMessage::Request(Frame { id: 1, body: PeerRequest::Ping }),
        ];
        for message in client {
            let bytes = encode(&message, LIMIT).unwrap();
            assert_eq!(bytes[0], PROTOCOL_VERSION);
            assert_eq!(decode::<ClientMessage>(&bytes).unwrap(), message);
        }
        let server = [
            ServerMessage::Challenge { server_nonce: [1; 32], server_proof: [2; 32] },
            ServerMessage::Welcome,
            ServerMessage::Refused { reason: "no".into() },
            ServerMessage::Reply(Frame { id: 3, body: PeerReply::Pong { node: NodeId::new("n1").unwrap() } }),
            ServerMessage::Reply(Frame { id: 4, body: PeerReply::Client(Err(ApiError::NotFound { id })) }),
            ServerMessage::Failed { id: 5, failure: Failure::TooLarge { bytes: 10, limit: 5 } },
        ];
        for message in server {
            assert_eq!(decode::<ServerMessage>(&encode(&message, LIMIT).unwrap()).unwrap(), message);
        }
    }

    #[test]
    fn the_hello_layout_is_fixed() {
        // Version byte, variant 0, version, then the 32 nonce bytes: what any v3 peer sends.
        let bytes = encode(&ClientMessage::Hello { version: 3, client_nonce: [0xAB; 32] }, LIMIT).unwrap();
        let mut expected = vec![3, 0, 3];
        expected.extend([0xAB; 32]);
        assert_eq!(&bytes[..], &expected[..]);
    }

    #[test]
    fn bad_frames_are_refused() {
        let good = encode(&ClientMessage::Request(Frame { id: 1, body: PeerRequest::Ping }), LIMIT).unwrap();
        assert_eq!(decode::<ClientMessage>(&[]), Err(WireError::Empty));
        let mut other_version = good.to_vec();
        other_version[0] = PROTOCOL_VERSION + 1;
        assert_eq!(decode::<ClientMessage>(&other_version), Err(WireError::Version(PROTOCOL_VERSION + 1)));
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert!(matches!(decode::<ClientMessage>(&trailing), Err(WireError::Malformed(_))));
        assert!(matches!(decode::<ClientMessage>(&[PROTOCOL_VERSION, 0xFF, 0xFF]), Err(WireError::Malformed(_))));
        assert!(matches!(decode::<ClientMessage>(&good[..good.len() - 1]), Err(WireError::Malformed(_))));
    }

    #[test]
    fn an_oversized_message_is_not_encoded() {
        let message = ServerMessage::Refused { reason: "x".repeat(100) };
        assert!(matches!(encode(&message, 50), Err(WireError::TooLarge { limit: 50, .. })));
    }
}
