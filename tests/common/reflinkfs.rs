//! A filesystem with reflinks for the tests: XFS (`mkfs.xfs -m reflink=1`) on a sparse image
//! file, loop-mounted under `<temp>/tc-xfs-<pid>-<n>/mnt` and unmounted when the
//! [`ReflinkFs`] is dropped, also while a test panics. Mounts left by test processes that were
//! killed (named after a pid that no longer runs) are unmounted by the next one.
//!
//! Needs root (to mount), a loop device and xfsprogs (`scripts/test.sh` installs it): without
//! them [`ReflinkFs::new`] fails the test with one line that says so. The one exception is a
//! kernel or container with no loop devices at all (no `/dev/loop-control`): then it returns
//! `None` and prints that the test was skipped and why, since no install step can fix that.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::run_command;

/// The prefix of every directory these tests mount on: `tc-xfs-<pid>-<n>`.
const NAME_PREFIX: &str = "tc-xfs-";
/// The image's (sparse) size: XFS wants at least 300 MiB.
const IMAGE_BYTES: u64 = 1 << 30;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A mounted XFS with reflinks, unmounted and removed on drop.
#[derive(Debug)]
pub struct ReflinkFs {
    dir: PathBuf,
    mount: PathBuf,
}

impl ReflinkFs {
    /// Makes and mounts a fresh one; `None` (and a line on stderr) if this machine has no loop
    /// devices.
    pub fn new() -> Option<ReflinkFs> {
        if !Path::new("/dev/loop-control").exists() {
            eprintln!("SKIPPED: no loop devices here (/dev/loop-control is missing), so no XFS to test reflinks on");
            return None;
        }
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{NAME_PREFIX}{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).unwrap_or_else(|e| panic!("creating {}: {e}", mount.display()));
        let image = dir.join("xfs.img");
        let file = std::fs::File::create(&image).unwrap_or_else(|e| panic!("creating {}: {e}", image.display()));
        file.set_len(IMAGE_BYTES).unwrap();
        let fs = ReflinkFs { dir, mount };
        let image = image.to_str().expect("a UTF-8 temporary directory");
        run_command("mkfs.xfs", &["-q", "-m", "reflink=1", image])
            .unwrap_or_else(|e| panic!("reflink tests need xfsprogs (scripts/test.sh installs it): {e}"));
        let mount = fs.mount.to_str().unwrap();
        run_command("mount", &["-o", "loop", image, mount])
            .unwrap_or_else(|e| panic!("reflink tests need root and a loop device to mount an XFS image: {e}"));
        Some(fs)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// A fresh, empty directory inside it.
    pub fn subdir(&self) -> tempfile::TempDir {
        tempfile::tempdir_in(&self.mount).unwrap()
    }
}

impl Drop for ReflinkFs {
    fn drop(&mut self) {
        unmount(&self.mount);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unmounts `mount` (the loop device goes with it: `mount -o loop` sets autoclear); lazily if
/// something still holds it.
fn unmount(mount: &Path) {
    let mount = mount.to_str().unwrap();
    if run_command("umount", &[mount]).is_err() {
        let _ = run_command("umount", &["-l", mount]);
    }
}

/// Unmounts `tc-xfs-<pid>-<n>/mnt` mounts whose pid no longer runs, and removes their directory.
fn sweep_stale() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return };
    for mount in mounts.lines().filter_map(|line| line.split_whitespace().nth(1)) {
        let path = Path::new(mount);
        let Some(dir) = path.parent() else { continue };
        let Some(name) = dir.file_name().and_then(|name| name.to_str()) else { continue };
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else { continue };
        let Some((pid, n)) = rest.split_once('-') else { continue };
        let numeric = n.parse::<u64>().is_ok() && pid.parse::<u32>().is_ok();
        if numeric && !Path::new(&format!("/proc/{pid}")).exists() {
            unmount(path);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
