"""Celery task that prunes the replay logs on a schedule.

Importing this module registers ``replaylog.prune_replay_logs`` with every Celery app (it is a
``shared_task``). It runs :func:`replaylog.prune_replay_logs`, which trims every log of the entries
older than ``EXPIRE_REPLAY_LOGS_MS``, and returns how many entries it removed.

Run it every minute with Celery beat:

```python
# Django projects with "replaylog.django" in INSTALLED_APPS and autodiscover_tasks() skip this.
app.conf.imports = [*app.conf.imports, "replaylog.celery"]
app.conf.beat_schedule = {
    "prune-replay-logs": {
        "task": "replaylog.prune_replay_logs",
        "schedule": 60.0,  # seconds; a celery.schedules.crontab() works too
        "options": {"expires": 55.0},  # a prune that waited past the next one is dropped
    },
}
```

The task never retries: a failed prune is simply done again by the next scheduled run, so failures
cannot pile up. It uses the default log, so the worker reads ``REPLAYLOG_URL`` and
``EXPIRE_REPLAY_LOGS_MS`` from Django settings or the environment, like the rest of replaylog.
"""

from __future__ import annotations

from celery import shared_task

import replaylog

__all__ = ["TASK_NAME", "prune_replay_logs"]

TASK_NAME = "replaylog.prune_replay_logs"


@shared_task(name=TASK_NAME, ignore_result=False, max_retries=0, acks_late=False)
def prune_replay_logs(expire_ms: int | None = None) -> int:
    """Trim entries older than ``expire_ms`` (default: ``EXPIRE_REPLAY_LOGS_MS``) from every log.

    Returns how many entries were removed.
    """
    return replaylog.prune_replay_logs(expire_ms)
