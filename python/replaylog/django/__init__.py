"""Optional Django app: add ``"replaylog.django"`` to ``INSTALLED_APPS``.

It has no models. Its :class:`~replaylog.django.apps.ReplayLogConfig` registers system checks
(``manage.py check``, tag ``replaylog``) for the replaylog settings; see
:mod:`replaylog.django.checks` for their ids. Importing this package does not import Django.
"""
