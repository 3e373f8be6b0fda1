//! Settings of the TCP transport, their defaults and their validation.

use std::time::Duration;

/// Settings of the [`TcpTransport`](super::TcpTransport). Every node of a cluster must use the
/// same `secret`; the other fields are local.
#[derive(Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// The cluster secret both sides of a connection prove they know. Required, at least
    /// [`TcpConfig::MIN_SECRET_BYTES`] bytes. Never sent over the wire, never logged.
    pub secret: Vec<u8>,
    /// Largest frame (one encoded message) sent or accepted, in bytes. A larger incoming frame
    /// closes the connection; a larger outgoing message fails its call with `TooLarge`.
    /// Default [`TcpConfig::DEFAULT_MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// Limit on opening a connection and authenticating, on both sides. Default
    /// [`TcpConfig::DEFAULT_CONNECT_TIMEOUT_MS`].
    pub connect_timeout_ms: u64,
    /// Calls waiting for replies on one client connection. Default
    /// [`TcpConfig::DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION`].
    pub max_in_flight_per_connection: usize,
    /// Requests one server connection runs at once. Default
    /// [`TcpConfig::DEFAULT_MAX_CONCURRENT_REQUESTS_PER_CONNECTION`].
    pub max_concurrent_requests_per_connection: usize,
    /// Connections one listener serves at once. Default
    /// [`TcpConfig::DEFAULT_MAX_CONNECTIONS_PER_LISTENER`].
    pub max_connections_per_listener: usize,
    /// First wait after a failed connection attempt; it doubles with each further failure.
    /// Default [`TcpConfig::DEFAULT_RECONNECT_BACKOFF_MIN_MS`].
    pub reconnect_backoff_min_ms: u64,
    /// Longest wait between connection attempts to one address. Default
    /// [`TcpConfig::DEFAULT_RECONNECT_BACKOFF_MAX_MS`].
    pub reconnect_backoff_max_ms: u64,
}

/// A [`TcpConfig`] field holds a value that cannot work. Final: fix the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid TCP transport setting {field}: {reason}")]
pub struct TcpConfigError {
    /// The field, as named in [`TcpConfig`].
    pub field: &'static str,
    /// What is wrong with it (never the secret itself).
    pub reason: String,
}

impl TcpConfig {
    /// Shortest cluster secret accepted: 16 bytes (128 bits) is the least that cannot be guessed
    /// online; a random 32-byte secret is better.
    pub const MIN_SECRET_BYTES: usize = 16;

    /// Default largest frame: 16 MiB. The largest message is a list answer of
    /// [`MAX_LIST_LIMIT`](crate::api::MAX_LIST_LIMIT) tasks, a few MiB; the limit keeps a peer from
    /// making us buffer an arbitrary amount before a frame is even decoded.
    pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

    /// Smallest frame limit accepted: 4 KiB, so that every handshake message and small request fits.
    pub const MIN_MAX_FRAME_BYTES: usize = 4 * 1024;

    /// Largest frame limit accepted: what the 4-byte length prefix of a frame can express.
    pub const MAX_MAX_FRAME_BYTES: usize = u32::MAX as usize;

    /// Default limit on connecting and authenticating: 3 s. A loopback or LAN handshake takes
    /// well under a millisecond; 3 s rides out a few lost SYNs, and bounds how long a silent
    /// client can hold a server's connection slot.
    pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;

    /// Default bound on the calls waiting for replies on one client connection: 256. Callers past
    /// it wait (within their timeout) for a slot, so one busy peer cannot grow memory without bound.
    pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;

    /// Default bound on requests one server connection runs at once: 64. Past it the server stops
    /// reading that connection until a request finishes: TCP flow control pushes back on the peer.
    pub const DEFAULT_MAX_CONCURRENT_REQUESTS_PER_CONNECTION: usize = 64;

    /// Default bound on the connections one listener serves at once: 1024, far above a cluster's
    /// node count; a connection past it is closed on accept, with a warning.
    pub const DEFAULT_MAX_CONNECTIONS_PER_LISTENER: usize = 1024;

    /// Default first wait after a failed connection attempt: 50 ms, short enough that a restarted
    /// peer is reached again quickly.
    pub const DEFAULT_RECONNECT_BACKOFF_MIN_MS: u64 = 50;

    /// Default longest wait between connection attempts to one address: 5 s, so a dead peer costs
    /// one connection attempt per 5 s, while a returning peer is reached within 5 s.
    pub const DEFAULT_RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;

    /// Settings with `secret` and the defaults for everything else.
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        TcpConfig {
            secret: secret.into(),
            max_frame_bytes: Self::DEFAULT_MAX_FRAME_BYTES,
            connect_timeout_ms: Self::DEFAULT_CONNECT_TIMEOUT_MS,
            max_in_flight_per_connection: Self::DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            max_concurrent_requests_per_connection: Self::DEFAULT_MAX_CONCURRENT_REQUESTS_PER_CONNECTION,
            max_connections_per_listener: Self::DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
            reconnect_backoff_min_ms: Self::DEFAULT_RECONNECT_BACKOFF_MIN_MS,
            reconnect_backoff_max_ms: Self::DEFAULT_RECONNECT_BACKOFF_MAX_MS,
        }
    }

    /// Checks every field; the error names the first one that cannot work.
    pub fn validate(&self) -> Result<(), TcpConfigError> {
        let invalid = |field: &'static str, reason: String| Err(TcpConfigError { field, reason });
        if self.secret.len() < Self::MIN_SECRET_BYTES {
            return invalid(
                "secret",
                format!("{} bytes given, at least {} are required", self.secret.len(), Self::MIN_SECRET_BYTES),
            );
        }
        if !(Self::MIN_MAX_FRAME_BYTES..=Self::MAX_MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return invalid(
                "max_frame_bytes",
                format!(
                    "{} is outside {}..={}",
                    self.max_frame_bytes,
                    Self::MIN_MAX_FRAME_BYTES,
                    Self::MAX_MAX_FRAME_BYTES
                ),
            );
        }
        if self.connect_timeout_ms == 0 {
            return invalid("connect_timeout_ms", "must be positive".into());
        }
        let counts = [
            ("max_in_flight_per_connection", self.max_in_flight_per_connection),
            ("max_concurrent_requests_per_connection", self.max_concurrent_requests_per_connection),
            ("max_connections_per_listener", self.max_connections_per_listener),
        ];
        for (field, value) in counts {
            // Semaphores hold at most `Semaphore::MAX_PERMITS`; no sane limit comes near it.
            if value == 0 || value > u32::MAX as usize {
                return invalid(field, format!("{value} is outside 1..={}", u32::MAX));
            }
        }
        if self.reconnect_backoff_min_ms == 0 {
            return invalid("reconnect_backoff_min_ms", "must be positive".into());
        }
        if self.reconnect_backoff_max_ms < self.reconnect_backoff_min_ms {
            return invalid(
                "reconnect_backoff_max_ms",
                format!(
                    "{} is below reconnect_backoff_min_ms ({})",
                    self.reconnect_backoff_max_ms, self.reconnect_backoff_min_ms
                ),
            );
        }
        Ok(())
    }

    pub(super) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The wait after `failures` consecutive failed connection attempts (`failures >= 1`), by
    /// the crate's retry policy: between `d` and `2d` with `d = min * 2^(failures - 1)`, capped
    /// at the maximum.
    pub(super) fn reconnect_backoff(&self, failures: u32) -> Duration {
        let (min, max) = (self.reconnect_backoff_min_ms, self.reconnect_backoff_max_ms);
        crate::retry::Backoff::new(Duration::from_millis(min), Duration::from_millis(max)).delay(failures)
    }
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_in_flight_per_connection", &self.max_in_flight_per_connection)
            .field("max_concurrent_requests_per_connection", &self.max_concurrent_requests_per_connection)
            .field("max_connections_per_listener", &self.max_connections_per_listener)
            .field("reconnect_backoff_min_ms", &self.reconnect_backoff_min_ms)
            .field("reconnect_backoff_max_ms", &self.reconnect_backoff_max_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef";

    #[test]
    fn defaults_are_valid_and_a_short_secret_is_named() {
        assert_eq!(TcpConfig::new(SECRET).validate(), Ok(()));
        let error = TcpConfig::new(&b"short"[..]).validate().unwrap_err();
        assert_eq!(error.field, "secret");
        assert!(!error.to_string().contains("short"), "the secret must not leak: {error}");
    }

    #[test]
    fn each_bad_field_is_named() {
        type Spoil = fn(&mut TcpConfig);
        let cases: [(&str, Spoil); 7] = [
            ("max_frame_bytes", |c| c.max_frame_bytes = 10),
            ("connect_timeout_ms", |c| c.connect_timeout_ms = 0),
            ("max_in_flight_per_connection", |c| c.max_in_flight_per_connection = 0),
            ("max_concurrent_requests_per_connection", |c| c.max_concurrent_requests_per_connection = 0),
            ("max_connections_per_listener", |c| c.max_connections_per_listener = 0),
            ("reconnect_backoff_min_ms", |c| c.reconnect_backoff_min_ms = 0),
            ("reconnect_backoff_max_ms", |c| c.reconnect_backoff_max_ms = 1),
        ];
        for (field, spoil) in cases {
            let mut config = TcpConfig::new(SECRET);
            spoil(&mut config);
            assert_eq!(config.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum() {
        let config = TcpConfig::new(SECRET);
        for n in 1..=9u32 {
            let base = (50u64 << (n - 1)).min(2_500);
            let wait = config.reconnect_backoff(n).as_millis() as u64;
            assert!((base..=2 * base).contains(&wait) && wait <= 5_000, "attempt {n}: {wait} ms");
        }
        let last = config.reconnect_backoff(u32::MAX).as_millis() as u64;
        assert!((2_500..=5_000).contains(&last), "{last} ms");
    }

    #[test]
    fn debug_hides_the_secret() {
        let shown = format!("{:?}", TcpConfig::new(SECRET));
        assert!(!shown.contains("0123456789abcdef") && shown.contains("<16 bytes>"), "{shown}");
    }
}
