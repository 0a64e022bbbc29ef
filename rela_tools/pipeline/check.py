"""prepare --check: confirm a task's sources without preparing anything.

For every download of the task: the address answers (HTTP HEAD, or a one-byte range request where HEAD is refused),
its checksum matches and every archive member the config reads is there. Only what is needed is fetched:

* a file already downloaded (``DATA_ROOT/<task>/downloads``) or on a local mirror is checked where it lies;
* a file of at most ``--check-max-mb`` megabytes is streamed once (checksum and member list, nothing kept);
* a larger zip archive or plain tar archive has its member list read through HTTP range requests (the zip central
  directory, the tar headers); its checksum cannot be verified without the whole file;
* a larger compressed tar archive (tgz) cannot be listed without reading it whole: the report says so.

Everything that could not be verified is listed at the end; any failure (no answer, a checksum or member mismatch)
makes the command exit non-zero.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from typing import cast

from .config import Task, item_download
from .download import CHUNK, expected_checksums, local_name, mirror_urls, verify

logger = logging.getLogger(__name__)
TIMEOUT = 60
RANGE_BLOCK = 64 * 1024  # bytes per range request: a zip central directory or a few tar headers
MAX_RANGE_REQUESTS = 200  # a tar of thousands of members is not walked header by header


@dataclass
class Report:
    name: str
    address: str = ""
    answers: str = ""  # "ok (657.6 MB)" or the failure
    checksum: str = ""  # "md5 ok", "mismatch: ...", "not verified (...)", "none published"
    members: str = ""
    failures: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)


class CheckError(Exception):
    pass


def wanted_members(task: Task) -> dict[str, set[str]]:
    """download name -> the archive members the config reads from it."""
    members: dict[str, set[str]] = {name: set() for name in task["data"]["downloads"]}
    for split in ("train", "valid", "test"):
        for item in task["data"][split]:
            for side in ("src", "tgt"):
                if item.get(side):
                    members[cast(str, item_download(item, side))].add(item[side])
    return members


def check(task: Task, mirror: str | None = None, max_mb: float = 64.0) -> bool:
    """Check every download of ``task``; print a report; True if nothing failed."""
    if task["data"].get("generator"):
        print(f"{task.name}: generated data ({task['data']['generator']}), nothing to download or check")
        return True
    members = wanted_members(task)
    reports = []
    for name, entry in task["data"]["downloads"].items():
        report = Report(name)
        try:
            _check_download(task, name, entry, members[name], mirror, max_mb, report)
        except CheckError as exc:
            report.failures.append(str(exc))
        reports.append(report)
    _print(task, reports)
    return not any(r.failures for r in reports)


def _check_download(task: Task, name: str, entry: dict, wanted: set[str], mirror: str | None, max_mb: float,
                    report: Report) -> None:
    urls = mirror_urls(entry, mirror)
    report.address = urls[0] + (f" (+{len(urls) - 1} more pieces)" if len(urls) > 1 else "")
    sizes = []
    for url in urls:
        size, ranges = probe(url)
        sizes.append(size)
    total = sum(s or 0 for s in sizes) if all(s is not None for s in sizes) else None
    report.answers = "ok" + (f" ({total / 1e6:.1f} MB)" if total is not None else " (size not given)")
    checksums = expected_checksums(entry)
    local = os.path.join(task.path("downloads"), local_name(entry))
    archive_name = local_name(entry)

    if os.path.exists(local):
        _verify_file(local, checksums, wanted, archive_name, report, where="the downloaded copy")
        return
    if len(urls) == 1 and urls[0].startswith("file://"):
        _verify_file(urllib.request.url2pathname(urllib.parse.urlparse(urls[0]).path), checksums, wanted,
                     archive_name, report, where="the mirror's copy")
        return
    if total is not None and total <= max_mb * 1e6:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, archive_name)
            with open(path, "wb") as out:
                for url in urls:
                    _stream(url, out)
            _verify_file(path, checksums, wanted, archive_name, report, where="a streamed copy")
        return

    size_text = f"{total / 1e6:.0f} MB" if total is not None else "size unknown"
    report.checksum = _unverified(report, f"{name}: checksum", f"needs the whole file ({size_text})") \
        if checksums else "none published (recorded at the first download)"
    if not wanted:
        report.members = "-"
        return
    kind = archive_kind(archive_name)
    if len(urls) == 1 and ranges and total is not None and kind in ("zip", "tar"):
        try:
            names = list_remote_members(urls[0], total, kind)
        except CheckError as exc:
            report.members = _unverified(report, f"{name}: members", str(exc))
            return
        _compare_members(names, wanted, archive_name, report)
        return
    why = ("the server refuses range requests" if kind in ("zip", "tar") and not ranges else
           f"a compressed archive is read whole ({size_text}); prepare.sh downloads it, then --check verifies the "
           "downloaded copy, or raise --check-max-mb")
    report.members = _unverified(report, f"{name}: members", why)


def _unverified(report: Report, what: str, why: str) -> str:
    report.unverified.append(f"{what}: {why}")
    return f"not verified ({why.split(';')[0]})"


def _verify_file(path: str, checksums: dict, wanted: set[str], archive_name: str, report: Report, where: str) -> None:
    if not os.path.exists(path):
        raise CheckError(f"{path}: no such file")
    mismatch = verify(path, checksums) if checksums else None
    if mismatch:
        algorithm, expected, actual = mismatch
        report.checksum = f"MISMATCH ({where})"
        report.failures.append(f"{report.name}: {algorithm} of {where} is {actual}, the config expects {expected}")
    else:
        report.checksum = (f"{'/'.join(checksums)} ok ({where})" if checksums else
                           "none published (recorded at the first download)")
    if wanted:
        _compare_members(list_local_members(path, archive_name), wanted, archive_name, report)
    else:
        report.members = "-"


def _compare_members(names: list[str], wanted: set[str], archive_name: str, report: Report) -> None:
    have = set(names)
    missing = sorted(wanted - have)
    if missing:
        report.members = f"MISSING {len(missing)} of {len(wanted)}"
        for member in missing:
            report.failures.append(f"{report.name}: {archive_name} has no member {member!r} (it holds e.g. "
                                   f"{', '.join(sorted(have)[:6])})")
    else:
        report.members = f"{len(wanted)} of {len(wanted)} found"


def archive_kind(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith((".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz")):
        return "compressed tar"
    return "file"


def list_local_members(path: str, archive_name: str) -> list[str]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            return [info.name for info in tar if info.isfile()]
    raise CheckError(f"{archive_name} is not a tar or zip archive, but the config names members in it")


# --------------------------------------------------------------------------- HTTP

def _request(url: str, method: str = "GET", byte_range: tuple[int, int] | None = None):
    request = urllib.request.Request(url, method=method, headers={"User-Agent": "rela-fairseq"})
    if byte_range is not None:
        request.add_header("Range", f"bytes={byte_range[0]}-{byte_range[1]}")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        raise CheckError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CheckError(f"{url}: no answer ({getattr(exc, 'reason', exc)})") from None


def probe(url: str) -> tuple[int | None, bool]:
    """(size in bytes or None, whether range requests work) of ``url``; CheckError if it does not answer."""
    if url.startswith("file://"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        if not os.path.isfile(path):
            raise CheckError(f"{path}: not in the mirror folder")
        return os.path.getsize(path), True
    try:
        with _request(url, "HEAD") as response:
            length = response.headers.get("Content-Length")
            ranges = response.headers.get("Accept-Ranges", "").lower() == "bytes"
            if length is not None:
                return int(length), ranges or _ranges_work(url)
    except CheckError as exc:
        if "HTTP 405" not in str(exc) and "HTTP 501" not in str(exc):  # HEAD not allowed: ask for one byte instead
            raise
    with _request(url, byte_range=(0, 0)) as response:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if response.status == 206 and total.isdigit():
            return int(total), True
        length = response.headers.get("Content-Length")
        return (int(length) if length is not None else None), False


def _ranges_work(url: str) -> bool:
    try:
        with _request(url, byte_range=(0, 0)) as response:
            return response.status == 206
    except CheckError:
        return False


def _stream(url: str, out) -> None:
    if url.startswith("file://"):
        with open(urllib.request.url2pathname(urllib.parse.urlparse(url).path), "rb") as f:
            while block := f.read(CHUNK):
                out.write(block)
        return
    with _request(url) as response:
        while block := response.read(CHUNK):
            out.write(block)


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over HTTP range requests (``RANGE_BLOCK`` bytes at a time): enough for zipfile to
    read a central directory and for tarfile to walk the headers of an uncompressed tar, skipping the contents."""

    def __init__(self, url: str, size: int):
        super().__init__()
        self.url, self.size, self.pos = url, size, 0
        self.block_start, self.block = -1, b""
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), max(0, self.size - self.pos))
        if n == 0:
            return 0
        if not (self.block_start <= self.pos and self.pos + n <= self.block_start + len(self.block)):
            self._fetch(self.pos, max(n, RANGE_BLOCK))
        start = self.pos - self.block_start
        buffer[:n] = self.block[start:start + n]
        self.pos += n
        return n

    def _fetch(self, start: int, length: int) -> None:
        self.requests += 1
        if self.requests > MAX_RANGE_REQUESTS:
            raise CheckError(f"more than {MAX_RANGE_REQUESTS} range requests to list the archive")
        end = min(self.size, start + length) - 1
        with _request(self.url, byte_range=(start, end)) as response:
            if response.status != 206:
                raise CheckError("the server ignored a range request")
            self.block_start, self.block = start, response.read()


def list_remote_members(url: str, size: int, kind: str) -> list[str]:
    reader = io.BufferedReader(RangeReader(url, size), buffer_size=RANGE_BLOCK)
    try:
        if kind == "zip":
            with zipfile.ZipFile(reader) as zf:
                return zf.namelist()
        with tarfile.open(fileobj=reader, mode="r:") as tar:
            return [info.name for info in tar if info.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise CheckError(f"not a readable {kind} archive ({exc})") from None


# --------------------------------------------------------------------------- report

def _print(task: Task, reports: list[Report]) -> None:
    print(f"{task.name}: sources checked, nothing prepared")
    width = max(len(r.name) for r in reports)
    for r in reports:
        print(f"  {r.name:{width}}  {r.address}")
        status = "FAILED" if r.failures else "ok"
        print(f"  {'':{width}}  answers: {r.answers or 'no'}; checksum: {r.checksum or '-'}; members: "
              f"{r.members or '-'} [{status}]")
    failures = [f for r in reports for f in r.failures]
    unverified = [u for r in reports for u in r.unverified]
    if unverified:
        print("could not verify:")
        for line in unverified:
            print(f"  - {line}")
    if failures:
        print("FAILED:")
        for line in failures:
            print(f"  - {line}")
    else:
        print(f"{task.name}: every address answers and nothing checked contradicts the config"
              + (f" ({len(unverified)} item(s) not verifiable without downloading)" if unverified else ""))

