//! JSON bytes to Python objects, by jiter (pydantic-core's parser).
//!
//! `jiter::PythonParse` reads nearly every message. It nests only 200 deep, while the encoder
//! writes content 1,000 deep inside a message's envelope: a document it refuses is read again
//! by a walk over jiter's tokens with our own depth limit. What that walk refuses as well (a
//! lone surrogate escape, which jiter never reads, or text that is not JSON) is an error here;
//! callers then read the message with `json.loads`, as the article's code would.

use jiter::{FloatMode, Jiter, JiterError, PartialMode, Peek, PythonParse, StringCacheMode};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use super::MAX_DEPTH;

/// What the decoder reads: the deepest content the encoder accepts, inside a message's envelope.
const MAX_READ_DEPTH: usize = MAX_DEPTH + 1;

/// Like `json.loads`: `NaN` and `Infinity` read as floats, the last of duplicate keys wins.
/// Short strings, values too, come from jiter's cache (kept across calls): a log's messages
/// repeat their keys and many values; caching keys only made `unspool` slower (docs/json.md).
const PARSE: PythonParse = PythonParse {
    allow_inf_nan: true,
    cache_mode: StringCacheMode::All,
    partial_mode: PartialMode::Off,
    catch_duplicate_keys: false,
    float_mode: FloatMode::Float,
};

/// Parses JSON bytes straight into Python objects.
pub fn decode<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    PARSE
        .python_parse(py, data)
        .or_else(|_| DeepWalk::new(py, data).document())
}

/// Reads a document as jiter does, nesting as deep as [`MAX_READ_DEPTH`].
struct DeepWalk<'j, 'py> {
    py: Python<'py>,
    jiter: Jiter<'j>,
    depth: usize,
}

impl<'j, 'py> DeepWalk<'j, 'py> {
    fn new(py: Python<'py>, data: &'j [u8]) -> Self {
        DeepWalk {
            py,
            jiter: Jiter::new(data).with_allow_inf_nan(),
            depth: 0,
        }
    }

    fn document(mut self) -> PyResult<Bound<'py, PyAny>> {
        let peek = self.jiter.peek().map_err(|e| self.refused(e))?;
        let value = self.value(peek)?;
        self.jiter.finish().map_err(|e| self.refused(e))?;
        Ok(value)
    }

    fn refused(&self, error: JiterError) -> PyErr {
        PyValueError::new_err(error.description(&self.jiter))
    }

    fn value(&mut self, peek: Peek) -> PyResult<Bound<'py, PyAny>> {
        if peek != Peek::Array && peek != Peek::Object {
            // A scalar: no recursion, so jiter's own reader (and its limit) is fine.
            let scalar = self.jiter.known_value(peek).map_err(|e| self.refused(e))?;
            return scalar.into_pyobject(self.py);
        }
        if self.depth >= MAX_READ_DEPTH {
            return Err(PyValueError::new_err(format!(
                "JSON nested deeper than {MAX_READ_DEPTH} levels at byte {}",
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
        let mut next = self.jiter.known_array().map_err(|e| self.refused(e))?;
        while let Some(peek) = next {
            list.append(self.value(peek)?)?;
            next = self.jiter.array_step().map_err(|e| self.refused(e))?;
        }
        Ok(list.into_any())
    }

    fn object(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let dict = PyDict::new(py);
        let first = self.jiter.known_object();
        let mut key = first
            .map(|key| key.map(|key| PyString::new(py, key)))
            .map_err(|e| self.refused(e))?;
        while let Some(name) = key {
            let peek = self.jiter.peek().map_err(|e| self.refused(e))?;
            dict.set_item(name, self.value(peek)?)?;
            let next = self.jiter.next_key();
            key = next
                .map(|key| key.map(|key| PyString::new(py, key)))
                .map_err(|e| self.refused(e))?;
        }
        Ok(dict.into_any())
    }
}

/// Python strs from stored messages, for `raw=True`.
pub fn raw_str<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyString>> {
    if text.is_ascii() {
        // SAFETY: ASCII, as pystring_ascii_new requires (and so valid UTF-8).
        return Ok(unsafe { jiter::pystring_ascii_new(py, std::str::from_utf8_unchecked(text)) });
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
