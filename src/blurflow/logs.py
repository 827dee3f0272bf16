"""Logging for workflow jobs and progress bars for the command line."""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's scheduler ending a job, ``kill``), raised as Ctrl-C is: files being
    written are removed, finished ones stay."""


def _terminate(signum, frame) -> None:
    raise Terminated


def terminate_as_interrupt() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (nothing where this is
    not the main thread: only it can take signals)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def job(smk) -> logging.Logger:
    """Log a workflow job (the ``snakemake`` object of a rule script) to its log file and stderr:
    blurflow's log records, warnings and uncaught exceptions, a first line with the rule, its
    inputs and outputs, and a last line with its wall time. Ctrl-C and a file system's refusal (a
    full disk, a missing permission) end the job with one line; anything else with its traceback."""
    path = Path(smk.log[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(path, mode="w")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    logging.captureWarnings(True)
    log = logging.getLogger("blurflow")
    start, failed = time.perf_counter(), []

    def excepthook(kind, value, tb):
        failed.append(kind)
        if issubclass(kind, KeyboardInterrupt):
            log.critical("terminated" if issubclass(kind, Terminated) else "interrupted")
        elif issubclass(kind, OSError):
            log.critical("failed: %s", value)
        else:
            log.critical("failed: %s: %s", kind.__name__, value, exc_info=(kind, value, tb))

    def finish():
        if not failed:
            log.info("rule %s done in %.1f s", smk.rule, time.perf_counter() - start)

    sys.excepthook = excepthook
    terminate_as_interrupt()
    atexit.register(finish)
    log.info("rule %s: %s -> %s", smk.rule, _files(smk.input), _files(smk.output))
    return log


def _files(paths: Sequence[str]) -> str:
    """'a, b' for up to 3 files, else 'N files (first ... last)'."""
    paths = list(paths)
    if not paths:
        return "(nothing)"
    if len(paths) <= 3:
        return ", ".join(paths)
    return f"{len(paths)} files ({paths[0]} ... {paths[-1]})"


def progress(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm progress bar on a terminal only: where stderr is redirected to a file it is off
    (it would write one long line of redraws there; jobs log summary lines instead). Redraws at
    most every 2 s."""
    kwargs.setdefault("mininterval", 2)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
