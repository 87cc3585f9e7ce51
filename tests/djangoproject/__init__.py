"""A tiny Django project that uses replaylog the way an app would; driven by tests/test_django.py."""
