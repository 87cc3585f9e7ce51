"""Settings of the tiny Django project used by tests/test_django.py."""

import os

SECRET_KEY = "replaylog-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
ROOT_URLCONF = "djangoproject.urls"
INSTALLED_APPS = ["replaylog.django", "djangoproject"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
# Two SQLite databases, for broadcast_on_commit(using=...). Only the tests that ask for them
# (pytest-django's django_db mark) touch them, on test databases in memory.
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    "other": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# replaylog reads these lazily; the replay_log fixture points REPLAYLOG_URL at its own server.
REPLAYLOG_URL = os.environ.get("REPLAYLOG_URL", "redis://localhost:6379/0")
EXPIRE_REPLAY_LOGS_MS = 60_000
