"""Run CPU-bound pieces of an import on more than one core: the first piece in this process, the
others in forked children that send their result back through a pipe.

Why fork: the children inherit what the parent has built (nothing is pickled on the way in), and
only their results come back. What they run must be pure: it reads inherited data, returns a
picklable value, and writes nothing (no files, no output, no directory).

The children are forked before the caller's threads start where that matters (the importer
forks its readers before its directory searches begin), and leave with ``os._exit`` so that they
flush no inherited buffer and run no inherited exit handler.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ..errors import UserError

T = TypeVar("T")
R = TypeVar("R")
# Results bigger than a pipe's buffer are read while the child writes; this is the read size.
_CHUNK = 1 << 20


def cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and cgroups narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Forked(Generic[R]):
    """A piece of work running in a forked child; :meth:`result` waits for its value."""

    def __init__(self, fn: Callable[[T], R], arg: T):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_fd)
            code = 0
            try:
                payload = pickle.dumps((True, fn(arg)), protocol=pickle.HIGHEST_PROTOCOL)
            except UserError as exc:  # the parent raises the same error, for the user
                payload = pickle.dumps((False, _carried(exc)))
                code = 1
            except BaseException:  # the parent re-raises it, with the child's traceback
                payload = pickle.dumps((False, traceback.format_exc()))
                code = 1
            try:
                with os.fdopen(write_fd, "wb") as out:
                    out.write(payload)
            finally:
                os._exit(code)
        os.close(write_fd)
        self._pid = pid
        self._fd = read_fd
        self._done = False
        self._value: R | None = None

    def result(self) -> R:
        if not self._done:
            chunks = []
            with os.fdopen(self._fd, "rb") as pipe:
                while chunk := pipe.read(_CHUNK):
                    chunks.append(chunk)
            os.waitpid(self._pid, 0)
            self._done = True
            if not chunks:
                raise RuntimeError(f"forked worker {self._pid} died without a result")
            ok, value = pickle.loads(b"".join(chunks))
            if not ok:
                if isinstance(value, UserError):
                    raise value
                raise RuntimeError(f"forked worker {self._pid} failed:\n{value}")
            self._value = value
        return self._value  # type: ignore[return-value]

    def cancel(self) -> None:
        """Stop the child if its result was not taken (the parent's own piece failed)."""
        if self._done:
            return
        self._done = True
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self._pid, 0)
        os.close(self._fd)


def _carried(exc: UserError) -> UserError | str:
    """The error itself if it survives pickling, else its traceback (then an internal error)."""
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception:
        return traceback.format_exc()
    return back if type(back) is type(exc) and str(back) == str(exc) else traceback.format_exc()


def fork_each(fn: Callable[[T], R], args: Sequence[T]) -> list[Forked[R]]:
    """Start ``fn(arg)`` in one forked child per argument."""
    return [Forked(fn, arg) for arg in args]


def split(weights: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``range(len(weights))`` into at most ``parts`` contiguous, non-empty slices
    ``(start, stop)`` of about equal total weight, in order."""
    total = sum(weights)
    if not weights:
        return []
    parts = max(1, min(parts, len(weights)))
    bounds: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, w in enumerate(weights):
        acc += w
        left = parts - len(bounds) - 1  # slices still to open after this one
        if left and acc >= total * (len(bounds) + 1) / parts and len(weights) - (i + 1) >= left:
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(weights)))
    return bounds
