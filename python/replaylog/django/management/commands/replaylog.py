"""``manage.py replaylog …``: the ``replaylog`` command line, reading Django settings."""

from __future__ import annotations

import os
import sys

from django.core.management.base import BaseCommand

from replaylog.cli import main


class Command(BaseCommand):
    help = "Look at and act on replay logs: tail, stats, prune, delete, broadcast, replay."

    def run_from_argv(self, argv: list[str]) -> None:
        # The command line parses its own arguments; Django is already set up.
        sys.exit(main(argv[2:], prog=f"{os.path.basename(argv[0])} {argv[1]}"))
