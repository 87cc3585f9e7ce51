"""The Django app config of ``replaylog.django``."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class ReplayLogConfig(AppConfig):
    """Registers replaylog's system checks; has no models."""

    name = "replaylog.django"
    label = "replaylog"
    verbose_name = "Replay log"

    def ready(self) -> None:
        from .checks import check_settings

        checks.register(check_settings, "replaylog")
