"""Logging for workflow scripts and the command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def to_file(path: str | Path | None, level: int = logging.INFO) -> logging.Logger:
    """Send blurflow's log records, warnings and uncaught exceptions to ``path`` (and stderr)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    logging.captureWarnings(True)
    log = logging.getLogger("blurflow")

    def excepthook(kind, value, tb):
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    sys.excepthook = excepthook
    return log
