//! Python objects to JSON bytes, and JSON bytes back to Python objects, without `json`.
//!
//! The encoder accepts what `json.dumps` accepts and gives output that `json.loads` reads back
//! to the same value; it refuses NaN and infinities, which browsers' `JSON.parse` rejects.
//! The decoder accepts what `json.loads` accepts, so logs written by `json.dumps` stay readable.

mod decode;
mod encode;

pub use decode::{decode, raw_str, Decoder};
pub use encode::Encoder;

/// Content nested deeper than this is refused; it matches Python's default recursion limit.
pub const MAX_DEPTH: usize = 1000;

/// How many bytes from the start hold no quote, backslash or control character: the part
/// of a string that is copied as is. Eight bytes at a time.
pub(super) fn scan_plain(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let mut offset = 0;
    while let Some(chunk) = bytes.get(offset..offset + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let special = has_zero(word ^ (ONES * u64::from(b'"')))
            | has_zero(word ^ (ONES * u64::from(b'\\')))
            // Bytes below 0x20; a set high bit (UTF-8) keeps a byte out of it.
            | (word.wrapping_sub(ONES * 0x20) & !word & HIGHS);
        if special != 0 {
            break;
        }
        offset += 8;
    }
    offset
        + bytes[offset..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .unwrap_or(bytes.len() - offset)
}
