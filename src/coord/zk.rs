//! Coordination over a real ZooKeeper ensemble (placeholder, being written).

/// Settings of a ZooKeeper connection.
#[derive(Clone, Debug)]
pub struct ZkConfig;

/// A [`Coordination`](super::Coordination) handle over ZooKeeper.
pub struct ZkCoordination;
