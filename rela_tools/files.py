"""Files that are complete under their final name, or absent: every writer of the project goes through here.

A file is written under ``<path>.<pid>.tmp`` and renamed to ``<path>`` only when the writing finished; an
interruption (error, Ctrl-C, kill) leaves at most that ``.tmp`` file behind, which the next writer of the path removes
once its process is gone. ``os.replace`` is atomic on POSIX and Windows when both names are on one file system, which a
sibling name guarantees. The process id in the name lets two pipelines write one file at once (two tuning lanes both
record the prepared data's fingerprint): with one shared ``<path>.tmp`` the first rename took the second's file away.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from typing import IO, Any, Callable, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary sibling path to write (a file or a folder), renamed to ``path`` when the block completes;
    removed if it fails. An existing ``path`` is replaced."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_orphans(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if os.path.isdir(tmp) and os.path.isdir(path):
        shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO[Any]]:
    """``open(path, mode)`` whose file carries its final name only once the block completed (text: UTF-8, "\\n")."""
    with atomic_path(path) as tmp:
        binary = "b" in mode
        options: dict[str, Any] = {} if binary else {"encoding": "utf-8", "newline": "\n"}
        with open(tmp, mode, **options) as f:
            yield f


class LockHeld(Exception):
    """``exclusive_lock(path, wait=False)`` found the lock held by another process (``holder``: its process id, as
    it wrote it into the file, or None if it had not yet)."""

    def __init__(self, path: str, holder: int | None):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by process {holder if holder is not None else '(not yet known)'}")


@contextlib.contextmanager
def exclusive_lock(path: str, on_wait: Callable[[int | None], None] | None = None,
                   wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block; another process asking for it
    waits (``on_wait`` is called once before waiting, with the holder's process id), or with ``wait=False`` gets
    ``LockHeld``. The holder writes its process id into the file. The system releases the lock when its holder ends,
    killed or not."""
    import fcntl  # POSIX, as the pipeline (fairseq's tools, bash scripts)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(path)
            if not wait:
                raise LockHeld(path, holder) from None
            if on_wait:
                on_wait(holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def lock_holder(path: str) -> int | None:
    """The process id that the holder of ``exclusive_lock(path)`` wrote, if any."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_lines(path: str, lines: Iterable[str]) -> int:
    """Write one line per item (newline added); returns the number of lines."""
    n = 0
    with atomic_open(path) as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    return n


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file without their newlines (only "\\n" ends a line: other Unicode line breaks are
    text, as in fairseq-preprocess)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line[:-1] if line.endswith("\n") else line for line in f]


def write_json(path: str, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _remove_orphans(path: str) -> None:
    """Remove the ``<path>.<pid>.tmp`` siblings left by writers that were killed (their process is gone)."""
    for tmp in glob.glob(glob.escape(path) + ".*.tmp"):
        pid = tmp[len(path) + 1 : -len(".tmp")]
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                _remove(tmp)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
