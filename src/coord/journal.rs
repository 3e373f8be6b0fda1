//! Durability of the embedded service: a journal of committed transactions and a snapshot, in a
//! directory, so that a single-node host on the embedded default restarts with its tasks, as a
//! ZooKeeper server restarts from its transaction log.
//!
//! # Files
//!
//! ```text
//! <dir>/lock        flock'ed while a server has the directory open (one process at a time)
//! <dir>/snapshot    every persistent node and the last zxid, as of some transaction
//! <dir>/journal     the transactions after it, one frame each
//! ```
//!
//! A frame is `[length: u32 LE][xxh3-64 of the payload: u64 LE][payload]`, the payload a
//! postcard record. A transaction is appended and `fdatasync`ed **before** its caller gets the
//! answer: what was answered survives a crash of the process or the machine. At open the
//! snapshot is loaded and the journal's frames applied in order; a frame cut short or failing
//! its checksum (a crash in the middle of an append, never answered) ends the journal, which is
//! truncated there. Every [`COMPACT_AFTER`] frames the whole persistent tree is written as a new
//! snapshot (temporary file, `fsync`, `rename`, directory `fsync`) and the journal emptied.
//!
//! # What is kept
//!
//! Persistent nodes with their data and stats, the parents' counts of created children (the next
//! sequence numbers), and the last zxid, so transaction ids, and the writer-lease epochs taken
//! from them, keep growing across restarts. Ephemeral nodes are not kept: their sessions end
//! with the process, as a ZooKeeper session ends when its client is gone for good.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Stat;

/// Frames in the journal after which it is folded into a new snapshot.
pub(super) const COMPACT_AFTER: u64 = 10_000;

/// Largest frame accepted when reading: a longer length is a damaged frame.
const MAX_FRAME_BYTES: u32 = 256 << 20;

/// A persistent node as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct NodeRecord {
    pub data: Vec<u8>,
    pub stat: StatRecord,
    /// Children ever created: the next sequence number.
    pub creates: i32,
}

/// [`Stat`], as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StatRecord {
    version: i32,
    cversion: i32,
    czxid: i64,
    mzxid: i64,
    ctime_ms: i64,
    mtime_ms: i64,
}

impl From<&Stat> for StatRecord {
    fn from(s: &Stat) -> Self {
        StatRecord {
            version: s.version,
            cversion: s.cversion,
            czxid: s.czxid,
            mzxid: s.mzxid,
            ctime_ms: s.ctime_ms,
            mtime_ms: s.mtime_ms,
        }
    }
}

impl StatRecord {
    /// The stat of a persistent node with `num_children` children.
    pub(super) fn stat(&self, num_children: i32) -> Stat {
        Stat {
            version: self.version,
            cversion: self.cversion,
            czxid: self.czxid,
            mzxid: self.mzxid,
            ctime_ms: self.ctime_ms,
            mtime_ms: self.mtime_ms,
            ephemeral_owner: 0,
            num_children,
        }
    }
}

/// One committed transaction: the state of every persistent node it touched after it (`None`:
/// the node is gone, or is ephemeral).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Entry {
    pub zxid: i64,
    pub nodes: Vec<(String, Option<NodeRecord>)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    zxid: i64,
    nodes: Vec<(String, NodeRecord)>,
}

/// What a directory held at open.
pub(super) struct Recovered {
    pub zxid: i64,
    pub nodes: Vec<(String, NodeRecord)>,
}

/// The open journal of a directory.
pub(super) struct Journal {
    dir: PathBuf,
    file: File,
    frames: u64,
    compact_after: u64,
    _lock: File,
}

impl Journal {
    /// Opens (or creates) `dir`, takes its lock, and recovers its state.
    pub(super) fn open(dir: &Path) -> io::Result<(Journal, Recovered)> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("lock"))?;
        // SAFETY: flock on a descriptor `lock` keeps open; it touches no memory.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!("{} is in use by another process (embedded coordination): {err}", dir.display()),
            ));
        }
        let snapshot = match fs::read(dir.join("snapshot")) {
            Ok(bytes) => {
                read_frame(&bytes).and_then(|(payload, _)| postcard::from_bytes::<Snapshot>(payload).ok()).ok_or_else(
                    || io::Error::new(io::ErrorKind::InvalidData, format!("{}/snapshot is damaged", dir.display())),
                )?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => return Err(e),
        };
        let mut nodes: std::collections::BTreeMap<String, NodeRecord> = snapshot.nodes.into_iter().collect();
        let mut zxid = snapshot.zxid;
        let path = dir.join("journal");
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (mut at, mut frames) = (0usize, 0u64);
        while let Some((payload, len)) = read_frame(&bytes[at..]) {
            let Ok(entry) = postcard::from_bytes::<Entry>(payload) else { break };
            if entry.zxid > zxid {
                zxid = entry.zxid;
                for (path, node) in entry.nodes {
                    match node {
                        Some(node) => nodes.insert(path, node),
                        None => nodes.remove(&path),
                    };
                }
            }
            at += len;
            frames += 1;
        }
        if at < bytes.len() {
            tracing::warn!(dir = %dir.display(), kept = at, dropped = bytes.len() - at, "embedded coordination: the journal ends in a torn frame (a crash while appending); dropping it");
            file.set_len(at as u64)?;
            file.sync_data()?;
        }
        let journal = Journal { dir: dir.to_path_buf(), file, frames, compact_after: COMPACT_AFTER, _lock: lock };
        Ok((journal, Recovered { zxid, nodes: nodes.into_iter().collect() }))
    }

    /// Appends a transaction durably.
    pub(super) fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let payload = postcard::to_allocvec(entry).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.file.write_all(&frame(&payload))?;
        self.file.sync_data()?;
        self.frames += 1;
        Ok(())
    }

    /// Whether the journal should be folded into a snapshot.
    pub(super) fn wants_compaction(&self) -> bool {
        self.frames >= self.compact_after
    }

    /// Folds the journal after this many frames instead (tests).
    #[cfg(test)]
    pub(super) fn set_compact_after(&mut self, frames: u64) {
        self.compact_after = frames;
    }

    /// Writes `nodes` (every persistent node) as of `zxid` as the snapshot, then empties the
    /// journal.
    pub(super) fn compact(&mut self, zxid: i64, nodes: Vec<(String, NodeRecord)>) -> io::Result<()> {
        let payload = postcard::to_allocvec(&Snapshot { zxid, nodes })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let temp = self.dir.join("snapshot.tmp");
        {
            let mut file = File::create(&temp)?;
            file.write_all(&frame(&payload))?;
            file.sync_all()?;
        }
        fs::rename(&temp, self.dir.join("snapshot"))?;
        File::open(&self.dir)?.sync_all()?;
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.frames = 0;
        Ok(())
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 12);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of the frame at the start of `bytes` and the frame's whole length; `None` if it
/// is cut short or fails its checksum.
fn read_frame(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    if len > MAX_FRAME_BYTES {
        return None;
    }
    let sum = u64::from_le_bytes(bytes.get(4..12)?.try_into().ok()?);
    let payload = bytes.get(12..12 + len as usize)?;
    (xxhash_rust::xxh3::xxh3_64(payload) == sum).then_some((payload, 12 + len as usize))
}
