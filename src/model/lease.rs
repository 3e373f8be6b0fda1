//! Writer leases: the fencing tokens of the data plane.
//!
//! A [`WriterLease`] is what a runner writes a target volume under: the task it copies for, and
//! an **epoch** that grows with every claim of any task (the claim node's creation zxid, which
//! ZooKeeper hands out in one total order). A backend remembers the newest lease it has admitted
//! for each volume and refuses every write made under an older one, so a runner that lost its
//! claim (a partition, a freeze, a slow disk) can never land a write after a newer owner's first
//! write: the scheme of Chubby's sequencers, applied by the storage itself.

use serde::{Deserialize, Serialize};

use super::TaskId;

/// The licence to write a target volume: the task, and the epoch of the claim it runs under.
/// Leases order by epoch; two leases of one epoch are the same claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WriterLease {
    /// The task whose copy writes the volume.
    pub task: TaskId,
    /// Grows with every claim (the claim node's creation zxid); never 0 for a real claim.
    pub epoch: u64,
}

impl WriterLease {
    /// A lease of `task` at `epoch`.
    pub fn new(task: TaskId, epoch: u64) -> Self {
        WriterLease { task, epoch }
    }

    /// Whether a write under this lease may land on a volume whose newest admitted lease is
    /// `newest`: only under that very lease, or a newer one.
    pub fn admits_after(&self, newest: Option<&WriterLease>) -> bool {
        match newest {
            None => true,
            Some(newest) => self.epoch > newest.epoch || self == newest,
        }
    }
}

impl std::fmt::Display for WriterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} epoch {}", self.task, self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_or_same_lease_is_admitted_older_or_rival_is_not() {
        let (a, b) = (TaskId::generate(), TaskId::generate());
        let newest = WriterLease::new(a, 10);
        assert!(WriterLease::new(a, 10).admits_after(Some(&newest)));
        assert!(WriterLease::new(b, 11).admits_after(Some(&newest)));
        assert!(!WriterLease::new(a, 9).admits_after(Some(&newest)));
        assert!(!WriterLease::new(b, 10).admits_after(Some(&newest)), "one epoch is one claim");
        assert!(WriterLease::new(b, 1).admits_after(None));
    }
}
