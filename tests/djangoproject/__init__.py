"""A tiny Django project that uses replaylog as an app would; driven by tests/test_django.py."""
