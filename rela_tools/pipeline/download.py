"""Downloads that resume, check checksums, and never leave a half-written file under the final name.

A file is fetched to ``<name>.part`` (an interrupted download continues from there with an HTTP Range request), its
md5/sha256 is checked, and only then is it renamed to ``<name>``. A checksum mismatch deletes the part file and names
the file, both checksums and the address. Sources without a published checksum are checked against the sha256
recorded at their first download (``checksums.json`` beside them), which the log says.

``RELA_DOWNLOAD_MIRROR`` (or ``--mirror``) replaces every address by ``<mirror>/<file name>`` (the entry's ``file``
name if it has one, else the last part of the address): an http(s) base URL, or a local folder holding the files (for
machines behind a firewall).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import RelaFairseqError

logger = logging.getLogger(__name__)
CHUNK = 1 << 20
RETRIES = 3


class DownloadError(RelaFairseqError):
    pass


def resolve_url(url: str, mirror: str | None = None, name: str | None = None) -> str:
    """The address to fetch ``url`` from, given a mirror (base URL or local folder) that holds it as ``name``
    (default: the last part of the address)."""
    mirror = mirror if mirror is not None else os.environ.get("RELA_DOWNLOAD_MIRROR")
    if not mirror:
        return url
    name = name or os.path.basename(urllib.parse.urlparse(url).path)
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + name
    return "file://" + os.path.join(os.path.abspath(mirror), name)


def file_hash(path, algorithm):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class ChecksumRegistry:
    """sha256 of sources without a published checksum, recorded at their first download."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "checksums.json")
        self.known = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.known = json.load(f)

    def record(self, name, sha256):
        self.known[name] = sha256
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.known, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def expected_checksums(entry):
    return {algo: entry[algo].lower() for algo in ("md5", "sha256") if entry.get(algo)}


def verify(path, checksums):
    """(algorithm, expected, actual) of the first mismatch, or None."""
    for algorithm, expected in checksums.items():
        actual = file_hash(path, algorithm)
        if actual != expected:
            return algorithm, expected, actual
    return None


def local_name(entry: dict) -> str:
    """The file name a ``downloads`` entry is saved under: ``file``, else the address's; a split archive
    (UNv1.0.en-zh.tar.gz.00 + .01) is saved as one file without the piece suffix."""
    urls = entry_urls(entry)
    name = entry.get("file") or os.path.basename(urllib.parse.urlparse(urls[0]).path)
    return name.rsplit(".", 1)[0] if len(urls) > 1 and not entry.get("file") else name


def entry_urls(entry: dict) -> list[str]:
    return entry.get("urls") or [entry["url"]]


def mirror_urls(entry: dict, mirror: str | None = None) -> list[str]:
    """Where each part of a ``downloads`` entry is fetched from: the addresses, or the mirror's copies (a single file
    under its local name, the pieces of a split archive under their own)."""
    urls = entry_urls(entry)
    if len(urls) == 1:
        return [resolve_url(urls[0], mirror, local_name(entry))]
    return [resolve_url(url, mirror) for url in urls]


def fetch(entry, directory, mirror=None, progress=True):
    """Download one ``downloads`` entry of a task config (``url`` or ``urls`` for a split archive, optional
    ``md5``/``sha256``, optional ``file`` name) into ``directory``; return the file's path. Skips complete files."""
    urls = mirror_urls(entry, mirror)
    name = local_name(entry)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    registry = ChecksumRegistry(directory)
    checksums = expected_checksums(entry)
    if not checksums and name in registry.known:
        checksums = {"sha256": registry.known[name]}

    if os.path.exists(path):
        if not checksums or verify(path, checksums) is None:
            logger.info(f"{name}: already downloaded")
            return path
        logger.warning(f"{name}: the file on disk does not match its checksum; downloading it again")
        os.remove(path)

    part = path + ".part"
    if len(urls) == 1:
        _download(urls[0], part, progress)
    else:  # a split archive: fetch each piece (resumably), then concatenate
        pieces = []
        for i, url in enumerate(urls):
            piece = f"{path}.piece{i}"
            if not os.path.exists(piece):
                _download(url, piece + ".part", progress)
                os.replace(piece + ".part", piece)
            pieces.append(piece)
        with open(part, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, CHUNK)

    mismatch = verify(part, checksums) if checksums else None
    if mismatch:
        os.remove(part)
        algorithm, expected, actual = mismatch
        raise DownloadError(f"{name}: {algorithm} checksum mismatch (expected {expected}, got {actual}) for "
                            f"{', '.join(urls)}; the download was deleted. "
                            "A changed file upstream or a wrong mirror: check the source before retrying.")
    if not checksums:
        digest = file_hash(part, "sha256")
        registry.record(name, digest)
        logger.warning(f"{name}: no published checksum; recorded sha256 {digest} in {registry.path}, "
                       "later downloads are checked against it")
    os.replace(part, path)
    for i in range(len(urls) if len(urls) > 1 else 0):
        os.remove(f"{path}.piece{i}")
    return path


def _download(url, part, progress):
    """Fetch ``url`` into ``part``, continuing an earlier partial download; retries transient errors."""
    for attempt in range(1, RETRIES + 1):
        try:
            _download_once(url, part, progress)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code in (403, 404, 410):
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}. If the file moved, download it by hand "
                                    "into a folder and set RELA_DOWNLOAD_MIRROR to that folder.") from exc
            if attempt == RETRIES:
                have = os.path.getsize(part) if os.path.exists(part) else 0
                raise DownloadError(f"{url}: download failed after {RETRIES} attempts ({exc}); {have} bytes kept in "
                                    f"{part}, run the command again to resume") from exc
            logger.warning(f"{url}: {exc}; retrying ({attempt}/{RETRIES - 1})")
            time.sleep(float(os.environ.get("RELA_DOWNLOAD_RETRY_WAIT", min(2 ** attempt, 10))))


def _download_once(url, part, progress):
    from tqdm import tqdm

    if url.startswith("file://"):
        source = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        if not os.path.exists(source):
            raise DownloadError(f"{source}: not in the mirror folder (RELA_DOWNLOAD_MIRROR)")
        shutil.copyfile(source, part)
        return
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "rela-fairseq"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch
            return
        raise
    with response:
        resumed = response.status == 206
        if have and not resumed:
            have = 0  # the server ignored the range: start again
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        mode = "ab" if resumed else "wb"
        with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                           desc=os.path.basename(part[:-5]), disable=not progress) as bar:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                out.write(block)
                bar.update(len(block))
        if total is not None and os.path.getsize(part) < total:
            raise ConnectionError(f"connection closed after {os.path.getsize(part)} of {total} bytes")
