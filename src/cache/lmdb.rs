//! The LMDB file: tasks by id, plus two secondary indexes.
//!
//! Databases in one environment:
//!
//! | name         | key                                         | value        |
//! |--------------|---------------------------------------------|--------------|
//! | `tasks`      | task id (16 bytes)                          | `Task`, JSON |
//! | `by_state`   | state code (1) + created ms (8, BE) + id    | empty        |
//! | `by_created` | created ms (8, BE) + id                     | empty        |
//! | `meta`       | `schema`, `vips`                            | version, VIP configurations (JSON) |
//!
//! Every call here is blocking (LMDB transactions): call it from `spawn_blocking`, never from an
//! async task. Opening validates the file (schema and every record); a file that fails is wiped
//! and recreated empty, for ZooKeeper is the truth and the follower refills it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use heed::types::{Bytes, Str, Unit};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use tracing::warn;

use super::CacheError;
use crate::model::{Task, TaskId, TaskState, VipConfig};

/// Virtual size reserved for the map. LMDB grows the file as needed up to this; 1 GiB holds
/// about a million tasks.
pub const MAP_SIZE_BYTES: usize = 1 << 30;
/// Written before the file is mapped, removed once it validated (see [`TaskCache::open`]).
const OPENING_MARKER: &str = "opening";

/// Bump when the layout above changes: an older file is wiped and refilled.
const SCHEMA_VERSION: &[u8] = b"1";

type Index = Database<'static, Bytes, Unit>;

/// One change to apply to the cache.
#[allow(clippy::large_enum_variant)] // batches are short-lived; most changes are upserts
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheChange {
    /// Insert or update a task. Each of its records is kept at the higher of the stored and the
    /// given version, so an older read that lands late cannot undo a newer one; a task of a newer
    /// incarnation (deleted and created again) replaces the older one whole.
    Upsert(Task),
    /// The task no longer exists.
    Remove(TaskId),
}

/// An LMDB file mirroring tasks. Blocking; see the module docs.
pub struct TaskCache {
    env: Env<WithoutTls>,
    path: PathBuf,
    tasks: Database<'static, Bytes, Bytes>,
    by_state: Index,
    by_created: Index,
    meta: Database<'static, Str, Bytes>,
}

impl TaskCache {
    /// Opens (or creates) the cache in directory `dir`. A file that cannot be opened, has another
    /// schema, or holds an undecodable record is wiped and recreated.
    ///
    /// A damaged file can crash the process inside LMDB (`SIGBUS`, `SIGSEGV`) before any check
    /// can refuse it. So an `opening` marker is written before the file is mapped and removed
    /// once it has been validated: a marker found at the next open means that open never
    /// finished, and the file is wiped before LMDB maps it. A node never crash-loops on its cache.
    pub fn open(dir: &Path) -> Result<TaskCache, CacheError> {
        let io = |path: &Path, e: std::io::Error| CacheError::Io { path: path.to_path_buf(), source: e.into() };
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let marker = dir.join(OPENING_MARKER);
        if marker.exists() {
            warn!(dir = %dir.display(), "the last opening of the task cache did not finish (the process died in it); wiping the cache, ZooKeeper will refill it");
            Self::wipe(dir)?;
        }
        fs::write(&marker, std::process::id().to_string()).map_err(|e| io(&marker, e))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
        let cache = match Self::open_checked(dir) {
            Ok(cache) => cache,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "task cache unusable; wiping it, ZooKeeper will refill it");
                Self::wipe(dir)?;
                Self::open_checked(dir)?
            }
        };
        fs::remove_file(&marker).map_err(|e| io(&marker, e))?;
        Ok(cache)
    }

    fn wipe(dir: &Path) -> Result<(), CacheError> {
        for file in ["data.mdb", "lock.mdb"] {
            match fs::remove_file(dir.join(file)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::Io { path: dir.join(file), source: e.into() }),
            }
        }
        Ok(())
    }

    fn open_checked(dir: &Path) -> Result<TaskCache, CacheError> {
        fs::create_dir_all(dir).map_err(|e| CacheError::Io { path: dir.to_path_buf(), source: e.into() })?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(MAP_SIZE_BYTES).max_dbs(8);
        // SAFETY: one environment per directory per process: the mirror owns the directory, and
        // `TaskMirror::shutdown` closes the environment before a new one may open it.
        let env = unsafe { options.open(dir) }.map_err(|e| lmdb(dir, e))?;
        let wtxn = env.write_txn().map_err(|e| lmdb(dir, e))?;
        let (tasks, by_state, by_created, meta) = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
                let tasks = opener.create_database::<Bytes, Bytes>(wtxn, Some("tasks"))?;
                let by_state = opener.create_database::<Bytes, Unit>(wtxn, Some("by_state"))?;
                let by_created = opener.create_database::<Bytes, Unit>(wtxn, Some("by_created"))?;
                let meta = opener.create_database::<Str, Bytes>(wtxn, Some("meta"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((tasks, by_state, by_created, meta)))
            })
            .map_err(|e| lmdb(dir, e))?
            .commit()
            .expect("databases are committed");
        let cache = TaskCache { env, path: dir.to_path_buf(), tasks, by_state, by_created, meta };
        cache.validate()?;
        Ok(cache)
    }

    /// Checks the schema and decodes every record; stamps the schema into an empty file.
    fn validate(&self) -> Result<(), CacheError> {
        let mut wtxn = self.write()?;
        match self.meta.get(&wtxn, "schema").map_err(|e| self.err(e))? {
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                let other = String::from_utf8_lossy(other).into_owned();
                return Err(CacheError::Corrupt { path: self.path.clone(), reason: format!("schema {other}") });
            }
            None if self.tasks.len(&wtxn).map_err(|e| self.err(e))? == 0 => {
                self.meta.put(&mut wtxn, "schema", SCHEMA_VERSION).map_err(|e| self.err(e))?;
            }
            None => return Err(CacheError::Corrupt { path: self.path.clone(), reason: "no schema".into() }),
        }
        let mut count = 0;
        for entry in self.tasks.iter(&wtxn).map_err(|e| self.err(e))? {
            let (_, value) = entry.map_err(|e| self.err(e))?;
            self.decode(value)?;
            count += 1;
        }
        for index in [self.by_state, self.by_created] {
            if index.len(&wtxn).map_err(|e| self.err(e))? != count {
                return Err(CacheError::Corrupt { path: self.path.clone(), reason: "index out of step".into() });
            }
        }
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// The directory of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The environment, to close it (see `TaskMirror::shutdown`).
    pub(crate) fn env(&self) -> &Env<WithoutTls> {
        &self.env
    }

    /// Closes the file and waits until LMDB has let it go, so that the directory may be opened
    /// again in this process (one environment per directory per process). Blocking.
    pub fn close(self) {
        let closing = self.env.clone().prepare_for_closing();
        drop(self);
        closing.wait();
    }

    /// Applies changes in one transaction.
    pub fn apply(&self, changes: &[CacheChange]) -> Result<(), CacheError> {
        let mut wtxn = self.write()?;
        for change in changes {
            match change {
                CacheChange::Upsert(task) => self.upsert(&mut wtxn, task)?,
                CacheChange::Remove(id) => self.remove(&mut wtxn, id)?,
            }
        }
        wtxn.commit().map_err(|e| self.err(e))
    }

    fn upsert(&self, wtxn: &mut RwTxn<'_>, task: &Task) -> Result<(), CacheError> {
        let mut merged = task.clone();
        if let Some(old) = self.get_in(wtxn, &task.id)? {
            let (old_life, new_life) = (old.versions.incarnation, merged.versions.incarnation);
            let known = old_life != 0 && new_life != 0;
            if known && old_life > new_life {
                return Ok(());
            }
            if known && old_life < new_life {
                self.unindex(wtxn, &old)?;
                return self.put(wtxn, &merged);
            }
            if new_life == 0 {
                merged.versions.incarnation = old_life;
            }
            if old.versions.control > merged.versions.control {
                (merged.control, merged.versions.control) = (old.control.clone(), old.versions.control);
            }
            if old.versions.status > merged.versions.status {
                (merged.status, merged.versions.status) = (old.status.clone(), old.versions.status);
            }
            if old.versions.progress > merged.versions.progress {
                (merged.progress, merged.versions.progress) = (old.progress.clone(), old.versions.progress);
            }
            if old == merged {
                return Ok(());
            }
            self.unindex(wtxn, &old)?;
        }
        self.put(wtxn, &merged)
    }

    fn put(&self, wtxn: &mut RwTxn<'_>, merged: &Task) -> Result<(), CacheError> {
        let value = serde_json::to_vec(merged).expect("tasks serialize to JSON");
        self.tasks.put(wtxn, merged.id.as_bytes(), &value).map_err(|e| self.err(e))?;
        let created = merged.control.created_at_ms;
        self.by_state.put(wtxn, &state_key(merged.state(), created, &merged.id), &()).map_err(|e| self.err(e))?;
        self.by_created.put(wtxn, &created_key(created, &merged.id), &()).map_err(|e| self.err(e))
    }

    fn remove(&self, wtxn: &mut RwTxn<'_>, id: &TaskId) -> Result<(), CacheError> {
        if let Some(old) = self.get_in(wtxn, id)? {
            self.unindex(wtxn, &old)?;
            self.tasks.delete(wtxn, id.as_bytes()).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn unindex(&self, wtxn: &mut RwTxn<'_>, old: &Task) -> Result<(), CacheError> {
        let created = old.control.created_at_ms;
        self.by_state.delete(wtxn, &state_key(old.state(), created, &old.id)).map_err(|e| self.err(e))?;
        self.by_created.delete(wtxn, &created_key(created, &old.id)).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Stores the VIP configuration last seen in ZooKeeper, so that a node can remove the VIPs
    /// at start-up, or when it loses its session, without asking ZooKeeper.
    pub fn put_vips(&self, vips: &[VipConfig]) -> Result<(), CacheError> {
        let mut wtxn = self.write()?;
        let value = serde_json::to_vec(vips).expect("VIP configurations serialize to JSON");
        self.meta.put(&mut wtxn, "vips", &value).map_err(|e| self.err(e))?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// The VIP configuration last stored with [`TaskCache::put_vips`] (empty if none).
    pub fn vips(&self) -> Result<Vec<VipConfig>, CacheError> {
        let rtxn = self.read()?;
        match self.meta.get(&rtxn, "vips").map_err(|e| self.err(e))? {
            Some(value) => serde_json::from_slice(value)
                .map_err(|e| CacheError::Corrupt { path: self.path.clone(), reason: format!("vips: {e}") }),
            None => Ok(Vec::new()),
        }
    }

    /// A task by id.
    pub fn get(&self, id: &TaskId) -> Result<Option<Task>, CacheError> {
        let rtxn = self.read()?;
        self.get_in(&rtxn, id)
    }

    fn get_in(&self, txn: &RoTxn<'_>, id: &TaskId) -> Result<Option<Task>, CacheError> {
        match self.tasks.get(txn, id.as_bytes()).map_err(|e| self.err(e))? {
            Some(value) => self.decode(value).map(Some),
            None => Ok(None),
        }
    }

    /// Tasks in `state`, oldest first, created at or after `from_ms`, at most `limit`.
    pub fn list_by_state(&self, state: TaskState, from_ms: i64, limit: usize) -> Result<Vec<Task>, CacheError> {
        let rtxn = self.read()?;
        let start = state_key(state, from_ms, &TaskId::from_bytes([0; 16]));
        let end = [state.code() + 1];
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Excluded(&end[..]));
        let iter = self.by_state.range(&rtxn, &range).map_err(|e| self.err(e))?;
        self.collect_ids(&rtxn, iter.map(|entry| entry.map(|(key, ())| &key[9..25])), limit)
    }

    /// Tasks in `state` strictly after `(created_ms, id)` in the index's order, at most `limit`.
    pub fn list_by_state_after(
        &self,
        state: TaskState,
        after: (i64, TaskId),
        limit: usize,
    ) -> Result<Vec<Task>, CacheError> {
        let rtxn = self.read()?;
        let start = state_key(state, after.0, &after.1);
        let end = [state.code() + 1];
        let range = (std::ops::Bound::Excluded(&start[..]), std::ops::Bound::Excluded(&end[..]));
        let iter = self.by_state.range(&rtxn, &range).map_err(|e| self.err(e))?;
        self.collect_ids(&rtxn, iter.map(|entry| entry.map(|(key, ())| &key[9..25])), limit)
    }

    /// How many tasks are in `state` (an index scan; no record is decoded).
    pub fn count_by_state(&self, state: TaskState) -> Result<usize, CacheError> {
        let rtxn = self.read()?;
        let (start, end) = ([state.code()], [state.code() + 1]);
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Excluded(&end[..]));
        let iter = self.by_state.range(&rtxn, &range).map_err(|e| self.err(e))?;
        let mut count = 0;
        for entry in iter {
            entry.map_err(|e| self.err(e))?;
            count += 1;
        }
        Ok(count)
    }

    /// Tasks created in `[from_ms, to_ms)`, oldest first, at most `limit`.
    pub fn list_by_created(&self, from_ms: i64, to_ms: i64, limit: usize) -> Result<Vec<Task>, CacheError> {
        let rtxn = self.read()?;
        let start = created_key(from_ms, &TaskId::from_bytes([0; 16]));
        let end = created_key(to_ms, &TaskId::from_bytes([0; 16]));
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Excluded(&end[..]));
        let iter = self.by_created.range(&rtxn, &range).map_err(|e| self.err(e))?;
        self.collect_ids(&rtxn, iter.map(|entry| entry.map(|(key, ())| &key[8..24])), limit)
    }

    fn collect_ids<'t>(
        &self,
        rtxn: &'t RoTxn<'_>,
        ids: impl Iterator<Item = heed::Result<&'t [u8]>>,
        limit: usize,
    ) -> Result<Vec<Task>, CacheError> {
        let mut tasks = Vec::new();
        for id in ids.take(limit) {
            let id =
                TaskId::from_bytes(id.map_err(|e| self.err(e))?.try_into().expect("index keys end in a 16-byte id"));
            match self.get_in(rtxn, &id)? {
                Some(task) => tasks.push(task),
                None => {
                    return Err(CacheError::Corrupt { path: self.path.clone(), reason: format!("index names {id}") })
                }
            }
        }
        Ok(tasks)
    }

    /// Every cached task id.
    pub fn ids(&self) -> Result<Vec<TaskId>, CacheError> {
        let rtxn = self.read()?;
        let mut ids = Vec::new();
        for entry in self.tasks.iter(&rtxn).map_err(|e| self.err(e))? {
            let (key, _) = entry.map_err(|e| self.err(e))?;
            let bytes: [u8; 16] = key.try_into().map_err(|_| CacheError::Corrupt {
                path: self.path.clone(),
                reason: "a task key is not 16 bytes".into(),
            })?;
            ids.push(TaskId::from_bytes(bytes));
        }
        Ok(ids)
    }

    /// Number of cached tasks.
    pub fn len(&self) -> Result<u64, CacheError> {
        let rtxn = self.read()?;
        self.tasks.len(&rtxn).map_err(|e| self.err(e))
    }

    /// Whether the cache holds no task.
    pub fn is_empty(&self) -> Result<bool, CacheError> {
        self.len().map(|n| n == 0)
    }

    fn read(&self) -> Result<RoTxn<'_, WithoutTls>, CacheError> {
        self.env.read_txn().map_err(|e| self.err(e))
    }

    fn write(&self) -> Result<RwTxn<'_>, CacheError> {
        self.env.write_txn().map_err(|e| self.err(e))
    }

    fn decode(&self, value: &[u8]) -> Result<Task, CacheError> {
        serde_json::from_slice(value)
            .map_err(|e| CacheError::Corrupt { path: self.path.clone(), reason: e.to_string() })
    }

    fn err(&self, e: heed::Error) -> CacheError {
        lmdb(&self.path, e)
    }
}

fn lmdb(path: &Path, e: heed::Error) -> CacheError {
    CacheError::Lmdb { path: path.to_path_buf(), reason: e.to_string() }
}

/// Created time as a key that sorts like the number (sign bit flipped, big-endian).
fn time_key(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn state_key(state: TaskState, created_ms: i64, id: &TaskId) -> [u8; 25] {
    let mut key = [0; 25];
    key[0] = state.code();
    key[1..9].copy_from_slice(&time_key(created_ms));
    key[9..].copy_from_slice(id.as_bytes());
    key
}

fn created_key(created_ms: i64, id: &TaskId) -> [u8; 24] {
    let mut key = [0; 24];
    key[..8].copy_from_slice(&time_key(created_ms));
    key[8..].copy_from_slice(id.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opening_that_never_finished_wipes_the_file_before_it_is_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let vips = [VipConfig::new("svc", vec!["198.51.100.7".parse().unwrap()]).unwrap()];
        let cache = TaskCache::open(dir.path()).unwrap();
        cache.put_vips(&vips).unwrap();
        drop(cache);
        assert!(!dir.path().join(OPENING_MARKER).exists(), "a finished opening leaves no marker");
        // A clean reopen keeps what the file holds.
        assert_eq!(TaskCache::open(dir.path()).unwrap().vips().unwrap(), vips);
        // The process died while opening (inside LMDB, on a damaged page): the marker stayed.
        fs::write(dir.path().join(OPENING_MARKER), "4242").unwrap();
        let cache = TaskCache::open(dir.path()).unwrap();
        assert!(cache.vips().unwrap().is_empty(), "the file was wiped before it was mapped");
        assert!(!dir.path().join(OPENING_MARKER).exists());
    }

    #[test]
    fn time_keys_sort_like_numbers() {
        let times = [i64::MIN, -5, -1, 0, 1, 1_700_000_000_000, i64::MAX];
        for pair in times.windows(2) {
            assert!(time_key(pair[0]) < time_key(pair[1]), "{pair:?}");
        }
    }
}
