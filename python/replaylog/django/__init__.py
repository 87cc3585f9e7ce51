"""Django integration: :func:`broadcast_on_commit`, and an optional app.

:func:`broadcast_on_commit` (and :func:`abroadcast_on_commit` for async code) broadcast once the
database transaction commits; see :mod:`replaylog.django.on_commit`.

Add ``"replaylog.django"`` to ``INSTALLED_APPS`` for the app: it has no models. Its
:class:`~replaylog.django.apps.ReplayLogConfig` registers system checks (``manage.py check``, tag
``replaylog``) for the replaylog settings; see :mod:`replaylog.django.checks` for their ids.
Importing this package does not import Django.
"""

from .on_commit import PendingBroadcast, abroadcast_on_commit, broadcast_on_commit, broadcasts_in

__all__ = ["PendingBroadcast", "abroadcast_on_commit", "broadcast_on_commit", "broadcasts_in"]
