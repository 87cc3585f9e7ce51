//! Python objects to JSON bytes, and JSON bytes back to Python objects, without `json`.
//!
//! The encoder accepts what `json.dumps` accepts and gives output that `json.loads` reads back
//! to the same value; it refuses NaN and infinities, which browsers' `JSON.parse` rejects.
//! The decoder accepts what `json.loads` accepts, so logs written by `json.dumps` stay readable.

use pyo3::exceptions::{PyRecursionError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

/// Content nested deeper than this is refused; it matches Python's default recursion limit.
pub const MAX_DEPTH: usize = 1000;

/// What the decoder reads: the deepest content the encoder accepts, inside a message's envelope.
const MAX_READ_DEPTH: usize = MAX_DEPTH + 1;

/// Writes Python values as JSON into one growing buffer.
pub struct Encoder<'a, 'py> {
    default: Option<&'a Bound<'py, PyAny>>,
    /// The containers being written, outermost first: at the depth limit they tell a cycle
    /// (the same object twice) from content that is merely deep.
    path: Vec<*mut ffi::PyObject>,
    pub out: Vec<u8>,
}

impl<'a, 'py> Encoder<'a, 'py> {
    pub fn new(default: Option<&'a Bound<'py, PyAny>>, out: Vec<u8>) -> Self {
        Encoder {
            default,
            path: Vec::new(),
            out,
        }
    }

    pub fn write(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<()> {
        // Exact types first: they are nearly all the content there is.
        if obj.is_none() {
            self.out.extend_from_slice(b"null");
        } else if let Ok(b) = obj.cast_exact::<PyBool>() {
            let text: &[u8] = if b.is_true() { b"true" } else { b"false" };
            self.out.extend_from_slice(text);
        } else if let Ok(s) = obj.cast::<PyString>() {
            write_str(&mut self.out, s)?;
        } else if let Ok(i) = obj.cast::<PyInt>() {
            write_int(&mut self.out, i)?;
        } else if let Ok(f) = obj.cast::<PyFloat>() {
            write_float(&mut self.out, f.value())?;
        } else if let Ok(d) = obj.cast::<PyDict>() {
            self.enter(obj)?;
            self.write_dict(d)?;
            self.path.pop();
        } else if let Ok(l) = obj.cast::<PyList>() {
            self.enter(obj)?;
            self.write_items(l.iter())?;
            self.path.pop();
        } else if let Ok(t) = obj.cast::<PyTuple>() {
            self.enter(obj)?;
            self.write_items(t.iter())?;
            self.path.pop();
        } else if let Some(default) = self.default {
            let replacement = default.call1((obj,))?;
            self.enter(obj)?;
            self.write(&replacement)?;
            self.path.pop();
        } else {
            return Err(PyTypeError::new_err(format!(
                "Object of type {} is not JSON serializable",
                type_name(obj)
            )));
        }
        Ok(())
    }

    fn enter(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<()> {
        if self.path.len() >= MAX_DEPTH {
            let ptr = obj.as_ptr();
            return Err(if self.path.contains(&ptr) {
                PyValueError::new_err("Circular reference detected")
            } else {
                PyRecursionError::new_err(format!(
                    "content is nested deeper than {MAX_DEPTH} levels"
                ))
            });
        }
        self.path.push(obj.as_ptr());
        Ok(())
    }

    fn write_items(&mut self, items: impl Iterator<Item = Bound<'py, PyAny>>) -> PyResult<()> {
        self.out.push(b'[');
        for (index, item) in items.enumerate() {
            if index > 0 {
                self.out.push(b',');
            }
            self.write(&item)?;
        }
        self.out.push(b']');
        Ok(())
    }

    /// A dict's items. Subclasses are read through their `items()`, as `json.dumps` reads
    /// them (a subclass may hide or reorder keys). With a `default`, which may change the
    /// dict while it is written, a plain dict is read from a snapshot of its items, as
    /// `json.dumps` does; without one it is walked in place, and a change of size (only a
    /// subclass's `items()` could make one) raises as iterating a changing dict does.
    fn write_dict(&mut self, dict: &Bound<'py, PyDict>) -> PyResult<()> {
        self.out.push(b'{');
        if dict.is_exact_instance_of::<PyDict>() && self.default.is_none() {
            let size = dict.len();
            let mut position: ffi::Py_ssize_t = 0;
            let mut index = 0;
            loop {
                let (mut key, mut value) = (std::ptr::null_mut(), std::ptr::null_mut());
                // SAFETY: a live dict; PyDict_Next bounds-checks `position` against the
                // dict's current entries, and the borrowed key and value are made owned
                // before any Python code can run.
                let (key, value) = unsafe {
                    if ffi::PyDict_Next(dict.as_ptr(), &mut position, &mut key, &mut value) == 0 {
                        break;
                    }
                    (
                        Bound::from_borrowed_ptr(dict.py(), key),
                        Bound::from_borrowed_ptr(dict.py(), value),
                    )
                };
                self.write_item(index, &key, &value)?;
                if dict.len() != size {
                    return Err(PyRuntimeError::new_err(
                        "dictionary changed size during iteration",
                    ));
                }
                index += 1;
            }
        } else if dict.is_exact_instance_of::<PyDict>() {
            for (index, item) in dict.items().iter().enumerate() {
                let (key, value): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item.extract()?;
                self.write_item(index, &key, &value)?;
            }
        } else {
            for (index, item) in dict.call_method0("items")?.try_iter()?.enumerate() {
                let (key, value): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item?.extract()?;
                self.write_item(index, &key, &value)?;
            }
        }
        self.out.push(b'}');
        Ok(())
    }

    fn write_item(
        &mut self,
        index: usize,
        key: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<()> {
        if index > 0 {
            self.out.push(b',');
        }
        self.write_key(key)?;
        self.out.push(b':');
        self.write(value)
    }

    /// Keys become strings the way `json.dumps` makes them.
    fn write_key(&mut self, key: &Bound<'py, PyAny>) -> PyResult<()> {
        if let Ok(s) = key.cast::<PyString>() {
            return write_str(&mut self.out, s);
        }
        let text: String = if key.is_none() {
            "null".into()
        } else if let Ok(b) = key.cast::<PyBool>() {
            (if b.is_true() { "true" } else { "false" }).into()
        } else if let Ok(i) = key.cast::<PyInt>() {
            let mut digits = Vec::new();
            write_int(&mut digits, i)?;
            String::from_utf8(digits).expect("integer digits are ASCII")
        } else if let Ok(f) = key.cast::<PyFloat>() {
            let value = f.value();
            check_finite(value)?;
            // float.__repr__, as json.dumps writes float keys ("1e+16", not "1e16").
            PyFloat::new(key.py(), value).repr()?.to_cow()?.into_owned()
        } else {
            return Err(PyTypeError::new_err(format!(
                "keys must be str, int, float, bool or None, not {}",
                type_name(key)
            )));
        };
        self.out.push(b'"');
        self.out.extend_from_slice(text.as_bytes());
        self.out.push(b'"');
        Ok(())
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn check_finite(value: f64) -> PyResult<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "Out of range float values are not JSON compliant: {value}"
        )))
    }
}

fn write_float(out: &mut Vec<u8>, value: f64) -> PyResult<()> {
    check_finite(value)?;
    out.extend_from_slice(ryu::Buffer::new().format_finite(value).as_bytes());
    Ok(())
}

fn write_int(out: &mut Vec<u8>, value: &Bound<'_, PyInt>) -> PyResult<()> {
    if let Ok(small) = value.extract::<i64>() {
        out.extend_from_slice(itoa::Buffer::new().format(small).as_bytes());
        return Ok(());
    }
    // Beyond 64 bits: Python's own decimal digits keep big ints exact.
    // SAFETY: `value` is a live int; PyNumber_ToBase returns a new reference or NULL.
    let digits = unsafe {
        Bound::from_owned_ptr_or_err(value.py(), ffi::PyNumber_ToBase(value.as_ptr(), 10))?
    };
    out.extend_from_slice(digits.cast::<PyString>()?.to_cow()?.as_bytes());
    Ok(())
}

/// Writes a JSON string. Lone surrogates, which UTF-8 cannot hold, become `\udXXX` escapes,
/// as `json.dumps` writes them.
fn write_str(out: &mut Vec<u8>, s: &Bound<'_, PyString>) -> PyResult<()> {
    match s.to_cow() {
        Ok(text) => escape_into(out, text.as_bytes(), false),
        Err(_) => {
            // "surrogatepass" encodes each surrogate as the 3 bytes ED A0..BF xx.
            let bytes = s.encode_with_surrogatepass()?;
            escape_into(out, &bytes, true);
        }
    }
    Ok(())
}

trait SurrogatePass {
    fn encode_with_surrogatepass(&self) -> PyResult<Vec<u8>>;
}

impl SurrogatePass for Bound<'_, PyString> {
    fn encode_with_surrogatepass(&self) -> PyResult<Vec<u8>> {
        let py = self.py();
        // SAFETY: live str; returns a new bytes reference or NULL with an exception set.
        let encoded = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyUnicode_AsEncodedString(
                    self.as_ptr(),
                    c"utf-8".as_ptr(),
                    c"surrogatepass".as_ptr(),
                ),
            )?
        };
        encoded.extract::<Vec<u8>>()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as a JSON string. `passed_surrogates`: the bytes came from "surrogatepass"
/// and may hold surrogates, which are looked for byte by byte; valid UTF-8 is skimmed
/// eight bytes at a time.
fn escape_into(out: &mut Vec<u8>, bytes: &[u8], passed_surrogates: bool) {
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !passed_surrogates {
            i += scan_plain(&bytes[i..]);
            if i >= bytes.len() {
                break;
            }
        }
        let byte = bytes[i];
        let escape: Option<&[u8]> = match byte {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            0x00..=0x1f => None,
            // A surrogate passed through as ED A0..BF xx: not UTF-8, so escape it.
            0xed if i + 2 < bytes.len() && bytes[i + 1] >= 0xa0 => {
                out.extend_from_slice(&bytes[start..i]);
                let code = (u32::from(byte & 0x0f) << 12)
                    | (u32::from(bytes[i + 1] & 0x3f) << 6)
                    | u32::from(bytes[i + 2] & 0x3f);
                push_unicode_escape(out, code);
                i += 3;
                start = i;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(text) => out.extend_from_slice(text),
            None => push_unicode_escape(out, u32::from(byte)),
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn push_unicode_escape(out: &mut Vec<u8>, code: u32) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((code >> shift) & 0xf) as usize]);
    }
}

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

/// How many bytes from the start hold no quote, backslash or control character: the part
/// of a string that is copied as is. Eight bytes at a time.
fn scan_plain(bytes: &[u8]) -> usize {
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
