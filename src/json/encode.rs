//! Python objects to JSON bytes.
//!
//! The walk over Python objects is ours: dict subclasses, `default=`, cycles and keys as
//! `json.dumps` treats them. So is the writing. serde_json's writer was measured for it
//! (docs/json.md): its string escaping reads a byte at a time, twice as slow as our scan on
//! long strings, and its float format ("1e+16") would change the bytes we store ("1e16", ryu's);
//! its integers are itoa's, which we call directly.

use pyo3::exceptions::{PyRecursionError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use super::MAX_DEPTH;
use crate::convert::type_name;

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
