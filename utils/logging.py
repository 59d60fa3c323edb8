"""A rank-0 logger: console + file on the main process, silent elsewhere. Never touches ``print``/``sys.stdout``."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from utils import dist

_FORMAT = "[%(asctime)s %(levelname)s] %(message)s"
FILE_ONLY = {"file_only": True}  # ``log.info(..., extra=FILE_ONLY)``: the log file only (the console has tqdm's bar)


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def get_logger(name: str = "star", log_file: str | Path | None = None) -> logging.Logger:
    """The project logger. On rank 0 it writes INFO+ to stderr and, if given, appends to ``log_file`` (the one
    file of the latest call that names one: a second run in the same process logs to its own file only); on
    other ranks it only lets WARNING+ through, so errors are never lost."""
    logger = logging.getLogger(name)
    logger.propagate = False
    main = dist.is_main_process()
    logger.setLevel(logging.INFO if main else logging.WARNING)
    if not any(getattr(h, "_star_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        console.addFilter(_not_file_only)
        console._star_console = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    if log_file is not None and main:
        log_file = Path(log_file).resolve()
        for old in [h for h in logger.handlers if getattr(h, "_star_file", None) not in (None, str(log_file))]:
            logger.removeHandler(old)  # an earlier run in this process: its file must not get this run's lines
            old.close()
        if not any(getattr(h, "_star_file", None) == str(log_file) for h in logger.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file)
            handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
            handler._star_file = str(log_file)  # type: ignore[attr-defined]
            logger.addHandler(handler)
    return logger
