"""Running an entry script: input errors end it with one line on stderr instead of a traceback.

A bad config, an unusable checkpoint or a missing file is the user's to fix, and the message says how; the
traceback only buries it. ``STAR_TRACEBACK=1`` shows the traceback anyway. Other exceptions (bugs) propagate.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class InputError(Exception):
    """Base of the errors a user fixes by changing the input: configs, checkpoints, data paths."""


INPUT_ERRORS = (InputError, FileNotFoundError)
EXIT_INPUT_ERROR = 2


def run(main: Callable[..., int | None], *args) -> int:
    """``main(*args)`` as an exit code; an input error prints ``error: <message>`` and returns 2."""
    try:
        return main(*args) or 0
    except INPUT_ERRORS as e:
        if os.environ.get("STAR_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
