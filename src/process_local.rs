//! Values of this process that a forked child makes afresh, without a lock to inherit.

use std::convert::Infallible;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A value of this process, made on first use, and made again in a forked child.
///
/// No lock guards it: a fork while another thread of the parent held a lock would leave that
/// lock held forever in the child, and the child's first call would hang on it. A child finds
/// a value tagged with another pid and swaps in its own; the parent's is left alone, never
/// dropped (see the module comment).
pub struct ProcessLocal<T> {
    current: AtomicPtr<(u32, T)>,
}

impl<T> ProcessLocal<T> {
    pub const fn new() -> ProcessLocal<T> {
        ProcessLocal {
            current: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The value behind `seen` if it is process `pid`'s.
    fn owned<'a>(seen: *mut (u32, T), pid: u32) -> Option<&'a T> {
        // SAFETY: a published value is freed only by `drop`, which has `&mut self`.
        match unsafe { seen.as_ref() } {
            Some((owner, value)) if *owner == pid => Some(value),
            _ => None,
        }
    }
}

impl<T: Send + Sync> ProcessLocal<T> {
    /// This process's value; `make` builds it when there is none yet.
    pub fn get(&self, make: impl FnOnce() -> T) -> &T {
        match self.get_or_try(|| Ok::<T, Infallible>(make())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// This process's value; `make` builds it when there is none yet, or fails, leaving none.
    pub fn get_or_try<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        let pid = std::process::id();
        let mut seen = self.current.load(Ordering::Acquire);
        if let Some(value) = Self::owned(seen, pid) {
            return Ok(value);
        }
        let made = Box::into_raw(Box::new((pid, make()?)));
        loop {
            match self
                .current
                .compare_exchange(seen, made, Ordering::AcqRel, Ordering::Acquire)
            {
                // The value seen before, if any, was another process's: left alone.
                // SAFETY: `made` is published now, and lives as long as `self`.
                Ok(_) => return Ok(unsafe { &(*made).1 }),
                Err(now) => {
                    if let Some(value) = Self::owned(now, pid) {
                        // Another thread of this process published one first.
                        // SAFETY: `made` was never published.
                        drop(unsafe { Box::from_raw(made) });
                        return Ok(value);
                    }
                    seen = now;
                }
            }
        }
    }
}

impl<T> Drop for ProcessLocal<T> {
    fn drop(&mut self) {
        let current = *self.current.get_mut();
        if Self::owned(current, std::process::id()).is_some() {
            // SAFETY: `&mut self`: no reference to it is left.
            drop(unsafe { Box::from_raw(current) });
        }
    }
}
