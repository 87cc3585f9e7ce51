//! JSON bytes to Python objects.

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString};

use super::{scan_plain, MAX_DEPTH};

/// What the decoder reads: the deepest content the encoder accepts, inside a message's envelope.
const MAX_READ_DEPTH: usize = MAX_DEPTH + 1;

/// Parses JSON bytes straight into Python objects.
pub fn decode<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    Decoder::new(py).decode(data)
}

/// Parses many JSON documents, sharing buffers and a cache of object keys between them:
/// the messages of a log repeat the same keys, and a cached key is also pre-hashed.
pub struct Decoder<'py> {
    py: Python<'py>,
    keys: KeyCache,
    /// Reused buffer for strings with escapes.
    scratch: Vec<u8>,
}

impl<'py> Decoder<'py> {
    pub fn new(py: Python<'py>) -> Self {
        Decoder {
            py,
            keys: KeyCache::new(),
            scratch: Vec::new(),
        }
    }

    pub fn decode(&mut self, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        let mut parser = Parser {
            py: self.py,
            data,
            pos: 0,
            depth: 0,
            scratch: std::mem::take(&mut self.scratch),
            keys: &mut self.keys,
        };
        parser.skip_whitespace();
        let value = parser.value();
        parser.skip_whitespace();
        let trailing = parser.pos != data.len();
        let error = parser.error("extra data after the JSON value");
        self.scratch = parser.scratch;
        let value = value?;
        if trailing {
            return Err(error);
        }
        Ok(value)
    }
}

const KEY_CACHE_SLOTS: usize = 512;
const CACHED_KEY_MAX: usize = 48;

/// Python strings for short object keys, by their bytes; a slot holds the latest key that
/// hashed to it.
struct KeyCache {
    slots: Vec<Option<CachedKey>>,
}

/// A key's bytes and its Python string.
type CachedKey = (Box<[u8]>, Py<PyString>);

impl KeyCache {
    fn new() -> Self {
        KeyCache {
            slots: (0..KEY_CACHE_SLOTS).map(|_| None).collect(),
        }
    }

    fn get_or_make<'py>(
        &mut self,
        py: Python<'py>,
        text: &[u8],
        make: impl FnOnce() -> PyResult<Bound<'py, PyString>>,
    ) -> PyResult<Bound<'py, PyString>> {
        // FNV-1a: short keys, no need for more.
        let hash = text.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let slot = &mut self.slots[(hash as usize) % KEY_CACHE_SLOTS];
        if let Some((bytes, key)) = slot {
            if **bytes == *text {
                return Ok(key.bind(py).clone());
            }
        }
        let key = make()?;
        *slot = Some((text.into(), key.clone().unbind()));
        Ok(key)
    }
}

struct Parser<'py, 'd, 'k> {
    py: Python<'py>,
    data: &'d [u8],
    pos: usize,
    depth: usize,
    scratch: Vec<u8>,
    keys: &'k mut KeyCache,
}

impl<'py> Parser<'py, '_, '_> {
    fn error(&self, what: &str) -> PyErr {
        PyValueError::new_err(format!("invalid JSON at byte {}: {what}", self.pos))
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.data.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.data.get(self.pos).copied()
    }

    fn literal(&mut self, text: &[u8]) -> bool {
        if self.data[self.pos..].starts_with(text) {
            self.pos += text.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        match self.peek() {
            Some(b'{') => self.nested(Self::object),
            Some(b'[') => self.nested(Self::array),
            Some(b'"') => Ok(self.string()?.into_any()),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ if self.literal(b"null") => Ok(py.None().into_bound(py)),
            _ if self.literal(b"true") => Ok(PyBool::new(py, true).to_owned().into_any()),
            _ if self.literal(b"false") => Ok(PyBool::new(py, false).to_owned().into_any()),
            // json.loads accepts these, so legacy logs may hold them.
            _ if self.literal(b"NaN") => Ok(PyFloat::new(py, f64::NAN).into_any()),
            _ if self.literal(b"Infinity") => Ok(PyFloat::new(py, f64::INFINITY).into_any()),
            _ => Err(self.error("expecting a value")),
        }
    }

    fn nested(
        &mut self,
        parse: fn(&mut Self) -> PyResult<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.depth >= MAX_READ_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.depth += 1;
        self.pos += 1;
        let value = parse(self);
        self.depth -= 1;
        value
    }

    fn object(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let dict = PyDict::new(self.py);
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(dict.into_any());
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expecting a property name in double quotes"));
            }
            let key = self.key()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expecting ':'"));
            }
            self.pos += 1;
            self.skip_whitespace();
            let value = self.value()?;
            dict.set_item(key, value)?;
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(dict.into_any());
                }
                _ => return Err(self.error("expecting ',' or '}'")),
            }
        }
    }

    /// An object key: short plain keys come from the cache.
    fn key(&mut self) -> PyResult<Bound<'py, PyString>> {
        let start = self.pos + 1;
        let end = start + scan_plain(&self.data[start..]);
        if self.data.get(end) == Some(&b'"') && end - start <= CACHED_KEY_MAX {
            self.pos = end + 1;
            let text = &self.data[start..end];
            let py = self.py;
            return self
                .keys
                .get_or_make(py, text, || make_str(py, text, false));
        }
        self.string()
    }

    fn array(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let list = PyList::empty(self.py);
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(list.into_any());
        }
        loop {
            self.skip_whitespace();
            list.append(self.value()?)?;
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(list.into_any());
                }
                _ => return Err(self.error("expecting ',' or ']'")),
            }
        }
    }

    fn number(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
            if self.literal(b"Infinity") {
                return Ok(PyFloat::new(self.py, f64::NEG_INFINITY).into_any());
            }
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("expecting a digit")),
        }
        let mut is_float = false;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expecting a digit after '.'"));
            }
            self.digits();
            is_float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expecting a digit in the exponent"));
            }
            self.digits();
            is_float = true;
        }
        // The slice holds only ASCII digits, signs, '.', 'e'.
        let text = std::str::from_utf8(&self.data[start..self.pos]).expect("ASCII number");
        if is_float {
            let value: f64 = text.parse().map_err(|_| self.error("bad number"))?;
            return Ok(PyFloat::new(self.py, value).into_any());
        }
        if let Ok(small) = text.parse::<i64>() {
            return Ok(small.into_pyobject(self.py)?.into_any());
        }
        // Big ints stay exact: Python parses the digits.
        let digits = PyString::new(self.py, text);
        self.py.get_type::<PyInt>().call1((digits,))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn string(&mut self) -> PyResult<Bound<'py, PyString>> {
        self.pos += 1; // the opening quote
        let start = self.pos;
        // Fast path: no escapes, the bytes are the string.
        self.pos += scan_plain(&self.data[start..]);
        match self.data.get(self.pos) {
            Some(b'"') => {
                let text = &self.data[start..self.pos];
                self.pos += 1;
                return make_str(self.py, text, false);
            }
            Some(0x00..=0x1f) => return Err(self.error("control character in a string")),
            _ => {}
        }
        let mut text = std::mem::take(&mut self.scratch);
        text.clear();
        text.extend_from_slice(&self.data[start..self.pos]);
        let mut lone_surrogate = false;
        loop {
            let Some(&byte) = self.data.get(self.pos) else {
                return Err(self.error("unterminated string"));
            };
            self.pos += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let Some(&escaped) = self.data.get(self.pos) else {
                        return Err(self.error("unterminated escape"));
                    };
                    self.pos += 1;
                    match escaped {
                        b'"' => text.push(b'"'),
                        b'\\' => text.push(b'\\'),
                        b'/' => text.push(b'/'),
                        b'b' => text.push(0x08),
                        b'f' => text.push(0x0c),
                        b'n' => text.push(b'\n'),
                        b'r' => text.push(b'\r'),
                        b't' => text.push(b'\t'),
                        b'u' => lone_surrogate |= self.unicode_escape(&mut text)?,
                        _ => return Err(self.error("invalid escape")),
                    }
                }
                0x00..=0x1f => return Err(self.error("control character in a string")),
                _ => text.push(byte),
            }
        }
        let result = make_str(self.py, &text, lone_surrogate);
        self.scratch = text;
        result
    }

    /// Decodes `\uXXXX` (and a following low surrogate) into `text` as UTF-8; a lone
    /// surrogate goes in as its 3-byte "surrogatepass" form. Returns whether it was lone.
    fn unicode_escape(&mut self, text: &mut Vec<u8>) -> PyResult<bool> {
        let high = self.hex4()?;
        let mut code = high;
        if (0xd800..0xdc00).contains(&high) && self.data[self.pos..].starts_with(b"\\u") {
            let save = self.pos;
            self.pos += 2;
            let low = self.hex4()?;
            if (0xdc00..0xe000).contains(&low) {
                code = 0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00);
            } else {
                self.pos = save;
            }
        }
        let lone = (0xd800..0xe000).contains(&code);
        if lone {
            text.extend_from_slice(&[
                0xe0 | (code >> 12) as u8,
                0x80 | ((code >> 6) & 0x3f) as u8,
                0x80 | (code & 0x3f) as u8,
            ]);
        } else {
            let ch = char::from_u32(code).expect("not a surrogate");
            text.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
        }
        Ok(lone)
    }

    fn hex4(&mut self) -> PyResult<u32> {
        let hex = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.error("truncated \\u escape"))?;
        let text = std::str::from_utf8(hex).map_err(|_| self.error("bad \\u escape"))?;
        let code = u32::from_str_radix(text, 16).map_err(|_| self.error("bad \\u escape"))?;
        self.pos += 4;
        Ok(code)
    }
}

/// A Python str from UTF-8 bytes.
fn make_str<'py>(
    py: Python<'py>,
    text: &[u8],
    surrogatepass: bool,
) -> PyResult<Bound<'py, PyString>> {
    // ASCII is copied straight into a compact string; the stable ABI hides that layout.
    #[cfg(not(feature = "abi3"))]
    if text.is_ascii() {
        // SAFETY: PyUnicode_New returns a new compact ASCII string of `text.len()` bytes (or
        // NULL with an exception set), which we fill before anyone sees it.
        unsafe {
            let ptr = ffi::PyUnicode_New(text.len() as ffi::Py_ssize_t, 127);
            if !ptr.is_null() {
                std::ptr::copy_nonoverlapping(
                    text.as_ptr(),
                    ffi::PyUnicode_DATA(ptr).cast::<u8>(),
                    text.len(),
                );
            }
            return Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked());
        }
    }
    let errors = if surrogatepass {
        c"surrogatepass".as_ptr()
    } else {
        std::ptr::null()
    };
    // SAFETY: PyUnicode_DecodeUTF8 validates its input and returns a new reference or NULL.
    unsafe {
        let ptr =
            ffi::PyUnicode_DecodeUTF8(text.as_ptr().cast(), text.len() as ffi::Py_ssize_t, errors);
        Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked())
    }
}

/// Python strs from stored messages, for `raw=True`.
pub fn raw_str<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyString>> {
    make_str(py, text, false)
}
