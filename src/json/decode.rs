//! JSON bytes to Python objects: jiter reads the JSON, this walk builds the objects.
//!
//! jiter (pydantic-core's parser) does the reading: whitespace, strings and their escapes,
//! numbers, UTF-8. Its `PythonParse` would build the objects as well, but it does not build on
//! the stable ABI of CPython 3.9 that our wheel targets, and it nests only 200 deep while the
//! encoder writes content 1,000 deep inside a message's envelope; so we walk jiter's tokens,
//! with our depth limit and a cache of short strings (docs/json.md has the figures). jiter
//! refuses lone surrogate escapes, which `json.loads` reads: callers then use `json.loads`.

use jiter::{Jiter, JiterError, NumberAny, NumberInt, Peek};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use super::MAX_DEPTH;

/// What the decoder reads: the deepest content the encoder accepts, inside a message's envelope.
const MAX_READ_DEPTH: usize = MAX_DEPTH + 1;

/// Parses one JSON document straight into Python objects.
pub fn decode<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    Walk {
        py,
        jiter: Jiter::new(data).with_allow_inf_nan(),
        depth: 0,
        strs: None,
    }
    .document()
}

/// Parses many JSON documents, sharing jiter's buffer and a cache of short strings between
/// them: the messages of a log repeat the same keys (a cached key is also pre-hashed) and
/// many values (a room, a user's name), which then share one str instead of each making one.
pub struct Decoder<'py> {
    py: Python<'py>,
    strs: StrCache,
    /// jiter's buffer for strings with escapes.
    tape: Vec<u8>,
}

impl<'py> Decoder<'py> {
    pub fn new(py: Python<'py>) -> Self {
        Decoder {
            py,
            strs: StrCache::new(),
            tape: Vec::new(),
        }
    }

    pub fn decode(&mut self, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        let mut walk = Walk {
            py: self.py,
            jiter: Jiter::with_tape(data, std::mem::take(&mut self.tape)).with_allow_inf_nan(),
            depth: 0,
            strs: Some(&mut self.strs),
        };
        let value = walk.document();
        self.tape = walk.jiter.into_tape();
        value
    }
}

struct Walk<'j, 'py, 'k> {
    py: Python<'py>,
    jiter: Jiter<'j>,
    depth: usize,
    /// Only where many documents share it: making one costs more than one document gains.
    strs: Option<&'k mut StrCache>,
}

impl<'py> Walk<'_, 'py, '_> {
    fn document(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let peek = self.jiter.peek().map_err(refused)?;
        let value = self.value(peek)?;
        self.jiter.finish().map_err(refused)?;
        Ok(value)
    }

    fn value(&mut self, peek: Peek) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        match peek {
            Peek::Array | Peek::Object => self.nested(peek),
            Peek::String => {
                let text = self.jiter.known_str().map_err(refused)?;
                Ok(cached_str(py, self.strs.as_deref_mut(), text)?.into_any())
            }
            Peek::Null => {
                self.jiter.known_null().map_err(refused)?;
                Ok(py.None().into_bound(py))
            }
            Peek::True | Peek::False => {
                let value = self.jiter.known_bool(peek).map_err(refused)?;
                Ok(value.into_pyobject(py)?.to_owned().into_any())
            }
            // Numbers, NaN and the infinities (json.loads reads them, so old logs may hold them).
            _ => match self.jiter.known_number(peek).map_err(refused)? {
                NumberAny::Int(NumberInt::Int(int)) => Ok(int.into_pyobject(py)?.into_any()),
                NumberAny::Int(NumberInt::BigInt(big)) => Ok(big.into_pyobject(py)?.into_any()),
                NumberAny::Float(float) => Ok(float.into_pyobject(py)?.into_any()),
            },
        }
    }

    fn nested(&mut self, peek: Peek) -> PyResult<Bound<'py, PyAny>> {
        if self.depth >= MAX_READ_DEPTH {
            return Err(PyValueError::new_err(format!(
                "invalid JSON: nested deeper than {MAX_READ_DEPTH} levels at byte {}",
                self.jiter.current_index()
            )));
        }
        self.depth += 1;
        let value = if peek == Peek::Array {
            self.array()
        } else {
            self.object()
        };
        self.depth -= 1;
        value
    }

    fn array(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let list = PyList::empty(self.py);
        let mut next = self.jiter.known_array().map_err(refused)?;
        while let Some(peek) = next {
            list.append(self.value(peek)?)?;
            next = self.jiter.array_step().map_err(refused)?;
        }
        Ok(list.into_any())
    }

    fn object(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let dict = PyDict::new(py);
        let mut key = match self.jiter.known_object() {
            Ok(key) => key
                .map(|key| cached_str(py, self.strs.as_deref_mut(), key))
                .transpose()?,
            Err(error) => return Err(refused(error)),
        };
        while let Some(name) = key {
            let peek = self.jiter.peek().map_err(refused)?;
            dict.set_item(name, self.value(peek)?)?;
            key = match self.jiter.next_key() {
                Ok(key) => key
                    .map(|key| cached_str(py, self.strs.as_deref_mut(), key))
                    .transpose()?,
                Err(error) => return Err(refused(error)),
            };
        }
        Ok(dict.into_any())
    }
}

fn refused(error: JiterError) -> PyErr {
    PyValueError::new_err(format!("invalid JSON: {error}"))
}

fn cached_str<'py>(
    py: Python<'py>,
    cache: Option<&mut StrCache>,
    text: &str,
) -> PyResult<Bound<'py, PyString>> {
    match cache {
        Some(cache) => cache.get(py, text),
        None => make_str(py, text),
    }
}

const CACHE_SLOTS: usize = 512;
const CACHED_STR_MAX: usize = 48;

/// Python strs for short strings, keys and values, by their text; a slot holds the latest
/// str that hashed to it.
struct StrCache {
    slots: Vec<Option<(Box<str>, Py<PyString>)>>,
}

impl StrCache {
    fn new() -> Self {
        StrCache {
            slots: (0..CACHE_SLOTS).map(|_| None).collect(),
        }
    }

    fn get<'py>(&mut self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyString>> {
        if text.len() > CACHED_STR_MAX {
            return make_str(py, text);
        }
        // FNV-1a: short strings, no need for more.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let slot = &mut self.slots[(hash as usize) % CACHE_SLOTS];
        if let Some((cached, key)) = slot {
            if **cached == *text {
                return Ok(key.bind(py).clone());
            }
        }
        let key = make_str(py, text)?;
        *slot = Some((text.into(), key.clone().unbind()));
        Ok(key)
    }
}

fn make_str<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyString>> {
    raw_str(py, text.as_bytes())
}

/// A Python str from UTF-8 bytes: stored messages for `raw=True`, and decoded strings.
pub fn raw_str<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyString>> {
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
    // SAFETY: PyUnicode_DecodeUTF8 validates its input and returns a new reference or NULL.
    unsafe {
        let ptr = ffi::PyUnicode_DecodeUTF8(
            text.as_ptr().cast(),
            text.len() as ffi::Py_ssize_t,
            std::ptr::null(),
        );
        Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked())
    }
}
