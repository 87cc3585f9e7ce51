"""Lets Celery's ``app.autodiscover_tasks()`` find replaylog's prune task.

With ``"replaylog.django"`` in ``INSTALLED_APPS``, autodiscovery imports this module, which
registers the ``replaylog.prune_replay_logs`` task from :mod:`replaylog.celery`. Django itself
never imports it.
"""

from ..celery import prune_replay_logs

__all__ = ["prune_replay_logs"]
