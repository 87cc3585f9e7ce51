"""``uvicorn chat.asgi:application``, from examples/chat/."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chat.settings")

application = get_asgi_application()
