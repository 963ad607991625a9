"""One run at a time: an exclusive lock file that names its holder (waves, AAF imports)."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held(path: Path, holder: str, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold ``path`` for the length of the block, or raise ``busy(<who holds it>)`` at once.

    The lock is the kernel's (flock): it goes with the process, so a killed run leaves no stale
    lock behind; the file's text only says who holds it (``holder``, the pid, since when).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 512, 0).decode(errors="replace").strip()
            raise busy(other or "another run") from None
        since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} pid {os.getpid()} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
