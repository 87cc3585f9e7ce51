//! `NativeSubscription`, the class behind `replaylog.Subscription` and `AsyncSubscription`: a
//! `Subscription` read by a blocking `next`, or fed to an asyncio queue by a pump task, and its
//! deliveries made into Python objects (a message dict, or the exception for a gap).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tokio::task::JoinHandle;

use crate::aio;
use crate::connection::{self, runtime, Flavor};
use crate::convert::{is_unreadable, json_loads, log_unreadable};
use crate::errors::{python_error, Failure};
use crate::hub::Membership;
use crate::json;
use crate::message;
use crate::seconds_or_zero;
use crate::store::Store;
use crate::subscription::{Delivery, Next, Request, Subscription};

/// A live subscription; `replaylog.Subscription` wraps it.
#[pyclass(module = "replaylog._native", frozen)]
pub struct NativeSubscription {
    names: Vec<String>,
    /// Per channel, `(cursor, epoch)` where the stream starts (see `Subscription::start`).
    start: Vec<(i64, String)>,
    inner: Arc<tokio::sync::Mutex<Subscription>>,
    /// Bytes of live messages waiting for this consumer (see `hub::Queue`).
    queued_bytes: Arc<AtomicUsize>,
    /// Its place on the log's shared pub/sub connection: leaving ends the stream.
    membership: Mutex<Option<Membership>>,
    /// The task feeding an asyncio queue when iterated asynchronously.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The process that opened it: a forked child inherits it, but not its tasks' threads.
    pid: u32,
}

/// How often a blocked `next` wakes to let Ctrl-C through.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Items an asyncio consumer may have waiting before the feeding task pauses.
const ASYNC_QUEUE_HIGH_WATER: usize = 1_000;

#[pymethods]
impl NativeSubscription {
    /// The next message as a dict, None on timeout or once closed (see `closed`).
    /// Raises `IncompleteReplayError` where a hole could not be filled.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        if self.inherited() {
            return Ok(None);
        }
        let deadline = match timeout {
            Some(seconds) => Some(Instant::now() + seconds_or_zero(seconds)?),
            None => None,
        };
        loop {
            let slice = deadline.map_or(SIGNAL_CHECK, |deadline| {
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_CHECK)
            });
            let inner = self.inner.clone();
            let outcome = py.detach(|| {
                connection::block_on(Flavor::Background, async move {
                    let started = tokio::time::Instant::now();
                    let Ok(mut subscription) = tokio::time::timeout(slice, inner.lock()).await
                    else {
                        return Next::Idle;
                    };
                    subscription
                        .next(Some(slice.saturating_sub(started.elapsed())))
                        .await
                })
            });
            match outcome {
                Next::Delivery(delivery) => {
                    if let Some(message) = delivery_to_python(py, &self.names, delivery)? {
                        return Ok(Some(message));
                    }
                }
                Next::Closed => return Ok(None),
                Next::Idle if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(None),
                Next::Idle => py.check_signals()?,
            }
        }
    }

    /// Feeds deliveries to `queue` (an asyncio.Queue) on `loop`, in batches: dicts, exception
    /// instances for holes, and None at the end. It pauses while the consumer lags.
    fn start_pump(&self, event_loop: Bound<'_, PyAny>, queue: Bound<'_, PyAny>) {
        let inner = self.inner.clone();
        let names = self.names.clone();
        let event_loop = event_loop.unbind();
        let queue = queue.unbind();
        let task = runtime(Flavor::Background).spawn(async move {
            loop {
                loop {
                    let waiting =
                        aio::with_python(|py| queue.call_method0(py, "qsize")?.extract(py));
                    match waiting {
                        Some(Ok(waiting)) if waiting >= ASYNC_QUEUE_HIGH_WATER => {
                            tokio::time::sleep(Duration::from_millis(5)).await
                        }
                        Some(Ok::<usize, PyErr>(_)) => break,
                        _ => return,
                    }
                }
                let batch = inner.lock().await.next_batch().await;
                let finished = batch.is_empty();
                let delivered = aio::with_python(|py| {
                    let items = PyList::empty(py);
                    for delivery in batch {
                        match delivery_to_python(py, &names, delivery) {
                            Ok(Some(message)) => items.append(message)?,
                            Ok(None) => {}
                            Err(error) => items.append(error.into_value(py))?,
                        }
                    }
                    if finished {
                        items.append(py.None())?;
                    }
                    aio::deliver(py, &event_loop, &queue, items)
                });
                if !matches!(delivered, Some(Ok(()))) || finished {
                    return;
                }
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Unsubscribes and releases the pub/sub connection; iteration then ends.
    /// Returns once the connection is closed.
    fn close(&self, py: Python<'_>) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let membership = self
            .membership
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if self.inherited() {
            // The parent's: its runtime has no threads here to end them.
            std::mem::forget(tasks);
            if let Some(membership) = membership {
                membership.forget();
            }
            return;
        }
        for task in &tasks {
            task.abort();
        }
        // The pump may be waiting for the GIL: release it while the tasks wind down.
        py.detach(|| {
            connection::block_on(Flavor::Background, async {
                for task in tasks {
                    let _ = task.await;
                }
                if let Some(membership) = membership {
                    membership.leave().await;
                }
            })
        });
    }

    /// Bytes of live messages waiting to be read: at most `subscription_buffer_bytes`.
    #[getter]
    fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    #[getter]
    fn channels(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Per channel, `(cursor, epoch or None)` where the stream starts.
    #[getter]
    fn start_positions(&self) -> Vec<(i64, Option<String>)> {
        self.start
            .iter()
            .map(|(cursor, epoch)| (*cursor, (!epoch.is_empty()).then(|| epoch.clone())))
            .collect()
    }
}

impl NativeSubscription {
    /// Opens a subscription on `store` (see `Subscription::open`).
    pub async fn open(
        store: Arc<Store>,
        requests: Vec<Request>,
    ) -> Result<NativeSubscription, Failure> {
        let (subscription, membership) = Subscription::open(store, requests).await?;
        Ok(NativeSubscription {
            names: subscription.names.clone(),
            start: subscription.start.clone(),
            queued_bytes: subscription.buffered_bytes.clone(),
            inner: Arc::new(tokio::sync::Mutex::new(subscription)),
            membership: Mutex::new(Some(membership)),
            tasks: Mutex::new(Vec::new()),
            pid: std::process::id(),
        })
    }

    fn inherited(&self) -> bool {
        self.pid != std::process::id()
    }
}

impl Drop for NativeSubscription {
    /// A subscription dropped without `close` must not leave its connection behind: a
    /// dropped task handle would only detach the task.
    fn drop(&mut self) {
        let tasks = std::mem::take(self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()));
        let membership = self
            .membership
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if self.inherited() {
            std::mem::forget(tasks);
            if let Some(membership) = membership {
                membership.forget();
            }
            return;
        }
        // Dropping the membership leaves the hub.
        for task in tasks {
            task.abort();
        }
    }
}

/// A delivery as Python sees it: a message dict, or the exception for a gap. None for a
/// message on the channel that is not a JSON object (not replaylog's): it is skipped.
fn delivery_to_python(
    py: Python<'_>,
    names: &[String],
    delivery: Delivery,
) -> PyResult<Option<Py<PyAny>>> {
    match delivery {
        Delivery::Message { channel, payload } => {
            let message = match json::decode(py, &payload).or_else(|_| json_loads(py, &payload)) {
                Ok(message) => message,
                // It ends like one of ours (the subscription only delivers those), so it was
                // meant for this consumer: losing it is a hole, never a silent skip.
                Err(error) if is_unreadable(py, &error) => {
                    log_unreadable(py, &payload, &error)?;
                    let since = message::prev(&payload)
                        .or_else(|| message::timestamp(&payload).map(|ts| ts - 1))
                        .unwrap_or(0);
                    // The stream goes on after it, in the same history.
                    let resume = message::timestamp(&payload);
                    return Err(incomplete_replay(py, &names[channel], since, resume, None));
                }
                Err(error) => return Err(error),
            };
            let Ok(dict) = message.cast::<PyDict>() else {
                return Ok(None);
            };
            dict.set_item("channel", &names[channel])?;
            Ok(Some(message.unbind()))
        }
        Delivery::Gap {
            channel,
            since,
            resume,
            epoch,
        } => {
            let epoch = (!epoch.is_empty()).then_some(epoch);
            Err(incomplete_replay(
                py,
                &names[channel],
                since,
                Some(resume),
                epoch,
            ))
        }
    }
}

/// `IncompleteReplayError`: messages after `since` are gone; the stream goes on from `resume`
/// in history `epoch` (None: the same as before).
fn incomplete_replay(
    py: Python<'_>,
    channel: &str,
    since: i64,
    resume: Option<i64>,
    epoch: Option<String>,
) -> PyErr {
    python_error(
        py,
        "IncompleteReplayError",
        (channel.to_owned(), since, resume, epoch),
    )
}
