//! What changed between two snapshot files, read from the filesystem's extent maps (`FIEMAP`).
//!
//! On a filesystem with reflinks (XFS, btrfs, bcachefs) a snapshot taken by `FICLONE` shares
//! every extent with its volume; a later write to the volume goes to new blocks (copy on write)
//! and leaves the snapshot's where they were. So between two snapshots of one volume, a range
//! whose bytes sit on the **same physical blocks** in both files holds the same bytes in both:
//! those blocks are never written again while a snapshot refers to them. That is how the file
//! backend answers [`CopyBackend::changed_ranges`](super::CopyBackend::changed_ranges) without
//! reading a byte, like `rbd diff` does for Ceph.
//!
//! The answer errs on the side of "changed": a range is unchanged only when both files have a
//! hole there, or both map it to the same physical address through extents whose address means
//! what it says (not delayed, unknown, encoded, inline, tail-packed or unwritten). Anything else
//! is reported as changed, and the engine then compares the bytes itself.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)`, with the 32-byte `struct fiemap` header.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FIEMAP_FLAG_SYNC`: write dirty pages back before mapping (a delayed extent has no address).
const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// `FIEMAP_EXTENT_LAST`: the file's last extent.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// `FIEMAP_EXTENT_SHARED`: the extent's blocks are shared with another file.
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Flags that make `fe_physical` unusable for comparing two files: UNKNOWN, DELALLOC, ENCODED,
/// DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL and UNWRITTEN.
const UNTRUSTED: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800;
/// Extents asked for per `ioctl`.
const EXTENTS_PER_CALL: usize = 512;

/// `struct fiemap` followed by room for [`EXTENTS_PER_CALL`] extents.
#[repr(C)]
struct Request {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [Extent; EXTENTS_PER_CALL],
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Extent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// One mapped piece of a file: bytes `logical` live at `physical..` on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// File offsets, `[start, end)`.
    pub logical: Range<u64>,
    /// Device offset of `logical.start`.
    pub physical: u64,
    /// Whether `physical` can be compared with another file's (see [`UNTRUSTED`]).
    pub trusted: bool,
    /// Whether the filesystem says these blocks are shared with another file.
    pub shared: bool,
}

/// The mappings of `file` that overlap `range`, sorted, clipped to `range`. `Ok(None)` if the
/// filesystem has no `FIEMAP` (tmpfs, some network filesystems).
pub(crate) fn mappings(file: &File, range: Range<u64>) -> io::Result<Option<Vec<Mapping>>> {
    let mut out = Vec::new();
    let mut request = Box::new(Request {
        start: 0,
        length: 0,
        flags: 0,
        mapped_extents: 0,
        extent_count: EXTENTS_PER_CALL as u32,
        reserved: 0,
        extents: [Extent::default(); EXTENTS_PER_CALL],
    });
    let mut position = range.start;
    while position < range.end {
        request.start = position;
        request.length = range.end - position;
        request.flags = FIEMAP_FLAG_SYNC;
        request.mapped_extents = 0;
        request.extent_count = EXTENTS_PER_CALL as u32;
        // SAFETY: `request` is a `struct fiemap` with room for `extent_count` extents, and
        // lives across the call; the kernel writes at most that many.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *request as *mut Request) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOTTY) => Ok(None),
                _ => Err(error),
            };
        }
        let mapped = (request.mapped_extents as usize).min(EXTENTS_PER_CALL);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for extent in &request.extents[..mapped] {
            let end = extent.logical.saturating_add(extent.length);
            let start = extent.logical.max(range.start);
            let clipped_end = end.min(range.end);
            if start < clipped_end {
                out.push(Mapping {
                    logical: start..clipped_end,
                    physical: extent.physical + (start - extent.logical),
                    trusted: extent.flags & UNTRUSTED == 0,
                    shared: extent.flags & FIEMAP_EXTENT_SHARED != 0,
                });
            }
            last |= extent.flags & FIEMAP_EXTENT_LAST != 0;
            position = position.max(end);
        }
        if last {
            break;
        }
    }
    Ok(Some(out))
}

/// The ranges of `range` where two files mapped as `a` and `b` (sorted, disjoint) may hold
/// different bytes: everywhere except where both have a hole, or both map the same bytes to the
/// same physical address through trusted extents. Sorted, disjoint, merged.
pub(crate) fn differing(a: &[Mapping], b: &[Mapping], range: Range<u64>) -> Vec<Range<u64>> {
    let mut cuts: Vec<u64> = vec![range.start, range.end];
    for mapping in a.iter().chain(b) {
        cuts.extend([mapping.logical.start, mapping.logical.end]);
    }
    cuts.retain(|cut| range.contains(cut) || *cut == range.end);
    cuts.sort_unstable();
    cuts.dedup();
    let (mut i, mut j) = (0, 0);
    let mut changed: Vec<Range<u64>> = Vec::new();
    for piece in cuts.windows(2) {
        let (start, end) = (piece[0], piece[1]);
        let same = match (covering(a, &mut i, start), covering(b, &mut j, start)) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                x.trusted
                    && y.trusted
                    && x.physical + (start - x.logical.start) == y.physical + (start - y.logical.start)
            }
            _ => false,
        };
        if !same {
            match changed.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => changed.push(start..end),
            }
        }
    }
    changed
}

/// The mapping of `list` that covers `offset`, if any; `index` only moves forward, so a sweep
/// over increasing offsets walks the list once.
fn covering<'a>(list: &'a [Mapping], index: &mut usize, offset: u64) -> Option<&'a Mapping> {
    while *index < list.len() && list[*index].logical.end <= offset {
        *index += 1;
    }
    list.get(*index).filter(|mapping| mapping.logical.start <= offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(logical: Range<u64>, physical: u64) -> Mapping {
        Mapping { logical, physical, trusted: true, shared: true }
    }

    #[test]
    fn identical_maps_and_common_holes_are_unchanged() {
        let a = [map(0..100, 1000), map(200..300, 5000)];
        assert!(differing(&a, &a, 0..400).is_empty());
    }

    #[test]
    fn a_remapped_piece_is_changed_and_only_it() {
        // b's bytes 40..60 were rewritten (copy on write to 9000); the rest is shared.
        let a = [map(0..100, 1000)];
        let b = [map(0..40, 1000), map(40..60, 9000), map(60..100, 1060)];
        assert_eq!(differing(&a, &b, 0..100), vec![40..60]);
    }

    #[test]
    fn same_physical_at_another_offset_is_changed() {
        // Same device blocks but shifted by 10 bytes in the file: different bytes at each offset.
        let a = [map(0..100, 1000)];
        let b = [map(10..110, 1000)];
        assert_eq!(differing(&a, &b, 0..120), vec![0..110]);
    }

    #[test]
    fn data_against_hole_is_changed_both_ways() {
        let a = [map(0..50, 1000)];
        let b = [map(100..150, 2000)];
        assert_eq!(differing(&a, &b, 0..200), vec![0..50, 100..150]);
    }

    #[test]
    fn untrusted_extents_are_changed_even_at_the_same_address() {
        let a = [Mapping { trusted: false, ..map(0..100, 1000) }];
        let b = [map(0..100, 1000)];
        assert_eq!(differing(&a, &b, 0..100), vec![0..100]);
    }

    #[test]
    fn the_answer_is_clipped_to_the_range_and_merged() {
        let a = [map(0..100, 1000)];
        let b = [map(0..30, 7000), map(30..100, 8000)];
        assert_eq!(differing(&a, &b, 20..80), vec![20..80]);
        assert!(differing(&a, &b, 100..200).is_empty());
    }
}
