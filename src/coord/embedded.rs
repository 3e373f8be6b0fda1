//! In-process coordination (placeholder, being written).

/// The in-process coordination service.
pub struct EmbeddedServer;

/// A session on an [`EmbeddedServer`].
pub struct EmbeddedCoordination;
