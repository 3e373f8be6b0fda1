//! Zero detection at memory speed.
//!
//! The copy engine asks of every allocated block it reads whether it is all zeroes, so this check
//! sits on the hot path next to the copy itself. It ORs the buffer together eight bytes at a time
//! (native-endian `u64` loads of a fixed-size chunk, which the compiler turns into wide vector
//! loads) and looks at the result once per [`CHUNK_BYTES`], so a non-zero buffer usually stops
//! early and an all-zero one costs about as much as reading it. No `unsafe`: `chunks_exact` with
//! constant lengths lets the compiler drop the bounds checks.

/// Bytes ORed together between two checks of the accumulator: large enough for the vector unit to
/// stay busy, small enough that a buffer with data early on stops early.
const CHUNK_BYTES: usize = 256;

/// Whether every byte of `buf` is zero (true for an empty buffer).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(CHUNK_BYTES);
    for chunk in &mut chunks {
        if or_words(chunk) != 0 {
            return false;
        }
    }
    let rest = chunks.remainder();
    let mut words = rest.chunks_exact(8);
    let acc = (&mut words).fold(0u64, |acc, w| acc | word(w));
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// ORs the `u64` words of one full chunk.
#[inline(always)]
fn or_words(chunk: &[u8]) -> u64 {
    let mut lanes = [0u64; 4];
    for quad in chunk.chunks_exact(32) {
        for (lane, w) in lanes.iter_mut().zip(quad.chunks_exact(8)) {
            *lane |= word(w);
        }
    }
    lanes[0] | lanes[1] | lanes[2] | lanes[3]
}

#[inline(always)]
fn word(bytes: &[u8]) -> u64 {
    u64::from_ne_bytes(bytes.try_into().expect("chunks_exact(8) yields 8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_all_zero_buffers_are_zero() {
        assert!(is_zero(&[]));
        for len in [1, 7, 8, 9, 31, 32, 33, 255, 256, 257, 4095, 4096, 65536, 65536 + 13] {
            assert!(is_zero(&vec![0u8; len]), "len {len}");
        }
    }

    #[test]
    fn a_single_non_zero_byte_anywhere_is_seen() {
        // Lengths around the chunk and word sizes, so every path (chunks, words, tail) is hit.
        for len in [1, 2, 7, 8, 9, 63, 64, 65, 255, 256, 257, 511, 512, 600, 1000] {
            let mut buf = vec![0u8; len];
            for pos in 0..len {
                for value in [1u8, 0x80, 0xff] {
                    buf[pos] = value;
                    assert!(!is_zero(&buf), "len {len}, byte {value:#x} at {pos}");
                }
                buf[pos] = 0;
            }
            assert!(is_zero(&buf));
        }
    }

    #[test]
    fn unaligned_slices_are_handled() {
        let mut backing = vec![0u8; 4096 + 64];
        for start in 0..16 {
            for end in [start, start + 1, start + 100, 4096 + 63] {
                let slice = &backing[start..end];
                assert!(is_zero(slice), "{start}..{end}");
            }
        }
        backing[4096 + 10] = 1;
        for start in 0..16 {
            assert!(!is_zero(&backing[start..]), "{start}..");
            assert!(is_zero(&backing[start..4096 + 10]), "{start}..4106");
        }
    }
}
