"""Files that are complete under their final name, or absent: every writer of the project goes through here.

A file is written under ``<path>.tmp`` and renamed to ``<path>`` only when the writing finished; an interruption
(error, Ctrl-C, kill) leaves at most a ``.tmp`` file behind, which the next run overwrites. ``os.replace`` is atomic on
POSIX and Windows when both names are on one file system, which a sibling name guarantees.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import IO, Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary sibling path to write (a file or a folder), renamed to ``path`` when the block completes;
    removed if it fails. An existing ``path`` is replaced."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
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


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
