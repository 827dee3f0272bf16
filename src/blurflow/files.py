"""Atomic file writing: a file appears under its final name only once it is complete."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: Path, names: list[str]) -> list[Path]:
    """Delete the temporaries (``.NAME.tmpPID``) in ``folder`` of the files matching the glob
    patterns ``names`` whose writer no longer runs, as a killed process leaves them; returns what
    was removed."""
    removed = []
    if folder.is_dir():
        for name in names:
            for other in folder.glob(f".{name}.tmp*"):
                match = re.fullmatch(r"\..+\.tmp(\d+)", other.name)
                if match and not _alive(int(match.group(1))):
                    other.unlink(missing_ok=True)
                    removed.append(other)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.NAME.tmpPID``); rename it to ``path`` when the
    block succeeds, delete it when the block raises. Creates the parent folder, and removes the
    temporaries of ``path`` that a killed writer left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, [glob.escape(path.name)])
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
