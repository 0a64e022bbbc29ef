"""The reproduction scripts, offline: the toy pipeline end to end, the WMT download path against a local HTTP server
serving archives in the real formats, resuming after a kill, multi-process training, bad arguments."""

import gzip
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile

import pytest
import yaml

from helpers import REPO

SCRIPTS = os.path.join(REPO, "scripts")


def script_env(tmp, **extra):
    env = dict(os.environ, RELA_PYTHON=sys.executable, DATA_ROOT=str(tmp / "data"),
               CHECKPOINT_ROOT=str(tmp / "checkpoints"), RESULTS_ROOT=str(tmp / "results"), PYTHONUNBUFFERED="1")
    env.pop("RELA_DOWNLOAD_MIRROR", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def script_command(name, *args):
    return ["bash", os.path.join(SCRIPTS, name), *map(str, args)]


def run_script(name, *args, env, check=True, timeout=900):
    proc = subprocess.run(script_command(name, *args), capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{name} {' '.join(map(str, args))} exited with {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


# --------------------------------------------------------------------------- the toy task end to end

@pytest.fixture(scope="module")
def quick_root(tmp_path_factory):
    return tmp_path_factory.mktemp("quick")


def test_reproduce_toy_writes_a_json_result_with_a_sacrebleu_signature(quick_root):
    env = script_env(quick_root, QUICK=1)
    proc = run_script("reproduce.sh", "toy", "rela_g", env=env)
    result_path = quick_root / "results" / "toy-quick" / "rela_g.json"
    result = json.loads(result_path.read_text())
    assert result["sentences"] == 50 and result["quick"] is True
    assert result["sacrebleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert "BLEU|nrefs:1" in proc.stdout and "chrF2|" in proc.stdout
    hyps = (quick_root / "results" / "toy-quick" / "rela_g.hyp").read_text().splitlines()
    assert len(hyps) == 50 and "\u2581" not in "".join(hyps)  # detokenised
    # a second run finds every step done
    again = run_script("prepare.sh", "toy", env=env)
    assert "[generate] already done" in again.stderr and "[binarize] already done" in again.stderr


def test_main_job_report_on_quick_toy(quick_root):
    env = script_env(quick_root, QUICK=1)
    run_script("reproduce.sh", "toy", "softmax", env=env)
    if not (quick_root / "results" / "toy-quick" / "rela_g.json").exists():
        run_script("reproduce.sh", "toy", "rela_g", env=env)
    proc = subprocess.run([sys.executable, "-m", "rela_fairseq.pipeline", "toy-report"], capture_output=True,
                          text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("SacreBLEU", "chrF", "sparsity, all attention", "null rate, cross", "JS head diversity (nats), cross",
                "AER best layer, best head, normal", "AER best layer, head average, shifted"):
        assert row in out, row
    header = out.splitlines()[[i for i, line in enumerate(out.splitlines()) if "softmax" in line][0]]
    assert "ReLA-g" in header
    softmax_sparsity = re.search(r"sparsity, all attention\s+(\S+)\s+(\S+)", out).groups()
    assert softmax_sparsity[0] == "0.0%" and softmax_sparsity[1] != "0.0%"
    plots = sorted(os.listdir(quick_root / "results" / "toy-quick" / "plots"))
    assert {"sparsity.png", "null_rate.png", "aer_by_layer.png"} <= set(plots)
    # results.sh gathers the JSON results into the paper-style table
    table = run_script("results.sh", "--output", quick_root / "results.md", env=env).stdout
    assert "| system | toy (QUICK) |" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert re.match(r"\| softmax \| \d+\.\d \|", rows["softmax"]) and re.match(r"\| ReLA-g \| \d+\.\d \|", rows["ReLA-g"])
    assert "nrefs:1|case:mixed|eff:no|tok:13a" in table
    assert (quick_root / "results.md").read_text().strip() == table.strip()


def test_train_resumes_after_being_killed(quick_root):
    env = script_env(quick_root, QUICK=1)
    run_script("prepare.sh", "toy", env=env)
    ckpt = quick_root / "checkpoints" / "toy-quick" / "entmax15"
    proc = subprocess.Popen(["bash", os.path.join(SCRIPTS, "train.sh"), "toy", "entmax15"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (ckpt / "checkpoint_last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "training ended before it could be interrupted"
    assert (ckpt / "checkpoint_last.pt").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_script("train.sh", "toy", "entmax15", env=env)
    log = resumed.stdout + resumed.stderr
    loaded = re.search(r"[Ll]oaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ (\d+) updates\)", log)
    assert loaded and 0 < int(loaded.group(1)) < 30, log[-2000:]
    assert max(int(n) for n in re.findall(r"num_updates[= ](\d+)", log)) == 30


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_multi_process_training_with_torchrun_gloo(quick_root):
    env = script_env(quick_root, QUICK=1, NPROC_PER_NODE=2, MASTER_PORT=free_port())
    run_script("prepare.sh", "toy", env=env)
    proc = run_script("train.sh", "toy", "softmax", "--save-dir", quick_root / "ddp", "--max-update", 4, env=env)
    log = proc.stdout + proc.stderr
    assert "distributed init (rank 0)" in log and "distributed init (rank 1)" in log
    assert "torchrun" in log and "done training" in log
    assert (quick_root / "ddp" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("args,message", [
    (("prepare.sh", "wmt15_xx_yy"), "unknown task 'wmt15_xx_yy'; choose one of iwslt14_de_en, toy, wmt14_en_de"),
    (("train.sh", "toy", "relu"), "unknown system 'relu'; choose one of softmax, sparsemax, entmax15"),
    (("evaluate.sh", "toy", "rela_i"), "no checkpoints for toy/rela_i"),
    (("train.sh", "wmt14_en_de", "rela_g"), "no binarised data for wmt14_en_de"),
    (("prepare.sh",), "the following arguments are required: TASK"),
])
def test_bad_arguments_exit_nonzero_naming_them(tmp_path, args, message):
    proc = run_script(*args, env=script_env(tmp_path), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_every_script_has_help(tmp_path):
    names = ("prepare.sh", "train.sh", "evaluate.sh", "reproduce.sh", "results.sh", "setup_env.sh", "test.sh",
             "toy_demo.sh")
    procs = {name: subprocess.Popen(script_command(name, "--help"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=script_env(tmp_path)) for name in names}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip(), f"{name}: {err[-1000:]}"


# --------------------------------------------------------------------------- downloads, against a local server

def fake_lines(member, n):
    lang = member.split(".")[-2] if member.endswith(".gz") else member.split(".")[-1]
    return [f"{lang} sentence {i} of {os.path.basename(member)}" for i in range(n)]


def fake_member(member, n):
    """The bytes of an archive member in its real format: SGML test sets, gzipped text, plain text."""
    if member.endswith(".sgm"):
        lang = member.split(".")[-2]
        segs = "".join(f'<seg id="{i + 1}">{lang}  test   sentence {i} </seg>\n' for i in range(n))
        return f'<srcset setid="newstest" srclang="any">\n<doc docid="d1" genre="news">\n{segs}</doc>\n</srcset>\n' \
            .encode()
    text = ("\n".join(fake_lines(member, n)) + "\n").encode()
    return gzip.compress(text) if member.endswith(".gz") else text


def build_archives(config, out_dir, n=60):
    """One archive per download of ``config``, holding every member its items name (tgz, or tar for .tar)."""
    members = {}
    for split in ("train", "valid", "test"):
        for item in config["data"][split]:
            members.setdefault(item["download"], set()).update({item["src"], item["tgt"]})
    files = {}
    for name, entry in config["data"]["downloads"].items():
        file_name = os.path.basename(entry["url"])
        path = os.path.join(out_dir, file_name)
        if file_name.endswith(".zip"):
            with zipfile.ZipFile(path, "w") as zf:
                for member in sorted(members[name]):
                    zf.writestr(member, fake_member(member, n))
        else:
            with tarfile.open(path, "w" if file_name.endswith(".tar") else "w:gz") as tar:
                for member in sorted(members[name]):
                    data = fake_member(member, n)
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        files[name] = path
    return files


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves a folder with HTTP Range support; can cut the first responses of a file short."""

    def __init__(self, folder):
        self.folder, self.requests, self.cut = folder, [], {}
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def base(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        path = os.path.join(self.server.folder, name)
        self.server.requests.append((name, self.headers.get("Range")))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        start = 0
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut.get(name, 0) > 0:  # simulate a dropped connection half-way
            self.server.cut[name] -= 1
            body = body[: len(body) // 2]
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    srv = ArchiveServer(str(folder))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def local_config(task, server, config_dir, archives_dir):
    """The real task config, its download addresses pointed at the local server and its checksums at the fake
    archives'; every member path and format stays as in the real file."""
    from rela_fairseq.pipeline.config import config_dir as real_dir

    with open(os.path.join(real_dir(), f"{task}.yaml")) as f:
        config = yaml.safe_load(f)
    files = build_archives(config, archives_dir)
    for name, entry in config["data"]["downloads"].items():
        data = open(files[name], "rb").read()
        entry["url"] = f"{server.base}/{os.path.basename(files[name])}"
        entry.pop("sha256", None)
        entry["md5"] = hashlib.md5(data).hexdigest()
    os.makedirs(config_dir, exist_ok=True)
    shutil.copy(os.path.join(real_dir(), "_defaults.yaml"), config_dir)
    with open(os.path.join(config_dir, f"{task}.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    return config, files


def test_prepare_wmt_task_from_a_local_server(server, tmp_path):
    """WMT14 En-Fr: tgz archives, a plain tar with gzipped text inside, SGML dev and test sets."""
    config_dir = tmp_path / "configs"
    config, _ = local_config("wmt14_en_fr", server, config_dir, server.folder)
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir)
    run_script("prepare.sh", "wmt14_en_fr", env=env)
    data = tmp_path / "data" / "wmt14_en_fr-quick"
    assert (data / "bin" / "dict.fr.txt").exists() and (data / "bin" / "spm.model").exists()
    train_en = (data / "raw" / "train.en").read_text().splitlines()
    assert len(train_en) == 5 * 60 and "en sentence 0 of giga-fren.release2.fixed.en.gz" in train_en
    # the reference exactly as sacrebleu reads SGML: the <seg> text, whitespace collapsed
    assert (data / "raw" / "test.ref").read_text().splitlines()[:2] == ["fr test sentence 0", "fr test sentence 1"]
    assert not list((data / "downloads").glob("*.part"))
    # a second run downloads nothing and redoes nothing
    before = len(server.requests)
    again = run_script("prepare.sh", "wmt14_en_fr", env=env)
    assert len(server.requests) == before and "[download] already done" in again.stderr


def test_checksum_mismatch_is_a_clear_error_and_keeps_no_partial_file(server, tmp_path):
    config_dir = tmp_path / "configs"
    config, files = local_config("wmt14_en_de", server, config_dir, server.folder)
    config["data"]["downloads"]["commoncrawl"]["md5"] = "0" * 32
    with open(config_dir / "wmt14_en_de.yaml", "w") as f:
        yaml.safe_dump(config, f)
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir)
    proc = run_script("prepare.sh", "wmt14_en_de", env=env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "training-parallel-commoncrawl.tgz: md5 checksum mismatch (expected 00000000000000000000000000000000, " \
           f"got {hashlib.md5(open(files['commoncrawl'], 'rb').read()).hexdigest()})" in proc.stderr
    downloads = tmp_path / "data" / "wmt14_en_de-quick" / "downloads"
    assert not (downloads / "training-parallel-commoncrawl.tgz").exists()
    assert not (downloads / "training-parallel-commoncrawl.tgz.part").exists()


def test_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    config_dir = tmp_path / "configs"
    _, files = local_config("wmt14_en_de", server, config_dir, server.folder)
    name = "training-parallel-europarl-v7.tgz"
    size = os.path.getsize(files["europarl_v7"])
    server.cut[name] = 3  # every attempt of the first run drops the connection half-way
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir, RELA_DOWNLOAD_RETRY_WAIT=0)
    first = run_script("prepare.sh", "wmt14_en_de", env=env, check=False)
    assert first.returncode != 0 and "run the command again to resume" in first.stderr
    part = tmp_path / "data" / "wmt14_en_de-quick" / "downloads" / (name + ".part")
    have = os.path.getsize(part)
    assert 0 < have < size
    assert not (part.parent / name).exists(), "a partial file must never carry the final name"
    run_script("prepare.sh", "wmt14_en_de", env=env)
    ranges = [r for n, r in server.requests if n == name and r]
    assert f"bytes={have}-" in ranges, ranges
    data = (part.parent / name).read_bytes()
    assert data == open(files["europarl_v7"], "rb").read()


def test_mirror_folder_replaces_the_addresses(tmp_path):
    from rela_fairseq.pipeline.download import resolve_url

    config_dir, mirror = tmp_path / "configs", tmp_path / "mirror"
    mirror.mkdir()

    class NoServer:
        base = "http://127.0.0.1:9"  # nothing listens there

    local_config("wmt16_ro_en", NoServer, config_dir, str(mirror))
    env = script_env(tmp_path, QUICK=1, RELA_CONFIG_DIR=config_dir, RELA_DOWNLOAD_MIRROR=mirror)
    run_script("prepare.sh", "wmt16_ro_en", env=env)
    assert (tmp_path / "data" / "wmt16_ro_en-quick" / "bin" / "dict.en.txt").exists()
    assert resolve_url("https://x.org/a/b.tgz", "http://m.example/base/") == "http://m.example/base/b.tgz"
