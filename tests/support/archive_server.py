"""Archives in the real WMT/IWSLT layouts, built from tests/data/archive_manifests.yaml (never from the configs), and
a local HTTP server on 127.0.0.1 that serves them with HEAD and Range support."""

import gzip
import hashlib
import http.server
import io
import os
import re
import shutil
import tarfile
import threading
import urllib.parse
import zipfile

import yaml
from helpers import REPO

MANIFEST_PATH = os.path.join(REPO, "tests", "data", "archive_manifests.yaml")


def manifests():
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def fake_lines(member, n):
    lang = member.split(".")[-2] if member.endswith(".gz") else member.split(".")[-1]
    return [f"{lang} sentence {i} of {os.path.basename(member)}" for i in range(n)]


def fake_member(member, n, fmt=None):
    """The bytes of an archive member in its real format: SGML and XML test sets, IWSLT tags, ' ||| ' bitext, gzipped
    or plain text."""
    lang = member.split(".")[-2] if member.endswith((".sgm", ".xml", ".gz")) else member.split(".")[-1]
    if member.endswith((".sgm", ".xml")):
        segs = "".join(f'<seg id="{i + 1}">{lang}  test   sentence {i} </seg>\n' for i in range(n))
        return f'<srcset setid="newstest" srclang="any">\n<doc docid="d1" genre="news">\n{segs}</doc>\n</srcset>\n' \
            .encode()
    if os.path.basename(member).startswith("train.tags."):
        body = "".join(f"{lang} talk sentence {i}\n" for i in range(n))
        return f"<url>http://www.ted.com/talks/x</url>\n<title>{lang} title</title>\n{body}".encode()
    if fmt == "bitext":
        return "".join(f"fi title {i} ||| en title {i}\n" for i in range(n)).encode()
    text = ("\n".join(fake_lines(member, n)) + "\n").encode()
    return gzip.compress(text) if member.endswith(".gz") else text


def archive_file_name(url):
    return os.path.basename(urllib.parse.urlparse(url).path)


def build_archive(url, path, n=60):
    """The archive of ``url`` as the manifest lists it (tgz, tar or zip by name), with ``n`` lines per member."""
    entry = manifests()[url]
    formats = entry.get("formats", {})
    members = sorted(entry["members"])
    name = os.path.basename(path)
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            for member in members:
                zf.writestr(member, fake_member(member, n, formats.get(member)))
    else:
        with tarfile.open(path, "w" if name.endswith(".tar") else "w:gz") as tar:
            for member in members:
                data = fake_member(member, n, formats.get(member))
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def serve_config(config, server, folder, n=60):
    """Point every download of ``config`` (a loaded task YAML) at ``server``, serving an archive built from the
    manifest under the file name prepare saves it as; checksums become the built archives'. Returns {name: path}."""
    from rela_tools.pipeline.download import local_name

    files = {}
    for name, entry in config["data"]["downloads"].items():
        key = (entry.get("urls") or [entry.get("url")])[0]
        file_name = local_name(entry)
        path = build_archive(key, os.path.join(folder, file_name), n)
        entry.pop("urls", None)
        entry.pop("sha256", None)
        entry["url"] = f"{server.base}/{urllib.parse.quote(file_name)}"
        entry["md5"] = hashlib.md5(open(path, "rb").read()).hexdigest()
        files[name] = path
    return files


def write_local_configs(task, config, config_dir):
    """``config`` as ``task``'s file in ``config_dir``, beside a copy of the real _defaults.yaml."""
    from rela_tools.pipeline.config import config_dir as real_dir

    os.makedirs(config_dir, exist_ok=True)
    shutil.copy(os.path.join(real_dir(), "_defaults.yaml"), config_dir)
    with open(os.path.join(config_dir, f"{task}.yaml"), "w") as f:
        yaml.safe_dump(config, f)


def real_config(task):
    from rela_tools.pipeline.config import config_dir as real_dir

    with open(os.path.join(real_dir(), f"{task}.yaml")) as f:
        return yaml.safe_load(f)


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves a folder with HEAD and HTTP Range support; can cut the first responses of a file short."""

    def __init__(self, folder):
        self.folder, self.requests, self.cut = folder, [], {}
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def base(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _locate(self):
        name = urllib.parse.unquote(self.path.lstrip("/"))
        self.server.requests.append((self.command, name, self.headers.get("Range")))
        path = os.path.join(self.server.folder, name)
        if not os.path.isfile(path):
            self.send_error(404)
            return None, None
        return name, open(path, "rb").read()

    def do_HEAD(self):
        name, data = self._locate()
        if data is None:
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        name, data = self._locate()
        if data is None:
            return
        start, end = 0, len(data) - 1
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)), end) if match.group(2) else end
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        body = data[start:end + 1]
        if self.server.cut.get(name, 0) > 0:  # simulate a dropped connection half-way
            self.server.cut[name] -= 1
            body = body[: len(body) // 2]
        self.wfile.write(body)
