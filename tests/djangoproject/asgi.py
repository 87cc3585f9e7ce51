"""ASGI entry point of the tiny Django project: ``uvicorn djangoproject.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproject.settings")

application = get_asgi_application()
