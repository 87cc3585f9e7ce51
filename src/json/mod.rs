//! Python objects to JSON bytes (`encode`), and JSON bytes back to Python objects (`decode`).
//!
//! The encoder accepts what `json.dumps` accepts and gives output that `json.loads` reads back
//! to the same value; it refuses NaN and infinities, which browsers' `JSON.parse` rejects.
//! The decoder reads what `json.loads` reads, so logs written by `json.dumps` stay readable,
//! except lone surrogate escapes: callers hand those messages to `json.loads`. Which libraries
//! do the work, and why not more of it: docs/json.md.

mod decode;
mod encode;

pub use decode::{decode, raw_str, Decoder};
pub use encode::Encoder;

/// Content nested deeper than this is refused; it matches Python's default recursion limit.
pub const MAX_DEPTH: usize = 1000;
