"""One uvicorn worker serving ``EventStreamView`` for ``python -m bench.fanout``.

``python -m bench.sse_worker PORT`` serves ``/events/`` (the stream of the ``fanout`` channel)
on 127.0.0.1:PORT, with ``REPLAYLOG_URL`` from the environment. This module is also the
Django settings module and the URLconf of that tiny site.
"""

from __future__ import annotations

import os
import sys

from django.urls import path

from bench.fanout import CHANNEL, raise_open_files_limit
from replaylog.django.views import EventStreamView

SECRET_KEY = "replaylog-bench-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "bench.sse_worker"
INSTALLED_APPS = ["replaylog.django"]
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
REPLAYLOG_URL = os.environ.get("REPLAYLOG_URL", "redis://localhost:6379/0")

urlpatterns = [path("events/", EventStreamView.as_view(channels=[CHANNEL]))]


def main() -> None:
    import uvicorn
    from django.core.asgi import get_asgi_application

    raise_open_files_limit()
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.sse_worker"
    uvicorn.run(
        get_asgi_application(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        lifespan="off",
        access_log=False,
        log_level="warning",
        # The generator opens its connections in batches; the kernel caps this at somaxconn.
        backlog=8192,
    )


if __name__ == "__main__":
    main()
