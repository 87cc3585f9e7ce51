"""Side-by-side benchmark of three Redis replay logs (issue 3).

- ``article``: the blog post's algorithm on redis-py with hiredis.
- ``peer``: replaylog's semantics written in Python as a strong developer would.
- ``replaylog``: this package.

Run ``.venv/bin/python -m bench`` from the repository root (``--smoke`` for a tiny CI run).
"""
