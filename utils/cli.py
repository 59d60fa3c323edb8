"""Running an entry script: input errors end it with one line on stderr instead of a traceback.

A bad config, an unusable checkpoint or a missing file is the user's to fix, and the message says how; the
traceback only buries it. ``STAR_TRACEBACK=1`` shows the traceback anyway. Other exceptions (bugs) propagate.
``device_arg``, ``positive_int``, ``non_negative_int`` and ``fraction`` are argparse types that refuse a bad flag
before anything loads; ``settings_changes`` says how a resumed output folder was made otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch


class InputError(Exception):
    """Base of the errors a user fixes by changing the input: configs, checkpoints, data paths."""


# Path errors name the path, which is the user's to fix (an --out that is a file, a folder without write access).
INPUT_ERRORS = (InputError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
EXIT_INPUT_ERROR = 2


def device_arg(text: str) -> str:
    """argparse ``type`` of every ``--device`` flag: a device torch knows and this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine (torch {torch.__version__}); "
                                             "use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    return text


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type`` of counts and sizes that must be at least 1 (images, batch sizes, repetitions)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse ``type`` of sizes where 0 means "off" (``--max-side 0``: keep the size)."""
    return _int_at_least(text, 0)


def fraction(text: str) -> float:
    """argparse ``type`` of a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def settings_changes(saved: dict, ours: dict, path_keys: tuple[str, ...] = ()) -> list[str]:
    """``"key old -> new"`` for each key of ``ours`` whose value differs from ``saved`` (a resumed output folder's
    record of what made it); ``path_keys`` compare as resolved paths, so a relative path and its absolute form
    agree."""
    def same(key):
        a, b = saved.get(key), ours[key]
        if key in path_keys and a is not None and b is not None:
            return Path(a).resolve() == Path(b).resolve()
        return a == b
    return [f"{key} {saved.get(key)!r} -> {ours[key]!r}" for key in ours if not same(key)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(main: Callable[..., int | None], *args) -> int:
    """``main(*args)`` as an exit code; an input error prints ``error: <message>`` and returns 2."""
    try:
        return main(*args) or 0
    except INPUT_ERRORS as e:
        if os.environ.get("STAR_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
