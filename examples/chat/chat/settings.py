"""Settings of the chat example. ``REPLAYLOG_URL`` comes from the environment (run.py sets it)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = os.environ.get("CHAT_SECRET_KEY", "the-chat-example-is-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
ROOT_URLCONF = "chat.urls"
INSTALLED_APPS = ["django.contrib.staticfiles", "replaylog.django"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "OPTIONS": {"context_processors": ["django.template.context_processors.csrf"]},
    }
]
DATABASES: dict = {}
USE_TZ = True
STATIC_URL = "static/"

REPLAYLOG_URL = os.environ.get("REPLAYLOG_URL", "redis://localhost:6379/0")
EXPIRE_REPLAY_LOGS_MS = 24 * 3600 * 1000
